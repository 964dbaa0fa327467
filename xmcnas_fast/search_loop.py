"""The search phase of a run: the loop that keeps the scheduler's workers busy with the strategy's
candidates and records each as it ends, and the replay that brings a fresh strategy to the state of
a stopped search. The run's phases (search, then final) are put together in search.py.

What crosses to the workers is a CandidateTask, what comes back a CandidateResult (contract.py);
the history record is made from it by records.result_record, and every decision on which candidate
is better goes through fitness.py.
"""
from __future__ import annotations

import math
import time
from collections import deque
from typing import Optional

from .candidate import train_candidate
from .contract import CandidateTask, LexicalPart, ParentWeights, ShortRun
from .evolution import Candidate, Strategy
from .final import search_time_is_up
from .fitness import ranked, record_tie
from .model import ModelConfig
from .records import proposal_record, result_record, steps_to_reach
from .runs import Run, RunError
from .scheduler import Event, TaskResult
from .train import TrainConfig

SEED_STRIDE = 100003  # a prime above any budget's candidate count: no two (search seed, candidate) share a seed


def training_seed(search_seed: int, cand_id: int) -> int:
    """The seed a candidate trains with: its own, and the same again when the search is resumed."""
    return search_seed * SEED_STRIDE + cand_id


def tell(strategy: Strategy, rec: dict) -> None:
    """Tell the strategy a finished candidate's fitness, with the budget it comes from."""
    strategy.tell(rec["id"], rec["fitness"], rung=rec.get("rung") or 0,
                  short_fitness=(rec.get("short") or {}).get("P@5"), tie=record_tie(rec))


def replay(strategy: Strategy, run: Run) -> list[Candidate]:
    """Bring a fresh strategy to the state the run's logs describe; return the unfinished candidates."""
    results = {r["id"]: r for r in run.history.records}
    order = [r["id"] for r in run.history.records]
    told = 0
    for p in run.proposals.records:
        while told < min(p["after_reports"], len(order)):
            tell(strategy, results[order[told]])
            told += 1
        c = strategy.propose()
        if c is None or c.id != p["id"] or c.genotype.hash() != p["hash"]:
            raise RunError(f"{run.proposals.path}: replaying the search diverged at candidate {p['id']} "
                           f"(was the configuration or the code changed?)")
    for rid in order[told:]:
        tell(strategy, results[rid])
    return [strategy.candidates[p["id"]] for p in run.unfinished_proposals()]


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


def lexical_part(lexical: Optional[dict], final: bool = False) -> Optional[LexicalPart]:
    """What a task says of the search's lexical stage (None: the search has none); the final training's
    fusion may be the ranker."""
    if not lexical:
        return None
    return LexicalPart(lexical["folder"], lexical["residual"], lexical.get("serving"), judge_of(lexical),
                       rank=final and bool(lexical.get("ranker")))


def judge_of(lexical: Optional[dict]) -> str:
    """What the search's evaluations are judged by (fitness.JUDGES): its lexical stage's "judge" ("fused"
    without a stage, where the two are one figure)."""
    return (lexical or {}).get("judge", "fused")


