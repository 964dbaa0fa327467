"""The search loop: the one place where evolution, scheduler and run directory meet.

It asks the strategy for candidates, hands them to the scheduler, records
every finished one in the run directory (before telling the strategy), and
feeds the result back. A resumed search replays its logs through a fresh
strategy (same seed, same calls, so the same state) and re-runs the
candidates that were in flight when it stopped.
"""
from __future__ import annotations

import math
import os
import time
from collections import deque
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .evolution import Candidate, RandomSearch, make_strategy
from .model import ModelConfig, build_model
from .runs import Run, RunError
from .scheduler import Event, TaskResult, make_scheduler
from .space import DEFAULT_MAX_DEPTH, Genotype
from .train import TrainConfig, train_model

CONFIG_VERSION = 1

# Budgets: starting points for every knob (each is also a flag).
BUDGETS = {
    # 16 candidates: about 6 minutes on a 2-core CPU with the bundled debtags data (at most 10)
    "demo": {
        "search": {"population": 6, "cycles": 10, "sample": 3, "max_depth": 4},
        "model": {"emb_dim": 64, "width": 64, "fc": [64]},
        # no early stop inside the 2 epochs (11 evaluations): many networks sit on the label-prior
        # plateau (validation P@5 ~25.5) for the first 500-900 steps before P@5 rises, and a short
        # patience stopped them there, so the search ranked them by when they took off
        "train": {"max_epochs": 2, "max_minutes": 0.8, "eval_every": 100, "patience": 50, "max_len": 64,
                  "eval_batch_size": 500},
        "data": {"valid": 1000, "max_len": 64},
    },
    # the paper's setting (XMC-NAS, EURLex-4K): P=20, C=50, S=10, up to 30 epochs, width 512
    "paper": {
        "search": {"population": 20, "cycles": 50, "sample": 10, "max_depth": 6},
        "model": {"emb_dim": 300, "width": 512, "fc": [256]},
        "train": {"max_epochs": 30, "max_minutes": None, "eval_every": 100, "patience": 50, "max_len": 500},
        "data": {"valid": 200, "max_len": 500},
    },
}


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
                   **b["search"]},
        "model": {**ModelConfig().to_dict(), "genotype": None, **b["model"]},
        "train": {**TrainConfig().to_dict(), **b["train"]},
        "run": {"backend": "local", "devices": None, "candidate_timeout": None, "keep_models": 3},
    }
    for section, values in (overrides or {}).items():
        for k, v in values.items():
            if k not in cfg[section]:
                raise ValueError(f"unknown setting {section}.{k}")
            cfg[section][k] = v
    return cfg


# ---- data, in the main process and in each worker -----------------------------------------------

def load_data(data_cfg: dict):
    from .data import load

    return load(data_cfg["dataset"], max_len=data_cfg["max_len"], min_count=data_cfg["min_count"],
                max_vocab=data_cfg["max_vocab"], valid=data_cfg["valid"], seed=data_cfg["seed"])


def _worker_init(cache_path: str, vectors_path: Optional[str]):
    """Runs once per worker: map the tokenized dataset (and word vectors) from disk."""
    from .data import XMCData

    data = XMCData.from_cache(cache_path, mmap=True)
    vectors = np.load(vectors_path, mmap_mode="r") if vectors_path else None
    return {"data": data, "vectors": vectors}


def train_candidate(payload: dict, ctx) -> dict:
    """Train one candidate in a worker. Returns its result record; saves its bundle if it is among the best."""
    from .bundle import save_bundle

    data, vectors = ctx.shared["data"], ctx.shared["vectors"]
    mcfg = ModelConfig.from_dict(payload["model"])
    tcfg = TrainConfig.from_dict(payload["train"])
    tcfg.device = str(ctx.device)
    model = build_model(mcfg, len(data.vocab), data.num_labels,
                        vectors=None if vectors is None else np.asarray(vectors), seed=tcfg.seed)
    res = train_model(model, data, tcfg, report=ctx.report, should_stop=ctx.should_stop)
    rec = res.record
    fitness = (rec.get("valid") or {}).get("P@5")
    if res.state is not None and fitness is not None and fitness > payload["save_above"]:
        save_bundle(payload["model_dir"], model, mcfg, data, train_cfg=tcfg.to_dict(), record=rec)
        rec["model_dir"] = payload["model_dir"]
    return rec


