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


@pytest.mark.parametrize("impl", ["ours", "two steps"])
def test_train_step_thousands_of_labels(benchmark, impl, monkeypatch):
    """The demo's width-64 candidate `1:conv5<0 2:conv5<0` with 4,190 labels and 15-word texts (the shape
    of benchmarks/make_synthetic.py's set), one thread: the head's tail fused (relu_dropout_dot) against
    the two steps it replaces (the fused ReLU-dropout kernel, then the 64 -> 1 product)."""
    from xmcnas_fast import ops
    from xmcnas_fast.data.batching import Batch
    from xmcnas_fast.model import ModelConfig

    if impl == "two steps":
        monkeypatch.setitem(ops._KERNELS, ("relu_dropout_dot", "cpu"), False)
    torch.set_num_threads(1)
    torch.manual_seed(0)
    cfg = ModelConfig(genotype={"nodes": [["conv5", 0], ["conv5", 0]], "merge": "sum"}, emb_dim=64, width=64, fc=[64])
    model = build_model(cfg, 26_000, 4_190)
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(8, 23, (40,), generator=g)
    mask = torch.arange(22).unsqueeze(0) < lengths.unsqueeze(1)
    labels = torch.zeros(40, 4_190)
    labels[torch.arange(40).repeat_interleave(7), torch.randint(0, 4_190, (280,), generator=g)] = 1.0
    batch = Batch(tokens=torch.randint(1, 26_000, (40, 22), generator=g) * mask, mask=mask, labels=labels,
                  index=torch.arange(40))
    step = make_step(model)
    benchmark.group = "train step: width-64 candidate, B=40, T=22, L=4190, 1 thread"
    benchmark.extra_info["role"] = "ours" if impl == "ours" else "peer"
    loss = benchmark.pedantic(step, args=(batch,), rounds=15, iterations=1, warmup_rounds=2)
    assert torch.isfinite(loss)
