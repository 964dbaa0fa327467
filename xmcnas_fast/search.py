"""The search loop: the one place where evolution, scheduler and run directory meet.

It asks the strategy for candidates, hands them to the scheduler, records
every finished one in the run directory (before telling the strategy), and
feeds the result back. A resumed search replays its logs through a fresh
strategy (same seed, same calls, so the same state) and re-runs the
candidates that were in flight when it stopped.
"""
from __future__ import annotations

import json
import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .candidate import train_candidate, worker_init
from .evolution import Candidate, Strategy, make_strategy
from .final import FINAL_DEFAULTS, FINAL_MODEL_KEYS, FINAL_TRAIN_KEYS, final_settings, final_wins, search_deadline
from .model import ModelConfig
from .records import SearchClock, proposal_record, ranked, result_record, steps_to_reach
from .runs import Run, RunError, write_json_atomic
from .scheduler import Event, TaskResult, make_scheduler
from .train import TrainConfig

__all__ = ["make_config", "run_search", "replay", "train_candidate", "training_seed", "SearchOutcome",
           "steps_to_reach", "ranked"]

CONFIG_VERSION = 1

# Budgets: starting points for every knob (each is also a flag).
BUDGETS = {
    # 16 candidates of at most an epoch or half a minute each, then the best trained on from its own
    # weights for what is left of 9 minutes (at least 3): within 10 minutes on a 2-core CPU with the
    # bundled debtags data. (Going on from the candidate beat a fresh network of twice the width given
    # the same 3 minutes: validation P@5 43.7 / 43.0 against 42.1 / 42.5, two searches' best.)
    "demo": {
        "search": {"population": 6, "cycles": 10, "sample": 3, "max_depth": 4, "inherit": True},
        "model": {"emb_dim": 64, "width": 64, "fc": [64]},
        # no early stop inside the budget: many networks sit on the label-prior plateau (validation
        # P@5 ~25.5) for their first hundreds of steps before P@5 rises, and a short patience stopped
        # them there, so the search ranked them by when they took off
        # lr 4e-3: twice the P@5 gain of 2e-3 over the first few hundred steps (width 128, conv1 + conv5)
        # at least 800 steps, whatever the time: on a 68k-text, 4,190-label set (5x debtags's steps per
        # epoch, 4x its cost per step) networks sat on the label-prior plateau for 600 steps, so half
        # a minute (100-200 steps there) left every candidate on it; the 9 minutes stretch as the
        # candidates do (final.stretch). On debtags the epoch (581 steps) ends a candidate first.
        "train": {"max_epochs": 1, "max_minutes": 0.5, "min_steps": 800, "eval_every": 100, "patience": 50,
                  "max_len": 64, "eval_batch_size": 500, "lr": 4e-3},
        "data": {"valid": 1000, "max_len": 64},
        "final": {"max_epochs": 10, "total_minutes": 9.0, "min_minutes": 3.0},
    },
    # the paper's setting (XMC-NAS, EURLex-4K): P=20, C=50, S=10, up to 30 epochs, width 512; the
    # discovered architecture trained again, to the end of its 30 epochs, as the paper's Table 2
    "paper": {
        "search": {"population": 20, "cycles": 50, "sample": 10, "max_depth": 6},
        "model": {"emb_dim": 300, "width": 512, "fc": [256]},
        "train": {"max_epochs": 30, "max_minutes": None, "eval_every": 100, "patience": 50, "max_len": 500},
        "data": {"valid": 200, "max_len": 500},
        "final": {"inherit": False},
    },
}


#: the lexical stage of a search (docs/design.md, "The lexical stage and fusion"): on, every candidate's
#: fitness is the validation P@5 of the network fused with it; "residual": networks train with its
#: logits as a fixed offset (its training split's top lists cross-fitted over 2 folds)
LEXICAL_DEFAULTS = {"enabled": True, "mode": "fuse", "top_k": 50}
LEXICAL_MODES = ("fuse", "residual")


def default_devices() -> str:
    if torch.cuda.is_available():
        return "cuda"
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return "cpu:2" if cores >= 2 else "cpu"