# ---- the loop -------------------------------------------------------------------------------------

def _strategy(cfg: dict) -> RandomSearch:
    s = cfg["search"]
    constraint = (s["constraint"], 0) if s["constraint"] else None
    return make_strategy(s["strategy"], population_size=s["population"], cycles=s["cycles"],
                         sample_size=s["sample"], max_depth=s["max_depth"], seed=s["seed"],
                         constraint=constraint, constraint_fraction=s["constraint_fraction"])


def replay(strategy: RandomSearch, run: Run) -> list[Candidate]:
    """Bring a fresh strategy to the state the run's logs describe; return the unfinished candidates."""
    results = {r["id"]: r for r in run.history.records}
    order = [r["id"] for r in run.history.records]
    reported = 0
    for p in run.proposals.records:
        while reported < min(p["after_reports"], len(order)):
            strategy.report(order[reported], results[order[reported]]["fitness"])
            reported += 1
        c = strategy.propose()
        if c is None or c.id != p["id"] or c.genotype.hash() != p["hash"]:
            raise RunError(f"{run.proposals.path}: replaying the search diverged at candidate {p['id']} "
                           f"(was the configuration or the code changed?)")
    for rid in order[reported:]:
        strategy.report(rid, results[rid]["fitness"])
    return [strategy.candidates[p["id"]] for p in run.unfinished_proposals()]


def _proposal_record(c: Candidate, after_reports: int) -> dict:
    return {"id": c.id, "hash": c.genotype.hash(), "genotype": c.genotype.to_dict(), "parent": c.parent,
            "mutation": c.mutation, "constrained": c.constrained, "reused_from": c.reused_from,
            "after_reports": after_reports, "time": time.time()}


def _result_record(c: Candidate, res: Optional[TaskResult], rec: Optional[dict], prior: Optional[dict]) -> dict:
    base = {"id": c.id, "hash": c.genotype.hash(), "genotype": c.genotype.to_dict(),
            "depth": c.genotype.depth, "parent": c.parent, "mutation": c.mutation,
            "constrained": c.constrained, "reused_from": c.reused_from}
    if prior is not None:  # the same network was trained before: its result, not a new training
        keep = ("status", "error", "valid", "test", "layer_weights", "params", "epochs", "steps")
        return {**base, **{k: prior.get(k) for k in keep}, "fitness": prior.get("fitness"),
                "seconds": 0.0, "device": None, "attempts": 0, "finished": time.time()}
    out = {**base, "status": res.status, "error": res.error, "device": res.device,
           "attempts": res.attempts, "seconds": round(res.seconds, 3), "finished": time.time()}
    if res.status == "ok" and isinstance(rec, dict):
        out.update({k: v for k, v in rec.items() if k not in ("status", "error", "device", "seconds")})
        out["status"], out["error"] = rec["status"], rec.get("error")
        out["train_seconds"] = rec.get("seconds")
    valid = out.get("valid") or {}
    ok = out["status"] in ("ok", "stopped") and valid.get("P@5") is not None
    out["fitness"] = valid["P@5"] if ok else None
    return _json_safe(out)


def _json_safe(x):
    if isinstance(x, float):
        return None if math.isnan(x) or math.isinf(x) else x
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_json_safe(v) for v in x]
    return x


@dataclass
class SearchOutcome:
    finished: int
    total: int
    interrupted: bool
    best: Optional[dict]


