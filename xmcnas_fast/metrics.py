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

    def update(self, scores: torch.Tensor, truth: sp.csr_matrix) -> torch.Tensor:
        """Add a batch: scores [B, L], truth a CSR [B, C] (C may exceed L: unseen labels).

        Returns the batch's top-k label ids [B, k].
        """
        if truth.shape[0] != scores.shape[0]:
            raise ValueError(f"{scores.shape[0]} score rows for {truth.shape[0]} truth rows")
        dev = scores.device
        indptr = torch.from_numpy(truth.indptr.astype(np.int64)).to(dev)
        indices = torch.from_numpy(truth.indices.astype(np.int64)).to(dev)
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
                    k: int = max(KS), batch_rows: int = 4096) -> dict:
    """Metrics of a whole score matrix (numpy or torch), in row chunks."""
    scores = torch.as_tensor(scores)
    acc = MetricAccumulator(k, inv_prop)
    for s in range(0, scores.shape[0], batch_rows):
        acc.update(scores[s:s + batch_rows], truth[s:s + batch_rows])
    return acc.result()


def format_metrics(m: dict, names: Sequence[str] = METRIC_NAMES) -> str:
    """'P@1 87.95  P@3 62.49 ...' (percent)."""
    return "  ".join(f"{n} {100 * m[n]:.2f}" for n in names if n in m)