def resolve_devices(cfg: dict, devices: Optional[str] = None) -> str:
    """The devices a run uses: those given now, else the run's saved ones, else this machine's default."""
    return devices or cfg["run"]["devices"] or default_devices()


def candidate_total(cfg: dict) -> int:
    """How many candidates the run's search trains in all (its strategy's budget)."""
    return _strategy(cfg).budget


def make_config(budget: str = "demo", *, dataset: str = "debtags", overrides: Optional[dict] = None) -> dict:
    """The full configuration of a search: a budget's values, then any overrides {section: {key: value}}."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; expected one of {sorted(BUDGETS)}")
    b = BUDGETS[budget]
    cfg = {
        "version": CONFIG_VERSION, "budget": budget,
        "data": {"dataset": dataset, "max_len": 500, "valid": 0.1, "seed": 0, "min_count": 1,
                 "max_vocab": None, "vectors": None, **b["data"]},
        "search": {"strategy": "evolution", "seed": 0, "constraint": None, "constraint_fraction": 0.0,
                   "inherit": False, "fidelity": None, "promote": 1 / 3, **b["search"]},
        "model": {**ModelConfig().to_dict(), "genotype": None, **b["model"]},
        "train": {**TrainConfig().to_dict(), **b["train"]},
        "run": {"backend": "local", "devices": None, "candidate_timeout": None, "keep_models": 3},
        "final": {**FINAL_DEFAULTS, **b.get("final", {})},
        "lexical": dict(LEXICAL_DEFAULTS),
    }
    for section, values in (overrides or {}).items():
        for k, v in values.items():
            if k not in cfg[section]:
                raise ValueError(f"unknown setting {section}.{k}")
            cfg[section][k] = v
    _strategy(cfg)  # refuses settings no search can run with (a sample larger than the population) up front
    s = cfg["search"]
    if s.get("fidelity") is not None and s["fidelity"] < 1:
        raise ValueError(f"--fidelity {s['fidelity']}: the short run needs at least 1 step")
    if not 0 < s.get("promote", 1) <= 1:
        raise ValueError(f"--promote {s['promote']}: expected a fraction of the population, in (0, 1]")
    if cfg["lexical"]["mode"] not in LEXICAL_MODES:
        raise ValueError(f"--lexical-mode {cfg['lexical']['mode']}: expected one of {', '.join(LEXICAL_MODES)}")
    return cfg


# ---- data, in the main process and in each worker -----------------------------------------------

def load_data(data_cfg: dict):
    from .data import load

    columns = {c: data_cfg[c] for c in ("text_column", "labels_column") if data_cfg.get(c) is not None}
    return load(data_cfg["dataset"], max_len=data_cfg["max_len"], min_count=data_cfg["min_count"],
                max_vocab=data_cfg["max_vocab"], valid=data_cfg["valid"], seed=data_cfg["seed"], **columns)


# ---- the loop -------------------------------------------------------------------------------------

SEED_STRIDE = 100003  # a prime above any budget's candidate count: no two (search seed, candidate) share a seed


def training_seed(search_seed: int, cand_id: int) -> int:
    """The seed a candidate trains with: its own, and the same again when the search is resumed."""
    return search_seed * SEED_STRIDE + cand_id


def _strategy(cfg: dict) -> Strategy:
    s = cfg["search"]
    kw = {"sample_size": s["sample"]} if s["strategy"] == "evolution" else {}
    constraint = (s["constraint"], 0) if s["constraint"] else None
    return make_strategy(s["strategy"], population_size=s["population"], cycles=s["cycles"],
                         max_depth=s["max_depth"], seed=s["seed"], constraint=constraint,
                         constraint_fraction=s["constraint_fraction"], **kw)


def replay(strategy: Strategy, run: Run) -> list[Candidate]:
    """Bring a fresh strategy to the state the run's logs describe; return the unfinished candidates."""
    results = {r["id"]: r for r in run.history.records}
    order = [r["id"] for r in run.history.records]
    reported = 0
    for p in run.proposals.records:
        while reported < min(p["after_reports"], len(order)):
            report(strategy, results[order[reported]])
            reported += 1
        c = strategy.propose()
        if c is None or c.id != p["id"] or c.genotype.hash() != p["hash"]:
            raise RunError(f"{run.proposals.path}: replaying the search diverged at candidate {p['id']} "
                           f"(was the configuration or the code changed?)")
    for rid in order[reported:]:
        report(strategy, results[rid])
    return [strategy.candidates[p["id"]] for p in run.unfinished_proposals()]


