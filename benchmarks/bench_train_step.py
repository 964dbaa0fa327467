"""One training step of a preset built on our ops, beside the same network built from eager PyTorch ops.

    python -m pytest benchmarks/bench_train_step.py --benchmark-enable

Same weights, same batch (a real bucketed batch of debtags, 40 documents),
same optimizer (Adam + SparseAdam for the embedding): forward, BCE loss,
backward, optimizer step. `eager` uses ops.label_attention_reference (the
[B,L,N] score tensor, masked softmax, matmul: AttentionXML's MLAttention),
stack+mul+sum for the layer-sum, and the unfused head.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xmcnas_fast.data import iterate_batches, load
from xmcnas_fast.model import build_model, preset



@pytest.fixture(scope="module")
def debtags():
    torch.set_num_threads(2)
    return load("debtags")


@pytest.fixture(scope="module")
def batch(debtags):
    """A batch of typical length: the median padded length of an epoch's bucketed batches."""
    batches = list(iterate_batches(debtags.train, debtags.num_labels, 40, shuffle=True, seed=0))
    lengths = np.array([b.tokens.shape[1] for b in batches])
    return batches[int(np.argsort(lengths)[len(lengths) // 2])]


def make_step(model):
    sparse = [m.weight for m in model.modules() if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse]
    dense = [p for p in model.parameters() if p.requires_grad and all(p is not s for s in sparse)]
    opts = [torch.optim.Adam(dense, 1e-3)] + ([torch.optim.SparseAdam(sparse, 1e-3)] if sparse else [])

    def step(b):
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(model(b.tokens, b.mask), b.labels)
        loss.backward()
        for o in opts:
            o.step()
        return loss

    return step


@pytest.mark.parametrize("name", ["attentionxml", "discovered"])
@pytest.mark.parametrize("impl", ["ours", "eager"])
def test_train_step(benchmark, debtags, batch, name, impl):
    torch.manual_seed(0)
    model = build_model(preset(name), len(debtags.vocab), debtags.num_labels, use_kernels=impl == "ours")
    step = make_step(model)
    benchmark.group = f"train step: {name}, B=40, T={batch.tokens.shape[1]}, L={debtags.num_labels}"
    benchmark.extra_info["tokens"] = int(batch.mask.sum())
    loss = benchmark.pedantic(step, args=(batch,), rounds=15, iterations=1, warmup_rounds=2)
    assert torch.isfinite(loss)
