"""One candidate, trained in a worker: data, model, inherited weights, training, bundle.

The search loop hands a worker a `CandidateTask` and gets back a `CandidateResult` (contract.py).
This side knows nothing of the strategy or the run directory's logs: the task says where to save
the bundle, which parent's weights to start from, and how short the first run is and what figure
it must reach to go on. The worker is bound to its device and threads before any task runs
(scheduler.devices.bind); the device comes with the task's context.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .contract import CandidateResult, CandidateTask, LexicalPart, ParentWeights
from .fitness import fitness
from .model import build_model, inherit_weights
from .space import Genotype
from .train import LexicalLists, train_model


def worker_init(cache_path: str, vectors_path: Optional[str]):
    """Runs once per worker: map the tokenized dataset (and word vectors) from disk."""
    from .data import XMCData

    data = XMCData.from_cache(cache_path, mmap=True)
    vectors = np.load(vectors_path, mmap_mode="r") if vectors_path else None
    return {"data": data, "vectors": vectors}


def inherit_from(model, parent: Optional[ParentWeights]) -> Optional[dict]:
    """Start `model` from the weights of `parent`, where the two agree. Returns what the history
    records: {"from": parent id, "parts": [...]} (parts empty when the parent's bundle is gone), or
    None when there is no parent to inherit from."""
    if parent is None:
        return None
    weights = os.path.join(parent.model_dir or "", "weights.pt")
    if not parent.model_dir or not os.path.isfile(weights):
        return {"from": parent.id, "parts": []}
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {"from": parent.id, "parts": inherit_weights(model, state, Genotype.from_dict(parent.genotype))}


def train_candidate(task: CandidateTask, ctx) -> CandidateResult:
    """Train one candidate in a worker (the scheduler's task function). Saves its bundle if its
    fitness beats task.save_above; with task.lexical, fused with that lexical stage (the fitness is
    the fused model's, or the network's own where task.lexical.judge says so, and the bundle carries
    the stage)."""
    from .bundle import save_bundle

    data, vectors = ctx.shared["data"], ctx.shared["vectors"]
    model = build_model(task.model, len(data.vocab), data.num_labels,
                        vectors=None if vectors is None else np.asarray(vectors), seed=task.train.seed)
    inherited = inherit_from(model, task.parent)
    short = task.short
    threshold = None if short is None else short.promote_above
    lists = lexical_lists(ctx.shared, task.lexical) if task.lexical else None
    res = train_model(model, data, task.train, device=ctx.device, threads=task.threads,
                      on_progress=ctx.report, should_stop=ctx.should_stop,
                      short_steps=None if short is None else short.steps,
                      go_on=None if threshold is None else (lambda figure: figure >= threshold), lexical=lists)
    result = CandidateResult.from_training(res.record, inherited)
    figure = fitness(res.record, task.lexical.judge if task.lexical else "fused")
    if res.state is not None and figure is not None and figure > task.save_above:
        fusion = None
        if result.fused:
            from .lexical import Fusion

            fusion = Fusion.from_dict(result.fused["fusion"])
        save_bundle(task.model_dir, model, task.model, data, train_cfg=task.train.to_dict(),
                    record=result.to_dict(), lexical=task.lexical.served if result.fused else None, fusion=fusion)
        result.model_dir = task.model_dir
    return result


def lexical_lists(shared: dict, lexical: LexicalPart) -> LexicalLists:
    """The lexical stage's top lists, read once per worker."""
    key = ("lexical", lexical.folder, lexical.residual, lexical.serving, lexical.judge, lexical.rank)
    if key not in shared:
        shared[key] = LexicalLists.from_stage(lexical.folder, residual=lexical.residual, serving=lexical.serving,
                                              judge=lexical.judge, rank=lexical.rank)
    return shared[key]