def report(strategy: Strategy, rec: dict) -> None:
    """Tell the strategy a finished candidate's figure, with the budget it comes from."""
    strategy.report(rec["id"], rec["fitness"], rung=rec.get("rung") or 0,
                    short_fitness=(rec.get("short") or {}).get("P@5"))


class _Silent:
    """Progress for a search nobody watches: every event is dropped."""

    def _drop(self, *args, **kwargs) -> None:
        return None

    started = progress = finished = note = ended = _drop


class _SearchLoop:
    """Keeps the scheduler's slots busy with the strategy's candidates and records each as it ends."""

    def __init__(self, run: Run, strategy: Strategy, sched, progress, reruns: list[Candidate],
                 lexical: Optional[dict] = None):
        self.run, self.cfg, self.strategy, self.sched = run, run.config, strategy, sched
        self.lexical = lexical                       # {folder, residual, seconds} of the lexical stage
        self.progress = progress
        self.reruns = deque(reruns)                  # in flight when the search last stopped
        self.records = {r["id"]: r for r in run.history.records}
        self.keep = int(self.cfg["run"]["keep_models"])
        self.inherit = bool(self.cfg["search"].get("inherit"))
        self.short_steps = self.cfg["search"].get("fidelity")
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
        """Every candidate of the budget is recorded, or the search's time is up and none is running."""
        return self.strategy.done or (self.time_is_up() and not self.in_flight and not self.reruns)

    def time_is_up(self) -> bool:
        """Past the deadline (the final training's share of the total time is all that is left), with a
        candidate recorded: from then on none starts, on resume too (closed.json)."""
        if self.closed:
            return True
        deadline = search_deadline(self.cfg, self.records.values())
        if deadline is None or not self.run.history.records or self.clock.seconds() < deadline:
            return False
        self.closed = True
        n = len(self.run.history.records) + len(self.in_flight)
        self.run.close_search({"at": self.clock.seconds(), "candidates": n})
        self.progress.note(f"the search's time is up at minute {self.clock.seconds() / 60:.1f}: {n} of "
                           f"{self.strategy.budget} candidates; the rest of the time trains the best to the end")
        return True

    def fill_slots(self) -> None:
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
        if self.time_is_up():
            return None
        c = self.strategy.propose()
        if c is not None:
            rec = proposal_record(c, len(self.strategy.history))
            if self.short_steps:   # the bar a short run must reach, fixed when the candidate is proposed
                t = self.strategy.promotion_threshold(self.cfg["search"]["promote"])
                rec["promote_above"] = self.thresholds[c.id] = None if math.isinf(t) else t
            self.run.proposals.append(rec)
        return c

    def submit(self, c: Candidate) -> None:
        payload = {"model": {**self.cfg["model"], "genotype": c.genotype.to_dict()},
                   "train": {**self.cfg["train"], "seed": training_seed(self.cfg["search"]["seed"], c.id)},
                   "model_dir": self.run.model_dir(c.id), "save_above": self.save_threshold()}
        if self.inherit and c.parent is not None:
            parent = self.records[c.parent]
            payload["parent"] = {"id": c.parent, "genotype": parent["genotype"], "model_dir": parent.get("model_dir")}
        if self.short_steps:
            payload["short"] = {"steps": self.short_steps, "promote_above": self.thresholds.get(c.id)}
        if self.lexical:
            payload["lexical"] = lexical_payload(self.lexical)
        self.sched.submit(str(c.id), train_candidate, payload)
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

    def finish(self, c: Candidate, res: Optional[TaskResult], rec: Optional[dict]) -> None:
        prior = self.records.get(c.reused_from) if c.reused_from is not None else None
        out = result_record(c, res, rec, prior)
        if c.parent is not None and prior is None:
            parent = self.records.get(c.parent) or {}
            out["steps_to_parent"] = steps_to_reach(out.get("curve"), parent.get("fitness"))
        out["elapsed"] = self.clock.seconds()
        self.run.history.append(out)                 # recorded first: a crash after this loses nothing
        self.records[c.id] = out
        report(self.strategy, out)
        self.keep_best_models()
        self.progress.finished(c.id, out.get("device") or "-", out["status"], out["fitness"],
                               out.get("seconds") or 0.0, str(c.genotype),
                               population=[m.fitness for m in self.strategy.population])

    def keep_best_models(self) -> None:
        """Delete all bundles but the `keep` best ones (and, with inheritance, those of the population
        and of the parents of candidates in flight); point best.json at the best if it has one."""
        order = ranked(self.records)
        keep = {r["id"] for r in self.saved()[: self.keep]}
        if self.inherit:
            keep |= {m.id for m in self.strategy.population}
            keep |= {c.parent for c in [*self.in_flight.values(), *self.reruns] if c.parent is not None}
        self.run.keep_models(keep)
        if order and order[0].get("model_dir"):
            self.run.set_best(order[0])