def run_search(run: Run, *, progress=None, backend: Optional[str] = None, devices: Optional[str] = None,
               candidate_timeout: Optional[float] = None) -> SearchOutcome:
    """Run (or resume) the search in `run` to its end. Ctrl-C stops it cleanly: in-flight candidates
    are left unfinished in the logs and re-run on resume."""
    cfg = run.config
    backend = backend or cfg["run"]["backend"]
    devices = resolve_devices(cfg, devices)
    timeout = candidate_timeout if candidate_timeout is not None else cfg["run"]["candidate_timeout"]
    data = load_data(cfg["data"])
    vectors_path = _prepare_vectors(run, cfg, data)
    strategy = _strategy(cfg)
    reruns = deque(replay(strategy, run))
    records = {r["id"]: r for r in run.history.records}
    keep = int(cfg["run"]["keep_models"])
    model_cfg = dict(cfg["model"])
    labels: dict[int, str] = {}

    def save_threshold() -> float:
        f = sorted((r["fitness"] for r in records.values() if r.get("fitness") is not None and r.get("model_dir")),
                   reverse=True)
        return f[keep - 1] if len(f) >= keep else -math.inf

    def finish(c: Candidate, res: Optional[TaskResult], rec: Optional[dict]):
        prior = records.get(c.reused_from) if c.reused_from is not None else None
        out = _result_record(c, res, rec, prior)
        run.history.append(out)                      # recorded first: a crash after this loses nothing
        records[c.id] = out
        strategy.report(c.id, out["fitness"])
        best = max((r for r in records.values() if r.get("fitness") is not None),
                   key=lambda r: r["fitness"], default=None)
        ranked = sorted((r for r in records.values() if r.get("model_dir") and r.get("fitness") is not None),
                        key=lambda r: r["fitness"], reverse=True)[:keep]
        run.keep_models({r["id"] for r in ranked})
        if best is not None and best.get("model_dir"):
            run.set_best(best)
        if progress:
            pop = getattr(strategy, "population", strategy.history)
            progress.finished(c.id, out.get("device") or "-", out["status"], out["fitness"],
                              out.get("seconds") or 0.0, labels.get(c.id, str(c.genotype)),
                              population=[m.fitness for m in pop])

    sched = make_scheduler(backend, devices, init_fn=_worker_init, init_args=(data.cache_path, vectors_path),
                           candidate_timeout=timeout)
    in_flight: dict[str, Candidate] = {}
    interrupted = False
    try:
        with sched:
            while not strategy.done:
                while sched.free_slots() > 0:
                    if reruns:
                        c = reruns.popleft()
                    else:
                        c = strategy.propose()
                        if c is None:
                            break
                        run.proposals.append(_proposal_record(c, len(strategy.history)))
                    labels[c.id] = str(c.genotype)
                    if c.reused_from is not None:
                        finish(c, None, None)
                        continue
                    payload = {"model": {**model_cfg, "genotype": c.genotype.to_dict()},
                               "train": {**cfg["train"], "seed": cfg["search"]["seed"] * 100003 + c.id},
                               "model_dir": run.model_dir(c.id), "save_above": save_threshold()}
                    sched.submit(str(c.id), train_candidate, payload)
                    in_flight[str(c.id)] = c
                    if progress:
                        progress.started(c.id, sched.running().get(str(c.id), "?"), labels[c.id])
                if not in_flight and not strategy.done:
                    last = run.history.records[-1].get("error") if run.history.records else None
                    raise RuntimeError("the search cannot go on: no candidate is running and none can start"
                                       + (f" (last error: {last})" if last else ""))
                for item in sched.poll(timeout=0.5):
                    if isinstance(item, Event):
                        if progress:
                            progress.progress(int(item.task_id), item.device, item.data)
                        continue
                    c = in_flight.pop(item.task_id)
                    finish(c, item, item.value)
    except KeyboardInterrupt:
        interrupted = True
    best = run.best()
    return SearchOutcome(len(run.history.records), strategy.budget, interrupted, best)


def _prepare_vectors(run: Run, cfg: dict, data) -> Optional[str]:
    """Pretrained word vectors, aligned to the vocabulary once and stored in the run for the workers."""
    path = cfg["data"].get("vectors")
    if not path:
        return None
    out = os.path.join(run.path, "vectors.npy")
    if not os.path.exists(out):
        from .data import load_word_vectors

        matrix, coverage = load_word_vectors(path, data.vocab, seed=cfg["data"]["seed"])
        tmp = out + ".tmp.npy"
        np.save(tmp, matrix.astype(np.float32))
        os.replace(tmp, out)
    return out
