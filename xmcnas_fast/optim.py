"""AttentionXML's optimizers and gradient clipping, as the trainer uses them."""
from __future__ import annotations

import math
from collections import deque
from typing import Optional

import torch
import torch.nn as nn


class GradientClipper:
    """AttentionXML's clipping: clip to `factor` x the largest of the last 5 (bounded) gradient norms."""

    def __init__(self, factor: Optional[float]):
        self.factor = factor
        self.norms = deque([math.inf], maxlen=5)

    def __call__(self, params) -> float:
        if self.factor is None:
            return float("nan")
        max_norm = max(self.norms)
        total = float(nn.utils.clip_grad_norm_(params, max_norm * self.factor))
        self.norms.append(min(total, max_norm * 2.0, 1.0))
        return total


def optimizers(model: nn.Module, lr: float) -> tuple[list, list]:
    """AttentionXML's DenseSparseAdam, as two optimizers: Adam, and SparseAdam for sparse embedding rows
    (and a module's `sparse_parameters`: a shortlisted head's attention weights).
    Returns (the dense parameters, which are clipped; the optimizers)."""
    sparse_ids = {id(m.weight) for m in model.modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    sparse_ids |= {id(p) for m in model.modules() for p in getattr(m, "sparse_parameters", ())}
    params = [p for p in model.parameters() if p.requires_grad]
    dense = [p for p in params if id(p) not in sparse_ids]
    sparse = [p for p in params if id(p) in sparse_ids]
    return dense, [torch.optim.Adam(dense, lr=lr)] + ([torch.optim.SparseAdam(sparse, lr=lr)] if sparse else [])