# ---- the final phase: the best architecture trained to the end -----------------------------------

def run_final(run: Run, strategy: Strategy, sched, progress, devices: str,
              lexical: Optional[dict] = None) -> Optional[dict]:
    """Train the search's best architecture with the final settings, starting from the candidate's
    weights wherever the two networks agree, record it in final.json and point best.json at it if it
    does at least as well as the candidate (`chosen`). Nothing to do when it is recorded already (a
    resumed search) or turned off."""
    cfg = run.config
    best, done = strategy.best(), run.final()
    records = {r["id"]: r for r in run.history.records}
    if done is not None:   # recorded before a stop: best.json may not point at it yet
        if final_wins(done, records.get(done["of"], {})) and (run.best() or {}).get("id") != "final":
            run.set_best(done)
        return done
    if not (cfg.get("final") or {}).get("enabled") or best is None:
        return None
    elapsed = float(run.history.records[-1].get("elapsed") or 0.0)
    model, train = final_settings(cfg, elapsed, training_seed(cfg["search"]["seed"], SEED_STRIDE - 1),
                                  records.values())
    if "cuda" not in devices:   # one training: it may use every core the workers shared
        from .scheduler.devices import visible_cores

        train["threads"] = visible_cores()
    source = records[best.id]
    payload = {"model": {**model, "genotype": source["genotype"]}, "train": train,
               "model_dir": run.final_dir(), "save_above": -math.inf}
    if cfg["final"].get("inherit", True):
        payload["parent"] = {"id": best.id, "genotype": source["genotype"], "model_dir": source.get("model_dir")}
    if lexical:
        payload["lexical"] = lexical_payload(lexical)
    label = f"(#{best.id}) {best.genotype}"
    progress.note(f"training the best architecture (#{best.id}) to the end: width {model['width']}, "
                  f"at most {train['max_epochs']} epochs" + (f", {train['max_minutes']} min" if train["max_minutes"] else ""))
    sched.submit("final", train_candidate, payload)
    progress.started("final", sched.running().get("final", "?"), label)
    res = _wait_for(sched, "final", progress)
    out = {**result_record(strategy.candidates[best.id], res, res.value, None), "id": "final", "of": best.id,
           "settings": {"model": {k: model[k] for k in FINAL_MODEL_KEYS},
                        "train": {k: train.get(k) for k in ("max_minutes", *FINAL_TRAIN_KEYS)}},
           "search_seconds": elapsed, "candidates": len(records)}
    out["chosen"] = final_wins(out, source)
    run.set_final(out)
    progress.ended("final", res.device or "-", f"final model: {out['status']}, validation P@5 {_pct(out['fitness'])} "
                   f"(the search's best: {_pct(source['fitness'])}) in {out['seconds']:.0f}s"
                   + ("" if out["chosen"] else "; the search's best stays the result"))
    if out["chosen"]:
        run.set_best(out)
    return out


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def _wait_for(sched, task_id: str, progress) -> TaskResult:
    while True:
        for item in sched.poll(timeout=0.5):
            if isinstance(item, Event):
                progress.progress(item.task_id, item.device, item.data)
            elif item.task_id == task_id:
                return item


