"""P@k, nDCG@k and PSP@k, streamed over batches through ops.topk_metrics.

Definitions are pyxclib's: P@k = hits in the top k / k; nDCG@k = DCG@k over
the ideal DCG of min(k, #true labels); PSP@k = propensity-weighted hits in the
top k over the best achievable propensity-weighted hits in k, each summed over
the documents (Jain et al. 2016 propensities, A=0.55, B=1.5). A true label
the model cannot score (unseen in training) is never hit but still counts in
the ideal DCG and the PSP denominator. Values are fractions in [0, 1].
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import scipy.sparse as sp
import torch

from . import ops

KS = (1, 3, 5)
METRIC_NAMES = tuple(f"{m}@{k}" for m in ("P", "nDCG", "PSP") for k in KS)


def inv_propensity(label_counts: np.ndarray, n_docs: int, A: float = 0.55, B: float = 1.5) -> np.ndarray:
    """Jain et al. (2016): 1/p_l = 1 + C (N_l + B)^-A with C = (log N - 1)(B + 1)^A."""
    C = (np.log(n_docs) - 1.0) * (B + 1.0) ** A
    return 1.0 + C * (np.asarray(label_counts, dtype=np.float64) + B) ** (-A)


class MetricAccumulator:
    """Feed it batches of scores and their truth rows; read P@k, nDCG@k, PSP@k at the end.

    The scores stay on their device: only the [4, k] sums of each batch come back.
    """

    def __init__(self, k: int = max(KS), inv_prop: Optional[np.ndarray] = None, ks: Sequence[int] = KS):
        self.k, self.ks = k, tuple(ks)
        self.inv_prop = None if inv_prop is None else torch.as_tensor(np.asarray(inv_prop, dtype=np.float64))
        self._ip_dev: dict = {}
        self.sums = torch.zeros(4, k, dtype=torch.float64)
        self.rows = 0

    def _inv_prop_on(self, device):
        if self.inv_prop is None:
            return None
        if device not in self._ip_dev:
            self._ip_dev[device] = self.inv_prop.to(device)
        return self._ip_dev[device]

    def update(self, scores: torch.Tensor, truth: sp.csr_matrix, slots: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Add a batch: scores [B, L], truth a CSR [B, C] (C may exceed L: unseen labels). With `slots`
        (label ids [B, K], -1 padding), scores [B, K] are those of a shortlist: labels outside it are
        never hit, and still count in the denominators.

        Returns the batch's top-k label ids [B, k].
        """
        if truth.shape[0] != scores.shape[0]:
            raise ValueError(f"{scores.shape[0]} score rows for {truth.shape[0]} truth rows")
        dev = scores.device
        indptr = torch.from_numpy(truth.indptr.astype(np.int64)).to(dev)
        indices = torch.from_numpy(truth.indices.astype(np.int64)).to(dev)
        if slots is not None:
            k = min(self.k, scores.shape[1])
            sums, topk = shortlist_metric_sums(scores.detach(), slots.to(dev), indptr, indices, k,
                                               self._inv_prop_on(dev))
            self.sums[:, :k] += sums.cpu()
            self.rows += scores.shape[0]
            return topk
        k = min(self.k, scores.shape[1])
        ip = self._inv_prop_on(dev)
        if ip is None and truth.shape[1] > scores.shape[1]:
            # labels the scores cannot rank (unseen in training) still count as true labels;
            # the op needs to know how many label ids there are: the PSP sums are not reported
            ip = torch.ones(truth.shape[1], dtype=torch.float64, device=dev)
        sums, topk = ops.topk_metrics(scores.detach(), indptr, indices, k, ip)
        self.sums[:, :k] += sums.cpu()
        self.rows += scores.shape[0]
        return topk

    def result(self) -> dict:
        out = {}
        n = max(self.rows, 1)
        for k in self.ks:
            if k > self.k:
                continue
            out[f"P@{k}"] = float(self.sums[0, k - 1]) / (k * n)
            out[f"nDCG@{k}"] = float(self.sums[1, k - 1]) / n
            if self.inv_prop is not None:
                den = float(self.sums[3, k - 1])
                out[f"PSP@{k}"] = float(self.sums[2, k - 1]) / den if den > 0 else 0.0
        return out


