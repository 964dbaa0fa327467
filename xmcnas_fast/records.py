"""What a run's logs record about a candidate: who it is and where it came from (proposals.jsonl and
history.jsonl both), its result (history.jsonl), how candidates rank, and the search's clock."""
from __future__ import annotations

import math
import time
from typing import Optional

from .evolution import Candidate
from .runs import Run
from .scheduler import TaskResult
from .train import record_fitness


def candidate_fields(c: Candidate) -> dict:
    """Who a candidate is and where it came from, as both of a run's logs record it."""
    return {"id": c.id, "hash": c.genotype.hash(), "genotype": c.genotype.to_dict(), "parent": c.parent,
            "mutation": c.mutation, "constrained": c.constrained, "reused_from": c.reused_from,
            "stands_in_for": c.stands_in_for}


def proposal_record(c: Candidate, after_reports: int) -> dict:
    return {**candidate_fields(c), "after_reports": after_reports, "time": time.time()}


def result_record(c: Candidate, res: Optional[TaskResult], rec: Optional[dict], prior: Optional[dict]) -> dict:
    base = {**candidate_fields(c), "depth": c.genotype.depth}
    if prior is not None:  # the same network was trained before: its result, not a new training
        keep = ("status", "error", "valid", "test", "fused", "layer_weights", "params", "epochs", "steps", "rung",
                "short")
        return {**base, **{k: prior.get(k) for k in keep}, "fitness": prior.get("fitness"),
                "seconds": 0.0, "device": None, "attempts": 0, "finished": time.time()}
    out = {**base, "status": res.status, "error": res.error, "device": res.device,
           "attempts": res.attempts, "seconds": round(res.seconds, 3), "finished": time.time()}
    if res.status == "ok" and isinstance(rec, dict):
        out.update({k: v for k, v in rec.items() if k not in ("status", "error", "device", "seconds")})
        out["status"], out["error"] = rec["status"], rec.get("error")
        out["train_seconds"] = rec.get("seconds")
    out["fitness"] = record_fitness(out)
    return _json_safe(out)


def _json_safe(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


def ranked(records: dict) -> list[dict]:
    """The finished candidates with a fitness, best first: by the budget their figure comes from
    (the full one before the short one), then by the figure."""
    return sorted((r for r in records.values() if r.get("fitness") is not None),
                  key=lambda r: (r.get("rung") or 0, r["fitness"]), reverse=True)


def steps_to_reach(curve: Optional[list], target: Optional[float]) -> Optional[int]:
    """The first step at which a validation curve reaches the fitness `target` (its rows: [step, epoch, P@1,
    P@5] and, when fused with the lexical stage, the fused P@5: the fitness is the last column)."""
    if not curve or target is None:
        return None
    return next((row[0] for row in curve if row[-1] >= target), None)


class SearchClock:
    """The search's wall-clock seconds over all its sessions: those recorded with the last finished
    candidate, plus this session's since it started (time between sessions does not count)."""

    def __init__(self, run: Run, start: float = 0.0):
        """`start`: seconds spent before the first candidate (the lexical stage), counted in a new search."""
        recs = run.history.records
        self.before = float(recs[-1].get("elapsed") or 0.0) if recs else start
        self.t0 = time.monotonic()

    def seconds(self) -> float:
        return round(self.before + time.monotonic() - self.t0, 3)
