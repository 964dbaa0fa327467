"""A run's phases, put together: the search (search_loop.py) until its budget or its time is spent,
then the final phase, the best architecture trained to the end (final.py has its settings), then the
ensemble step (ensemble.py). A
resumed run replays its logs through a fresh strategy (same seed, same calls, so the same state),
re-runs the candidates that were in flight when it stopped, and trains the final model unless it is
recorded already.

The device spec is parsed once, here or by the caller (scheduler.devices.parse_request); the
scheduler resolves it against the GPUs where its workers run and binds each worker to its device
and threads. The final training, alone, takes every core when no GPU is used.
"""
from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from typing import Optional

import numpy as np

from .candidate import train_candidate, worker_init
from .config import devices_text, resolve_shortlist, strategy_of
from .contract import CandidateTask, ParentWeights
from .ensemble import run_ensemble
from .evolution import Strategy, make_strategy
from .final import FINAL_MODEL_KEYS, FINAL_TRAIN_KEYS, final_settings, final_wins
from .model import ModelConfig
from .records import result_record
from .runs import Run, write_json_atomic
from .scheduler import Event, TaskResult, make_scheduler
from .scheduler.devices import DeviceRequest, parse_request, visible_cores
from .search_loop import SEED_STRIDE, SearchLoop, judge_of, lexical_part, replay, training_seed
from .train import TrainConfig

__all__ = ["run_search", "run_final", "final_threads", "load_data", "SearchOutcome"]


# ---- data, in the main process and in each worker -----------------------------------------------

def load_data(data_cfg: dict):
    from .data import load

    columns = {c: data_cfg[c] for c in ("text_column", "labels_column") if data_cfg.get(c) is not None}
    return load(data_cfg["dataset"], max_len=data_cfg["max_len"], min_count=data_cfg["min_count"],
                max_vocab=data_cfg["max_vocab"], valid=data_cfg["valid"], seed=data_cfg["seed"], **columns)


class _Silent:
    """Progress for a search nobody watches: every event is dropped."""

    def _drop(self, *args, **kwargs) -> None:
        return None

    started = progress = finished = note = ended = set_workers = _drop


# ---- the final phase: the best architecture trained to the end -----------------------------------

def final_threads(request: DeviceRequest) -> Optional[int]:
    """The final training's CPU threads: every core the workers shared when it trains on the CPU (it
    trains alone); None (its worker's) when the search uses GPUs."""
    return None if request.wants_cuda else visible_cores()


