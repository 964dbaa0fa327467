"""The search's result as an ensemble: after the final training, up to K of the run's trained networks
(the result first, then the kept candidates by fitness) averaged, fused with the lexical stage, kept
only where the validation P@5 of the fused model gains at least `min_gain` (docs/design.md, "The
lexical stage and fusion").

`Ensemble` is a module whose forward gives the logit of its members' mean probability, so that
training code, evaluation, fusion and serving treat it as one network; its bundle keeps the first
member where a single network's bundle keeps it and the others under members/ (bundle.py).
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import torch
import torch.nn as nn

EPS = 1e-6


class Ensemble(nn.Module):
    """Networks whose probabilities are averaged: forward(tokens, mask) -> logit of the mean [B, L]."""

    def __init__(self, members: Sequence[nn.Module]):
        super().__init__()
        if not members:
            raise ValueError("an ensemble needs at least one network")
        self.members = nn.ModuleList(members)

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        p = sum(torch.sigmoid(m(tokens, mask).float()) for m in self.members) / len(self.members)
        return torch.logit(p.clamp(EPS, 1 - EPS))


def mean_logits(probs: Sequence[torch.Tensor]) -> torch.Tensor:
    """What an Ensemble of networks with these probabilities [n, L] gives: the logit of their mean."""
    return torch.logit((sum(probs) / len(probs)).clamp(EPS, 1 - EPS))


def select_members(probs: dict, first: str, lexical: tuple, truth, *, k: int, min_gain: float,
                   inv_prop=None) -> tuple:
    """Greedy forward selection on one split (the validation split): start from `first`, add the member
    of `probs` ({name: probabilities [n, L]}) whose mean with those chosen, fused with the lexical top
    lists (the weight grid re-chosen each time), gives the best P@5; stop at `k` members or when the
    best addition gains less than `min_gain`. Returns (names, fused metrics of the ensemble, of `first`
    alone) — the fused metrics hold the fusion chosen."""
    from .lexical.fusion import fused_metrics

    def score(names):
        return fused_metrics(mean_logits([probs[n] for n in names]), lexical, truth, inv_prop)

    chosen = [first]
    alone = best = score(chosen)
    while len(chosen) < k:
        tries = [(score(chosen + [n]), n) for n in probs if n not in chosen]
        if not tries:
            break
        m, name = max(tries, key=lambda t: t[0]["P@5"])
        if m["P@5"] < best["P@5"] + min_gain:
            break
        chosen.append(name)
        best = m
    return chosen, best, alone


def member_pool(run, result: dict) -> list:
    """(name, model_dir, fitness) of the networks an ensemble may take: the search's result first, then
    every other kept bundle of the run (the final model, the kept candidates), best fitness first."""
    records = [r for r in run.history.records if r.get("model_dir") and r.get("fitness") is not None]
    final = run.final()
    if final and final.get("model_dir") and final.get("fitness") is not None:
        records.append(final)
    others = sorted((r for r in records if r["id"] != result["id"] and os.path.isdir(r["model_dir"])),
                    key=lambda r: -r["fitness"])
    return [(_name(result), result["model_dir"], result["fitness"])] + \
        [(_name(r), r["model_dir"], r["fitness"]) for r in others]


def _name(record: dict) -> str:
    return "final" if record["id"] == "final" else f"cand-{record['id']}"


@torch.no_grad()
def split_probs(model: nn.Module, ds, num_labels: int, *, device, precision: str, max_len: Optional[int],
                batch_size: int = 500) -> torch.Tensor:
    """The network's probabilities [n, L] of a split, on `device`."""
    from .data import iterate_batches
    from .train import autocast

    model.eval()
    out = None
    for b in iterate_batches(ds, num_labels, batch_size, shuffle=False, max_len=max_len):
        b = b.to(device)
        with autocast(device, precision):
            p = torch.sigmoid(model(b.tokens, b.mask).float())
        if out is None:
            out = p.new_empty((len(ds), p.shape[1]))
        out[b.index.to(device)] = p
    return out


