"""One training step of a preset built on our ops, beside the same network built from eager PyTorch ops.

    python -m pytest benchmarks/bench_train_step.py --benchmark-enable

Same weights, same batch (a real bucketed batch of debtags, 40 documents),
same optimizer (Adam + SparseAdam for the embedding): forward, BCE loss,
backward, optimizer step. `eager` uses ops.label_attention_reference (the
[B,L,N] score tensor, masked softmax, matmul: AttentionXML's MLAttention),
stack+mul+sum for the layer-sum, and the unfused head.

Short texts (-k short): the demo's width-64 network at N = 16, L = 4,190, a
training step at B = 40 and evaluation at B = 500 (documents a second), on one
thread and two, beside eager and, when XMCNAS_BASELINE_LIB names an earlier
revision's kernels (benchmarks/baseline.py), "today"'s; run with -s for the
floor (the head's multiply-adds at torch.mm's rate) and documents a second.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from xmcnas_fast.data import iterate_batches, load
from xmcnas_fast.model import build_model, preset

import baseline  # benchmarks/baseline.py: an earlier revision's kernels, if built
from floor import floor_seconds



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


# Short texts: the demo's network (two conv5 nodes, emb 64, width 64, fc [64])
# on rows of at most 16 tokens (5 to 16 real), 4,190 labels. The training step at B = 40; evaluation,
# forward only in eval mode, at B = 500 (train.evaluate's batches), as documents a second.
SHORT_N, SHORT_L, SHORT_D = 16, 4_190, 64


def _short_model_and_batch(B, impl, monkeypatch):
    from xmcnas_fast.data.batching import Batch
    from xmcnas_fast.model import ModelConfig

    if impl == "today":
        if baseline.kernels() is None:
            pytest.skip(f"no earlier revision's kernels: set {baseline.ENV} (benchmarks/baseline.py)")
        baseline.install(monkeypatch)
    torch.manual_seed(0)
    cfg = ModelConfig(genotype={"nodes": [["conv5", 0], ["conv5", 0]], "merge": "sum"}, emb_dim=64, width=64,
                      fc=[SHORT_D])
    model = build_model(cfg, 26_000, SHORT_L, use_kernels=impl != "eager")
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(5, SHORT_N + 1, (B,), generator=g)
    mask = torch.arange(SHORT_N).unsqueeze(0) < lengths.unsqueeze(1)
    labels = torch.zeros(B, SHORT_L)
    labels[torch.arange(B).repeat_interleave(7), torch.randint(0, SHORT_L, (7 * B,), generator=g)] = 1.0
    batch = Batch(tokens=torch.randint(1, 26_000, (B, SHORT_N), generator=g) * mask, mask=mask, labels=labels,
                  index=torch.arange(B))
    return model, batch


@pytest.mark.parametrize("impl", ["ours", "today", "eager"])
@pytest.mark.parametrize("threads", [1, 2])
def test_train_step_short_texts(benchmark, impl, threads, monkeypatch):
    """One training step (forward, BCE, backward, Adam) at B = 40, N = 16, L = 4,190, D = Dv = 64. The floor
    in extra_info: the head's 7 L R D multiply-adds (R: the batch's real tokens) at torch.mm's rate."""
    model, batch = _short_model_and_batch(40, impl, monkeypatch)
    step = make_step(model)
    benchmark.group = f"train step, short texts: B=40, N={SHORT_N}, L={SHORT_L}, D=Dv={SHORT_D}, {threads} thread(s)"
    benchmark.extra_info["role"] = "ours" if impl == "ours" else "peer"
    torch.set_num_threads(threads)
    try:
        floor = floor_seconds(7 * SHORT_L * int(batch.mask.sum()) * SHORT_D, threads)
        benchmark.extra_info["floor_s"] = floor
        loss = benchmark.pedantic(step, args=(batch,), rounds=10, iterations=1, warmup_rounds=2)
    finally:
        torch.set_num_threads(2)
    assert torch.isfinite(loss)
    if not benchmark.disabled and impl == "ours":
        print(f"\n{benchmark.group}: floor {floor * 1e3:.2f} ms, floor/ours {floor / benchmark.stats.stats.median:.2f}")


@pytest.mark.parametrize("impl", ["ours", "today", "eager"])
@pytest.mark.parametrize("threads", [1, 2])
def test_evaluate_short_texts(benchmark, impl, threads, monkeypatch):
    """Scores of 500 short texts in eval mode (no gradient), as train.evaluate runs them; documents a second."""
    model, batch = _short_model_and_batch(500, impl, monkeypatch)
    model.eval()

    def forward():
        with torch.no_grad():
            return model(batch.tokens, batch.mask)

    benchmark.group = f"evaluate, short texts: B=500, N={SHORT_N}, L={SHORT_L}, D=Dv={SHORT_D}, {threads} thread(s)"
    benchmark.extra_info["role"] = "ours" if impl == "ours" else "peer"
    torch.set_num_threads(threads)
    try:
        scores = benchmark.pedantic(forward, rounds=5, iterations=1, warmup_rounds=1)
    finally:
        torch.set_num_threads(2)
    assert scores.shape == (500, SHORT_L) and torch.isfinite(scores).all()
    if not benchmark.disabled:
        benchmark.extra_info["docs_per_s"] = 500 / benchmark.stats.stats.median
        print(f"\n{benchmark.group}: {impl} {500 / benchmark.stats.stats.median:.0f} docs/s")
