"""One candidate, trained in a worker: data, model, inherited weights, training, bundle.

What the search loop hands a worker is a payload (a dict of JSON values); what comes back is the
candidate's result record. This side knows nothing of the strategy or the run directory's logs:
the payload says where to save the bundle, which parent's weights to start from, and how short
the first run is and what figure it must reach to go on.
"""
from __future__ import annotations

import os
from typing import Optional

import numpy as np
import torch

from .model import ModelConfig, build_model, inherit_weights
from .space import Genotype
from .train import LexicalLists, TrainConfig, record_fitness, train_model


def worker_init(cache_path: str, vectors_path: Optional[str]):
    """Runs once per worker: map the tokenized dataset (and word vectors) from disk."""
    from .data import XMCData

    data = XMCData.from_cache(cache_path, mmap=True)
    vectors = np.load(vectors_path, mmap_mode="r") if vectors_path else None
    return {"data": data, "vectors": vectors}


def inherit_from(model, parent: Optional[dict]) -> Optional[dict]:
    """Start `model` from the weights of the parent the payload names, where the two agree.
    Returns what the history records: {"from": parent id, "parts": [...]} (parts empty when the
    parent's bundle is gone), or None when there is no parent to inherit from."""
    if not parent:
        return None
    weights = os.path.join(parent["model_dir"] or "", "weights.pt")
    if not parent.get("model_dir") or not os.path.isfile(weights):
        return {"from": parent["id"], "parts": []}
    state = torch.load(weights, map_location="cpu", weights_only=True)
    return {"from": parent["id"], "parts": inherit_weights(model, state, Genotype.from_dict(parent["genotype"]))}


def train_candidate(payload: dict, ctx) -> dict:
    """Train one candidate in a worker. Returns its result record; saves its bundle if its validation
    P@5 beats payload["save_above"].

    Optional payload keys: "parent" {id, genotype, model_dir}: inherit its weights; "short"
    {steps, promote_above}: train `steps` steps first and go on to the full budget only if the
    validation P@5 reached is at least `promote_above`; "lexical" {folder, residual}: fuse with that
    lexical stage (the fitness is the fused validation P@5; the bundle carries the stage)."""
    from .bundle import save_bundle

    data, vectors = ctx.shared["data"], ctx.shared["vectors"]
    mcfg = ModelConfig.from_dict(payload["model"])
    tcfg = TrainConfig.from_dict(payload["train"])
    tcfg.device = str(ctx.device)
    model = build_model(mcfg, len(data.vocab), data.num_labels,
                        vectors=None if vectors is None else np.asarray(vectors), seed=tcfg.seed)
    inherited = inherit_from(model, payload.get("parent"))
    short = payload.get("short") or {}
    threshold = short.get("promote_above")
    lexical = payload.get("lexical")
    lists = lexical_lists(ctx.shared, lexical) if lexical else None
    res = train_model(model, data, tcfg, report=ctx.report, should_stop=ctx.should_stop,
                      short_steps=short.get("steps"),
                      go_on=None if threshold is None else (lambda p5: p5 >= threshold), lexical=lists)
    rec = res.record
    if inherited is not None:
        rec["inherited"] = inherited
    fitness = record_fitness(rec)
    if res.state is not None and fitness is not None and fitness > payload["save_above"]:
        fusion = None
        if rec.get("fused"):
            from .lexical import Fusion

            fusion = Fusion.from_dict(rec["fused"]["fusion"])
        save_bundle(payload["model_dir"], model, mcfg, data, train_cfg=tcfg.to_dict(), record=rec,
                    lexical=lexical["folder"] if rec.get("fused") else None, fusion=fusion)
        rec["model_dir"] = payload["model_dir"]
    return rec


def lexical_lists(shared: dict, lexical: dict) -> LexicalLists:
    """The lexical stage's top lists, read once per worker."""
    key = ("lexical", lexical["folder"], bool(lexical.get("residual")))
    if key not in shared:
        shared[key] = LexicalLists.from_stage(lexical["folder"], residual=bool(lexical.get("residual")))
    return shared[key]
