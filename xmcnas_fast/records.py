"""What a run's logs record about a candidate: who it is and where it came from (proposals.jsonl and
history.jsonl both) and its result (history.jsonl), made from the worker's CandidateResult. The
record's "fitness" is fitness.fitness of it, computed here once."""
from __future__ import annotations

import math
import time
from typing import Optional

from .contract import CandidateResult
from .evolution import Candidate
from .fitness import fitness
from .scheduler import TaskResult

#: what a reused candidate takes from the record of the identical network trained before it
REUSED_FIELDS = ("status", "error", "valid", "test", "fused", "layer_weights", "params", "epochs", "steps", "rung",
                 "short")


def candidate_fields(c: Candidate) -> dict:
    """Who a candidate is and where it came from, as both of a run's logs record it."""
    return {"id": c.id, "hash": c.genotype.hash(), "genotype": c.genotype.to_dict(), "parent": c.parent,
            "mutation": c.mutation, "constrained": c.constrained, "reused_from": c.reused_from,
            "stands_in_for": c.stands_in_for}


def proposal_record(c: Candidate, after_results: int) -> dict:
    """A line of proposals.jsonl: the candidate, and how many results the strategy had been told
    when it proposed it (what replaying the search needs)."""
    return {**candidate_fields(c), "after_reports": after_results, "time": time.time()}


def result_record(c: Candidate, res: Optional[TaskResult], result: Optional[CandidateResult],
                  prior: Optional[dict], judge: str = "fused") -> dict:
    """A line of history.jsonl: the candidate, then the task's outcome (`res`, from the scheduler)
    and the worker's `result`, its fitness judged by `judge` (fitness.JUDGES; recorded as "judge" where
    it is not "fused"); for a reused candidate (`prior`: the record of the same network trained
    before), that record's result instead."""
    base = {**candidate_fields(c), "depth": c.genotype.depth, **({} if judge == "fused" else {"judge": judge})}
    if prior is not None:
        return {**base, **{k: prior.get(k) for k in REUSED_FIELDS}, "fitness": prior.get("fitness"),
                "seconds": 0.0, "device": None, "attempts": 0, "finished": time.time()}
    out = {**base, "status": res.status, "error": res.error, "device": res.device,
           "attempts": res.attempts, "seconds": round(res.seconds, 3), "finished": time.time()}
    if res.status == "ok" and isinstance(result, CandidateResult):
        trained = result.to_dict()
        out.update({k: v for k, v in trained.items() if k not in ("device", "seconds")})
        out["train_seconds"] = trained["seconds"]
    out["fitness"] = fitness(out, judge)
    return _json_safe(out)


def _json_safe(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def steps_to_reach(curve: Optional[list], target: Optional[float], judge: str = "fused") -> Optional[int]:
    """The first step at which a validation curve reaches the fitness `target` (its rows: [step, epoch, P@1,
    P@5] and, when fused with the lexical stage, the fused P@5: the fitness is the last column, or the
    network's P@5 where the judge is the network)."""
    if not curve or target is None:
        return None
    col = 3 if judge == "network" else -1
    return next((row[0] for row in curve if row[col] >= target), None)
