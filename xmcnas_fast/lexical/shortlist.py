"""A shortlist per document: the K labels a shortlisted head scores, from the lexical stage's candidate
model, its label tree or above a label count its label centroids (docs/design.md, "Extreme label spaces").

The stage keeps each split's shortlist (`LexicalStage.split_shortlist`: the model's best first, -1
padding; the training split's cross-fitted below that label count, so that its negatives are the ones a
tree that never saw the document proposes, and above it from the centroids themselves). While training, every true label is forced in (`force_positives`),
replacing the lowest-ranked candidates that are not true labels. Nothing here holds a [B, L] array:
truth rows stay CSR, scores and targets are [B, K], fusion works slot by slot.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import scipy.sparse as sp
import torch

#: label count above which heads score a shortlist, and its size (the command line's defaults)
SHORTLIST_ABOVE = 50_000
SHORTLIST_K = 1_000


def shortlist_size(k: int, above: Optional[int], num_labels: int) -> int:
    """The shortlist a network of `num_labels` labels scores: k when there are more labels than `above`
    (None: never), else 0 (every label)."""
    return int(k) if k and above is not None and num_labels > above else 0


def _hits(ids: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """bool [n, K]: which slots hold one of their row's true labels."""
    ids = np.asarray(ids)
    truth = truth.tocsr()
    width = max(int(truth.shape[1]), int(ids.max(initial=0)) + 1)
    rows = np.repeat(np.arange(truth.shape[0], dtype=np.int64), np.diff(truth.indptr))
    keys = np.sort(rows * width + truth.indices.astype(np.int64))
    q = np.arange(ids.shape[0], dtype=np.int64)[:, None] * width + ids.astype(np.int64)
    pos = np.searchsorted(keys, q).clip(max=max(len(keys) - 1, 0))
    return (ids >= 0) & (keys[pos] == q) if len(keys) else np.zeros(ids.shape, dtype=bool)


def shortlist_recall(ids: np.ndarray, truth: sp.csr_matrix, chunk: int = 20_000) -> float:
    """The share of the true labels (every one, those the model never saw included) in the shortlists."""
    total = truth.nnz
    if not total:
        return float("nan")
    found = sum(int(_hits(ids[s:s + chunk], truth[s:s + chunk]).sum()) for s in range(0, len(ids), chunk))
    return found / total


def force_positives(ids: np.ndarray, truth: sp.csr_matrix, num_labels: int) -> np.ndarray:
    """int64 [B, K]: each row's shortlist with its true labels (those below num_labels) put in, in place
    of the lowest-ranked candidates that are not true labels; a row with more true labels than K keeps
    K of them. -1 padding stays where nothing replaced it."""
    out = np.array(ids, dtype=np.int64)
    hit = _hits(out, truth)
    K = out.shape[1]
    for r in range(out.shape[0]):
        true = truth.indices[truth.indptr[r]:truth.indptr[r + 1]]
        true = true[true < num_labels]
        missing = np.setdiff1d(true, out[r][hit[r]], assume_unique=False)
        if not len(missing):
            continue
        free = np.flatnonzero(~hit[r])[::-1]                 # lowest-ranked first (padding is lowest)
        take = min(len(missing), len(free), K)
        out[r, free[:take]] = missing[:take]
    return out


def slot_targets(ids: np.ndarray, truth: sp.csr_matrix) -> np.ndarray:
    """float32 [B, K]: 1 where a slot holds a true label of its row."""
    return _hits(ids, truth).astype(np.float32)


def slot_lexical(lex_ids, lex_probs, slots: torch.Tensor, rows: int = 256) -> tuple:
    """The lexical top lists [B, k] seen from the shortlist's slots [B, K]: (p_lex, listed), both float
    [B, K] on the slots' device, for `Fusion.fuse` (a label outside the top list: p_lex 0, not listed)."""
    ids = torch.as_tensor(np.asarray(lex_ids), device=slots.device).long()
    probs = torch.as_tensor(np.asarray(lex_probs), device=slots.device).float()
    p_lex = torch.zeros(slots.shape, device=slots.device)
    listed = torch.zeros(slots.shape, device=slots.device)
    for a in range(0, slots.shape[0], rows):                # [rows, K, k] at a time
        s = slots[a:a + rows].long()
        same = (s.unsqueeze(2) == ids[a:a + rows].unsqueeze(1)) & (s >= 0).unsqueeze(2)
        listed[a:a + rows] = same.any(2).float()
        p_lex[a:a + rows] = (same.float() * probs[a:a + rows].unsqueeze(1)).amax(2)
    return p_lex, listed


def shortlist_fused_metrics(logits: torch.Tensor, slots: torch.Tensor, lexical: tuple, truth, inv_prop,
                            fusion=None) -> dict:
    """Metrics of shortlist logits [n, K] fused with the lexical top lists, slot by slot, and the fusion
    used (chosen here on the weight grid when None): fusion.fused_metrics over a shortlist."""
    from ..metrics import compute_metrics
    from .fusion import WEIGHTS, Fusion

    ids, probs = lexical
    if len(ids) != logits.shape[0]:
        raise ValueError(f"lexical top lists for {len(ids)} documents, the split has {logits.shape[0]}")
    p_lex, listed = slot_lexical(ids, probs, slots)
    candidates = [fusion] if fusion is not None else [Fusion("weighted", w=w) for w in WEIGHTS]
    best, best_m = None, None
    for f in candidates:
        if f.method == "learned" or f.method == "residual":
            raise ValueError(f"the {f.method} fusion is not available over a shortlist (weighted only)")
        scores = f.fuse(logits, p_lex, listed).masked_fill(slots < 0, float("-inf"))
        m = compute_metrics(scores, truth, inv_prop, slots=slots)
        if best_m is None or m["P@5"] > best_m["P@5"] + 1e-12:
            best, best_m = f, m
    return {**best_m, "fusion": best.to_dict()}