class SearchLoop:
    """Keeps the scheduler's slots busy with the strategy's candidates and records each as it ends."""

    def __init__(self, run: Run, strategy: Strategy, sched, progress, reruns: list[Candidate],
                 lexical: Optional[dict] = None):
        self.run, self.cfg, self.strategy, self.sched = run, run.config, strategy, sched
        self.lexical = lexical                       # the lexical stage: {folder, residual, seconds, ...}
        self.progress = progress
        self.reruns = deque(reruns)                  # in flight when the search last stopped
        # the loop's own copies: the run rewrites its history's records when a bundle goes
        self.records = {r["id"]: dict(r) for r in run.history.records}
        self.keep = int(self.cfg["run"]["keep_models"])
        self.inherit = bool(self.cfg["search"]["inherit"])
        self.short_steps = self.cfg["search"]["fidelity"]
        self.thresholds = {p["id"]: p.get("promote_above") for p in run.proposals.records}
        self.in_flight: dict[str, Candidate] = {}
        self.clock = SearchClock(run, start=(lexical or {}).get("seconds", 0.0))
        self.closed = run.search_closed() is not None

    def run_to_end(self) -> None:
        while not self.ended():
            self.fill_slots()
            self.check_can_go_on()
            self.collect()

    def ended(self) -> bool:
        """Every candidate of the budget is recorded, or the search is closed and none is running."""
        return self.strategy.done or (self.closed and not self.in_flight and not self.reruns)

    def time_is_up(self) -> bool:
        """Too late for a candidate to start: one that takes the median time would end past the
        deadline (the final training's share of the total time is all that is left then;
        final.search_time_is_up). A question only: `close_if_time_is_up` acts on it."""
        if self.closed:
            return True
        return search_time_is_up(self.cfg, self.clock.seconds(), self.records.values())

    def close_if_time_is_up(self) -> None:
        """From the deadline on, no candidate starts, on resume too (closed.json)."""
        if self.closed or not self.time_is_up():
            return
        self.closed = True
        n = len(self.records) + len(self.in_flight)
        self.run.close_search({"at": self.clock.seconds(), "candidates": n})
        self.progress.note(f"the search's time is up at minute {self.clock.seconds() / 60:.1f}: {n} of "
                           f"{self.strategy.budget} candidates; the rest of the time trains the best to the end")

    def fill_slots(self) -> None:
        self.close_if_time_is_up()
        while self.sched.free_slots() > 0:
            c = self.next_candidate()
            if c is None:
                break
            if c.reused_from is not None:
                self.finish(c, None, None)
            else:
                self.submit(c)

    def next_candidate(self) -> Optional[Candidate]:
        if self.reruns:
            return self.reruns.popleft()
        self.close_if_time_is_up()
        if self.closed:
            return None
        c = self.strategy.propose()
        if c is not None:
            rec = proposal_record(c, len(self.strategy.history))
            if self.short_steps:   # the bar a short run must reach, fixed when the candidate is proposed
                t = self.strategy.promotion_threshold(self.cfg["search"]["promote"])
                rec["promote_above"] = self.thresholds[c.id] = None if math.isinf(t) else t
            self.run.proposals.append(rec)
        return c

    def task(self, c: Candidate) -> CandidateTask:
        """What the worker is asked to do for `c`."""
        parent = None
        if self.inherit and c.parent is not None:
            p = self.records[c.parent]
            parent = ParentWeights(c.parent, p["genotype"], p.get("model_dir"))
        short = ShortRun(self.short_steps, self.thresholds.get(c.id)) if self.short_steps else None
        return CandidateTask(
            model=ModelConfig.from_dict({**self.cfg["model"], "genotype": c.genotype.to_dict()}),
            train=TrainConfig.from_dict({**self.cfg["train"], "seed": training_seed(self.cfg["search"]["seed"], c.id)}),
            model_dir=self.run.model_dir(c.id), save_above=self.save_threshold(), parent=parent, short=short,
            lexical=lexical_part(self.lexical))

    def submit(self, c: Candidate) -> None:
        self.sched.submit(str(c.id), train_candidate, self.task(c))
        self.in_flight[str(c.id)] = c
        self.progress.started(c.id, self.sched.running().get(str(c.id), "?"), str(c.genotype))

    def save_threshold(self) -> float:
        """The fitness a new candidate must beat for its bundle to be saved (the keep-th best saved one);
        with weight inheritance every candidate is saved: it may become a parent."""
        saved = self.saved()
        if self.inherit or len(saved) < self.keep:
            return -math.inf
        return saved[self.keep - 1]["fitness"]

    def saved(self) -> list[dict]:
        """The finished candidates whose bundle was saved, best first."""
        return [r for r in ranked(self.records) if r.get("model_dir")]

    def check_can_go_on(self) -> None:
        if self.in_flight or self.ended():
            return
        last = self.run.history.records[-1].get("error") if self.run.history.records else None
        raise RuntimeError("the search cannot go on: no candidate is running and none can start"
                           + (f" (last error: {last})" if last else ""))

    def collect(self) -> None:
        for item in self.sched.poll(timeout=0.5):
            if isinstance(item, Event):
                self.progress.progress(int(item.task_id), item.device, item.data)
            else:
                self.finish(self.in_flight.pop(item.task_id), item, item.value)

    def finish(self, c: Candidate, res: Optional[TaskResult], result) -> None:
        prior = self.records.get(c.reused_from) if c.reused_from is not None else None
        out = result_record(c, res, result, prior, judge_of(self.lexical))
        if c.parent is not None and prior is None:
            parent = self.records.get(c.parent) or {}
            out["steps_to_parent"] = steps_to_reach(out.get("curve"), parent.get("fitness"), judge_of(self.lexical))
        out["elapsed"] = self.clock.seconds()
        self.run.history.append(dict(out))           # recorded first: a crash after this loses nothing
        self.records[c.id] = out
        tell(self.strategy, out)
        self.keep_best_models()
        self.progress.finished(c.id, out.get("device") or "-", out["status"], out["fitness"],
                               out.get("seconds") or 0.0, str(c.genotype),
                               population=[m.fitness for m in self.strategy.population])

    def keep_best_models(self) -> None:
        """Delete all bundles but the `keep` best ones (and, with inheritance, those of the candidates
        a child may yet come from and of the parents of candidates in flight); point best.json at
        the best if it has one."""
        order = ranked(self.records)
        keep = {r["id"] for r in self.saved()[: self.keep]}
        if self.inherit:
            keep |= {m.id for m in self.strategy.parents}
            keep |= {c.parent for c in [*self.in_flight.values(), *self.reruns] if c.parent is not None}
        for cand_id in self.run.keep_models(keep):
            self.records[cand_id].pop("model_dir", None)
        if order and order[0].get("model_dir"):
            self.run.set_best(order[0])