def run_final(run: Run, strategy: Strategy, sched, progress, threads: Optional[int] = None,
              lexical: Optional[dict] = None) -> Optional[dict]:
    """Train the search's best architecture with the final settings, starting from the candidate's
    weights wherever the two networks agree, record it in final.json and point best.json at it if it
    does at least as well as the candidate (`chosen`). Nothing to do when it is recorded already (a
    resumed search) or turned off. `threads`: see final_threads."""
    cfg = run.config
    best, done = strategy.best(), run.final()
    records = {r["id"]: r for r in run.history.records}
    if done is not None:   # recorded before a stop: best.json may not point at it yet
        if final_wins(done, records.get(done["of"], {})) and (run.best() or {}).get("id") != "final":
            run.set_best(done)
        return done
    if not cfg["final"]["enabled"] or best is None:
        return None
    elapsed = float(run.history.records[-1].get("elapsed") or 0.0)
    model, train = final_settings(cfg, elapsed, training_seed(cfg["search"]["seed"], SEED_STRIDE - 1),
                                  records.values())
    source = records[best.id]
    parent = ParentWeights(best.id, source["genotype"], source.get("model_dir")) if cfg["final"]["inherit"] else None
    task = CandidateTask(model=ModelConfig.from_dict({**model, "genotype": source["genotype"]}),
                         train=TrainConfig.from_dict(train), model_dir=run.final_dir(), save_above=-math.inf,
                         parent=parent, threads=threads, lexical=lexical_part(lexical, final=True))
    label = f"(#{best.id}) {best.genotype}"
    progress.note(f"training the best architecture (#{best.id}) to the end: width {model['width']}, "
                  f"at most {train['max_epochs']} epochs" + (f", {train['max_minutes']} min" if train["max_minutes"] else ""))
    sched.submit("final", train_candidate, task)
    progress.started("final", sched.running().get("final", "?"), label)
    res = _wait_for(sched, "final", progress)
    out = {**result_record(strategy.candidates[best.id], res, res.value, None, judge_of(lexical)), "id": "final",
           "of": best.id,
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


def run_search(run: Run, *, progress=None, backend: Optional[str] = None, devices=None,
               candidate_timeout: Optional[float] = None) -> SearchOutcome:
    """Run (or resume) the search in `run` to its end, then train its best architecture to the end
    (the final phase). Ctrl-C stops it cleanly: in-flight candidates are left unfinished in the logs
    and re-run on resume; an unfinished final training is run again. `devices`: a DeviceRequest, or
    a spec to parse (default: the run's saved one, else this machine's); the progress is told the
    workers' labels once the scheduler has placed them."""
    cfg = run.config
    progress = progress or _Silent()
    timeout = candidate_timeout if candidate_timeout is not None else cfg["run"]["candidate_timeout"]
    data = load_data(cfg["data"])
    resolve_shortlist(cfg, data.num_labels)
    vectors_path = _prepare_vectors(run, cfg, data, progress)
    strategy = strategy_of(cfg, make_strategy)
    reruns = replay(strategy, run)
    run.remove_stray_files()
    request = parse_request(devices or devices_text(cfg))
    sched = make_scheduler(backend or cfg["run"]["backend"], request,
                           init_fn=worker_init, init_args=(data.cache_path, vectors_path),
                           candidate_timeout=timeout)
    progress.set_workers(sched.devices)
    interrupted = False
    try:
        lexical = prepare_lexical(run, data, progress)
        with sched:
            SearchLoop(run, strategy, sched, progress, reruns, lexical).run_to_end()
            run_final(run, strategy, sched, progress, final_threads(request), lexical)
        run_ensemble(run, data, lexical, progress, "cuda" if request.wants_cuda else "cpu")
    except KeyboardInterrupt:
        interrupted = True
    return SearchOutcome(len(run.history.records), strategy.budget, interrupted, run.best(), run.final())


def prepare_lexical(run: Run, data, progress) -> Optional[dict]:
    """The search's lexical stage, fitted (or found in the cache) before the first candidate, and its
    serving stage where the run has one (`serves_refit`); their time and the stage's validation and
    test metrics (the serving stage's test metrics where there is one: the result carries it) are kept
    in the run's lexical.json (the time counts in the search's budget). None when the search has none."""
    from .lexical import LexicalSettings, TreeSettings, cached_stage, lexical_split_metrics

    lex = run.config["lexical"]
    if not lex["enabled"]:
        return None
    residual = lex["mode"] == "residual"
    t0 = time.monotonic()
    settings = LexicalSettings(tree=TreeSettings(ensemble=lex["trees"]), top_k=lex["top_k"],
                               crossfit=2 if residual else 0, ovr=lex["ovr"], shortlist=run.config["model"]["shortlist"])
    model = ("a label tree (napkinXC)" if settings.matcher_for(data.num_labels) == "tree" else "label centroids")
    progress.note(f"lexical stage: TF-IDF uni+bigrams, {model}" + (" and a one-vs-rest model (napkinXC)"
                  if settings.uses_ovr(data.num_labels) else "") + ", once per dataset and settings")
    stage = cached_stage(data, settings, threads=visible_cores(), log=progress.note)
    serving = None
    if serves_refit(run.config):
        progress.note("serving stage: the same, fitted on every training document, validation included")
        serving = cached_stage(data, settings, threads=visible_cores(), log=progress.note, serving=True)
    info = run.lexical()
    if not info or info.get("folder") != stage.folder or info.get("serving") != (serving and serving.folder):
        info = {"folder": stage.folder, "seconds": round(time.monotonic() - t0, 3),
                **lexical_split_metrics(stage, data)}
        if serving is not None:
            info.update(serving=serving.folder, selection_test=info["test"],
                        **lexical_split_metrics(serving, data, ("test",)))
        run.set_lexical(info)
    m = info["valid"]
    progress.note(f"lexical stage alone: validation P@1 {100 * m['P@1']:.2f}  P@5 {100 * m['P@5']:.2f}")
    return {**info, "residual": residual, "judge": "fused" if residual else lex.get("fitness", "fused"),
            "ranker": bool(lex.get("ranker"))}


def serves_refit(cfg: dict) -> bool:
    """Whether a run's result carries a serving stage: on, fusing (a residual network learned the
    search's stage's own logits) and without a shortlist (whose cost grows with the labels)."""
    lex = cfg["lexical"]
    return bool(lex["enabled"] and lex.get("refit") and lex["mode"] == "fuse" and not cfg["model"].get("shortlist"))


def _prepare_vectors(run: Run, cfg: dict, data, progress) -> Optional[str]:
    """The word vectors the networks start from (a file's, aligned to the vocabulary, or learned from
    the training texts: data.vectors "corpus"), made once and stored in the run for the workers; where
    they came from and how much of the vocabulary they cover is kept beside them and shown at every
    start."""
    from .data import wants_vectors

    path = cfg["data"]["vectors"]
    if not wants_vectors(path):
        return None
    out = os.path.join(run.path, "vectors.npy")
    info_path = os.path.join(run.path, "vectors.json")
    if not os.path.exists(out):
        from .data import word_vectors

        t0 = time.monotonic()
        matrix, coverage, said = word_vectors(path, data, cfg["model"]["emb_dim"], seed=cfg["data"]["seed"])
        tmp = out + ".tmp.npy"
        np.save(tmp, matrix.astype(np.float32))
        write_json_atomic(info_path, {"source": path, "coverage": coverage, "dim": int(matrix.shape[1]),
                                      "said": said, "seconds": round(time.monotonic() - t0, 3)})
        os.replace(tmp, out)
    if os.path.exists(info_path):                    # (runs from before it was kept have none)
        with open(info_path, encoding="utf-8") as f:
            info = json.load(f)
        said = info.get("said") or f"word vectors {info['source']}"
        progress.note(f"{said}: {info['dim']} dimensions, {100 * info['coverage']:.1f}% of the vocabulary")
    return out