@dataclass
class SearchOutcome:
    finished: int
    total: int
    interrupted: bool
    best: Optional[dict]
    final: Optional[dict] = None


def run_search(run: Run, *, progress=None, backend: Optional[str] = None, devices: Optional[str] = None,
               candidate_timeout: Optional[float] = None) -> SearchOutcome:
    """Run (or resume) the search in `run` to its end, then train its best architecture to the end
    (the final phase). Ctrl-C stops it cleanly: in-flight candidates are left unfinished in the logs
    and re-run on resume; an unfinished final training is run again."""
    cfg = run.config
    progress = progress or _Silent()
    timeout = candidate_timeout if candidate_timeout is not None else cfg["run"]["candidate_timeout"]
    data = load_data(cfg["data"])
    vectors_path = _prepare_vectors(run, cfg, data, progress)
    strategy = _strategy(cfg)
    reruns = replay(strategy, run)
    run.remove_stray_files()
    devices = resolve_devices(cfg, devices)
    sched = make_scheduler(backend or cfg["run"]["backend"], devices,
                           init_fn=worker_init, init_args=(data.cache_path, vectors_path),
                           candidate_timeout=timeout)
    interrupted = False
    try:
        lexical = prepare_lexical(run, data, progress)
        with sched:
            _SearchLoop(run, strategy, sched, progress, reruns, lexical).run_to_end()
            run_final(run, strategy, sched, progress, devices, lexical)
    except KeyboardInterrupt:
        interrupted = True
    return SearchOutcome(len(run.history.records), strategy.budget, interrupted, run.best(), run.final())


def lexical_payload(lexical: dict) -> dict:
    return {"folder": lexical["folder"], "residual": lexical["residual"]}


def prepare_lexical(run: Run, data, progress) -> Optional[dict]:
    """The search's lexical stage, fitted (or found in the cache) before the first candidate; its time and
    its own validation and test metrics are kept in the run's lexical.json (the time counts in the
    search's budget)."""
    from .lexical import LexicalSettings, cached_stage, lexical_split_metrics
    from .scheduler.devices import visible_cores

    lex = {**LEXICAL_DEFAULTS, "enabled": False, **(run.config.get("lexical") or {})}
    if not lex["enabled"]:
        return None
    residual = lex["mode"] == "residual"
    t0 = time.monotonic()
    settings = LexicalSettings(top_k=lex["top_k"], crossfit=2 if residual else 0)
    progress.note("lexical stage: TF-IDF uni+bigrams and a label tree (napkinXC), once per dataset and settings")
    stage = cached_stage(data, settings, threads=visible_cores(), log=progress.note)
    info = run.lexical()
    if not info or info.get("folder") != stage.folder:
        info = {"folder": stage.folder, "seconds": round(time.monotonic() - t0, 3),
                **lexical_split_metrics(stage, data)}
        run.set_lexical(info)
    m = info["valid"]
    progress.note(f"lexical stage alone: validation P@1 {100 * m['P@1']:.2f}  P@5 {100 * m['P@5']:.2f}")
    return {**info, "residual": residual}


def _prepare_vectors(run: Run, cfg: dict, data, progress) -> Optional[str]:
    """Pretrained word vectors, aligned to the vocabulary once and stored in the run for the workers;
    how much of the vocabulary they cover is kept beside them and shown at every start."""
    path = cfg["data"].get("vectors")
    if not path:
        return None
    out = os.path.join(run.path, "vectors.npy")
    info_path = os.path.join(run.path, "vectors.json")
    if not os.path.exists(out):
        from .data import load_word_vectors

        matrix, coverage = load_word_vectors(path, data.vocab, seed=cfg["data"]["seed"])
        tmp = out + ".tmp.npy"
        np.save(tmp, matrix.astype(np.float32))
        write_json_atomic(info_path, {"source": path, "coverage": coverage, "dim": int(matrix.shape[1])})
        os.replace(tmp, out)
    if os.path.exists(info_path):                    # (runs from before it was kept have none)
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        progress.note(f"word vectors {info['source']}: {100 * info['coverage']:.1f}% of the vocabulary found")
    return out