def run_ensemble(run, data, lexical: Optional[dict], progress, device="cpu") -> Optional[dict]:
    """The ensemble step of a search, after its final training: records ensemble.json (whether an
    ensemble was kept and what it tried) and, when kept, saves models/ensemble and points best.json at
    it. Nothing to do when the run's final.ensemble is below 2, without a lexical stage or with a
    residual one (a residual network is served with its own offset), over a shortlist (the selection
    scores every label of the validation split), or when recorded already."""
    from .bundle import load_bundle
    from .lexical.fusion import Fusion, LexicalLists, fused_metrics
    from .metrics import compute_metrics
    from .train import label_inv_propensity

    cfg = run.config
    k = int(cfg["final"]["ensemble"])
    done = run.ensemble()
    if done is not None:
        if done.get("chosen") and (run.best() or {}).get("id") != "ensemble":
            run.set_best(done)
        return done
    best = run.best()
    if k < 2 or not lexical or lexical.get("residual") or cfg["model"].get("shortlist") or not best \
            or not best.get("model_dir"):
        return None
    pool = member_pool(run, best)
    if len(pool) < 2:
        return None
    device = torch.device(device)
    lists = LexicalLists.from_stage(lexical["folder"], serving=lexical.get("serving"))
    inv_prop = label_inv_propensity(data)
    progress.note(f"ensemble: trying up to {k} of {len(pool)} trained networks with the lexical stage")
    bundles, valid = {}, {}
    for name, path, _ in pool:
        b = load_bundle(path, device=str(device))
        bundles[name] = b
        valid[name] = split_probs(b.model, data.valid, data.num_labels, device=device, precision=b.precision,
                                  max_len=b.max_len)
    first = pool[0][0]
    names, fused_valid, alone = select_members(valid, first, lists.valid, data.valid.labels, k=k,
                                               min_gain=float(cfg["final"]["ensemble_min_gain"]), inv_prop=inv_prop)
    record = {"id": "ensemble", "members": names, "tried": [n for n, _, _ in pool],
              "genotype": bundles[first].config["model"]["genotype"], "of": best["id"],
              "chosen": len(names) > 1, "fitness": fused_valid["P@5"], "fitness_alone": alone["P@5"]}
    if record["chosen"]:
        if lexical.get("ranker"):       # the final fusion, as a final training's: the weight grid or the ranker
            from .lexical.ranker import label_counts

            fused_valid = fused_metrics(mean_logits([valid[n] for n in names]), lists.valid, data.valid.labels,
                                        inv_prop, methods=("weighted", "ranker"),
                                        prior=label_counts(data.train.labels, data.num_labels))
        fusion = Fusion.from_dict(fused_valid["fusion"])
        test_probs = [split_probs(bundles[n].model, data.test, data.num_labels, device=device,
                                  precision=bundles[n].precision, max_len=bundles[n].max_len) for n in names]
        logits = mean_logits(test_probs)
        record["valid"] = compute_metrics(mean_logits([valid[n] for n in names]), data.valid.labels, inv_prop)
        record["test"] = compute_metrics(logits, data.test.labels, inv_prop)
        test = fused_metrics(logits, lists.test, data.test.labels, inv_prop, fusion)
        record["fused"] = {"valid": _without_fusion(fused_valid), "test": _without_fusion(test),
                           "fusion": fusion.to_dict()}
        out = os.path.join(run.models_dir, "ensemble")
        served = lexical.get("serving") or lexical["folder"]
        save_ensemble_bundle(out, [bundles[n] for n in names], data, served, fusion, record)
        record["model_dir"] = out
    run.set_ensemble(record)
    gain = 100 * (record["fitness"] - record["fitness_alone"])
    progress.note(f"ensemble of {', '.join(names)}: validation P@5 {100 * record['fitness']:.2f} ({gain:+.2f})"
                  + ("" if record["chosen"] else f"; no network added {100 * cfg['final']['ensemble_min_gain']:.2f} "
                     "or more: the result stays one network"))
    if record["chosen"]:
        run.set_best(record)
    return record


def _without_fusion(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if k not in ("fusion", "tried")}


def save_ensemble_bundle(out: str, members: list, data, lexical_folder: str, fusion, record: dict) -> str:
    """One bundle holding every member (bundle.save_bundle with `members`)."""
    from .bundle import save_bundle
    from .model import ModelConfig

    first = members[0]
    return save_bundle(out, first.model, ModelConfig.from_dict(first.config["model"]), data,
                       train_cfg=first.config.get("train"), record=record, lexical=lexical_folder, fusion=fusion,
                       members=[(ModelConfig.from_dict(m.config["model"]), m.model) for m in members[1:]])