def compute_metrics(scores, truth: sp.csr_matrix, inv_prop: Optional[np.ndarray] = None,
                    k: int = max(KS), batch_rows: int = 4096, slots=None) -> dict:
    """Metrics of a whole score matrix (numpy or torch), in row chunks; with `slots` (label ids [n, K],
    -1 padding), of the scores [n, K] of those labels."""
    scores = torch.as_tensor(scores)
    slots = None if slots is None else torch.as_tensor(np.asarray(slots) if not torch.is_tensor(slots) else slots)
    acc = MetricAccumulator(k, inv_prop)
    for s in range(0, scores.shape[0], batch_rows):
        acc.update(scores[s:s + batch_rows], truth[s:s + batch_rows],
                   None if slots is None else slots[s:s + batch_rows])
    return acc.result()


def shortlist_metric_sums(scores: torch.Tensor, slots: torch.Tensor, indptr: torch.Tensor, indices: torch.Tensor,
                          k: int, inv_prop: Optional[torch.Tensor] = None) -> tuple:
    """ops.topk_metrics' sums [4, k] (hits, nDCG, PSP numerator and denominator, each cumulative over the
    ranks) and top-k label ids [B, k] (-1 where the shortlist is shorter), of scores [B, K] of the labels
    `slots` [B, K] (-1: padding, never ranked): the denominators count every true label of the CSR truth,
    the ones outside the shortlist included. Equal scores rank in slot order (a ranked list's own order:
    the lexical stage's probabilities saturate at 1 and tie), never as topk happens to leave them. Only
    [B, K] and [B, k] tensors: no [B, L]."""
    dev = scores.device
    B, K = scores.shape
    s = scores.float().masked_fill(slots < 0, float("-inf"))
    top_pos = torch.sort(s, dim=1, descending=True, stable=True).indices[:, :k]   # [B, k]
    top = slots.long().gather(1, top_pos)
    top = torch.where(torch.isfinite(s.gather(1, top_pos)), top, torch.full_like(top, -1))
    counts = indptr[1:] - indptr[:-1]
    rows = torch.repeat_interleave(torch.arange(B, device=dev), counts)
    width = int(max(int(indices.max()) + 1 if indices.numel() else 1, int(top.max()) + 1 if top.numel() else 1))
    keys = torch.sort(rows * width + indices.long()).values
    q = torch.arange(B, device=dev).unsqueeze(1) * width + top.clamp(min=0)
    pos = torch.searchsorted(keys, q).clamp(max=max(keys.numel() - 1, 0))
    hit = ((keys[pos] == q) & (top >= 0)).to(torch.float64) if keys.numel() else         torch.zeros(B, k, dtype=torch.float64, device=dev)
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64, device=dev) + 2.0)
    dcg = (hit * disc).cumsum(1)
    ideal = disc.cumsum(0)[torch.minimum(torch.arange(k, device=dev).unsqueeze(0),
                                         counts.unsqueeze(1) - 1).clamp(min=0)]
    ndcg = torch.where(counts.unsqueeze(1) > 0, dcg / ideal, torch.zeros_like(dcg))
    sums = torch.zeros(4, k, dtype=torch.float64, device=dev)
    sums[0] = hit.cumsum(1).sum(0)
    sums[1] = ndcg.sum(0)
    if inv_prop is not None:
        ip = inv_prop.to(dev, torch.float64)
        sums[2] = (hit * ip[top.clamp(min=0)]).cumsum(1).sum(0)
        # the best k propensity-weighted hits of each row: its true labels' inverse propensities, sorted
        most = int(counts.max()) if B else 0
        col = torch.arange(indices.numel(), device=dev) - indptr[:-1].repeat_interleave(counts)
        true_ip = torch.zeros(B, max(most, k), dtype=torch.float64, device=dev)
        true_ip[rows, col] = ip[indices.long()]
        sums[3] = torch.sort(true_ip, dim=1, descending=True).values[:, :k].cumsum(1).sum(0)
    return sums, top


def format_metrics(m: dict, names: Sequence[str] = METRIC_NAMES) -> str:
    """'P@1 87.95  P@3 62.49 ...' (percent)."""
    return "  ".join(f"{n} {100 * m[n]:.2f}" for n in names if n in m)
