"""The CUDA kernels beside their peers, on one GPU: time and peak memory.

    python -m pytest benchmarks/bench_cuda.py --benchmark-enable \
        --benchmark-columns=min,median,max,rounds --benchmark-sort=name --benchmark-json=bench_cuda.json

Skipped without a GPU. Every timed call ends with torch.cuda.synchronize(), so
pytest-benchmark's wall-clock rounds are device time plus one launch; each
case also records, in extra_info (the JSON), the median of CUDA-event timings
and the peak memory of one call above what its inputs hold
(torch.cuda.max_memory_allocated after reset_peak_memory_stats).

label_attention, forward and forward+backward, float32 and bfloat16, at
B=40 N=500 D=512 (30% padding at the ends of rows of random lengths) and
L=3993 (EURLex-4K) and L=30938 (Wiki10-31K), and D=1024 at L=3993: ours
(what ops.label_attention runs: cuBLAS a block of labels at a time for
float32, the fused tensor-core kernels for bfloat16); for bfloat16 also
ours-gemm, the cuBLAS path that float32 takes (the private operators
_label_attention_gemm(_backward)), to choose between the two on figures; the
eager composition (ops.label_attention_reference, AttentionXML's MLAttention); and
F.scaled_dot_product_attention with Q = W expanded, K = V = h, scale 1 and a
boolean mask, under each backend it may pick (torch.nn.attention.sdpa_kernel:
a backend that refuses the case is reported as skipped, with its reason).
extra_info["TFLOP/s"] counts 4 L (real tokens) D per forward, 3.5 times that
per forward+backward, whatever the implementation computes over padding.

label_attention + the model head's first layer Linear(D, 256), forward+backward,
float32 and bfloat16, same shapes: eager = Linear(ops.label_attention_reference);
unfused = Linear(ops.label_attention); fused = ops.label_attention with the
linear layer folded into the values v = Linear(h) (exact: a row's attention
weights sum to 1), which skips the [B,L,D] context and its GEMM.

topk_metrics, k = 5: ours against torch.topk on the GPU plus P@k/nDCG@k on
the host with numpy and scipy (the indices copied back), at 3809 x 3993
(EURLex-4K's test set) and 100000 x 13330 (AmazonCat-13K-sized, in chunks of
10000 rows, the way an evaluation loop feeds a model's scores).

layer_sum, K = 6 inputs of [40, 500, 512], forward and backward: ours against
torch.stack + mul + sum (ops.layer_sum_reference), and a device-to-device
copy of one input in the same run, to express ours as a fraction of the
copy bandwidth (extra_info["GB/s"]).
"""
import os
import statistics
import sys

import numpy as np
import pytest
import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the in-place build of this checkout
    sys.path.insert(0, ROOT)

from xmcnas_fast import ops  # noqa: E402

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU; none is present")]

DEV = "cuda"


def timed(benchmark, fn, rounds=10, warmup=2, **info):
    """Times fn under pytest-benchmark (synchronised), and records CUDA-event time and peak memory."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    times = []
    for _ in range(rounds):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))

    def run():
        fn()
        torch.cuda.synchronize()

    benchmark.pedantic(run, rounds=rounds, iterations=1, warmup_rounds=1)
    benchmark.extra_info.update(info, device=torch.cuda.get_device_name(), cuda_event_ms=statistics.median(times),
                                peak_extra_mib=peak / 2**20)


# --------------------------------------------------------------------------------------------
# label_attention
# --------------------------------------------------------------------------------------------

B, N, D = 40, 500, 512
LABELS = {"eurlex-4k": 3993, "wiki10-31k": 30938}
# label_attention alone, also at D = 1024 (a discovered network's width after the concat)
ATTENTION_SHAPES = {name: (L, D) for name, L in LABELS.items()} | {"eurlex-4k-d1024": (LABELS["eurlex-4k"], 1024)}
SDPA_BACKENDS = ["flash", "efficient", "cudnn", "math"]


def attention_inputs(L, dtype, requires_grad, D=D):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(B, N, D, generator=g)
    W = torch.randn(L, D, generator=g) / D ** 0.5
    frac = torch.rand(B, generator=g) * 0.6 + 0.4
    lengths = (frac * 0.7 * B * N / frac.sum()).round().long().clamp(1, N)
    mask = torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)
    grad = torch.randn(B, L, D, generator=g).to(dtype).to(DEV)
    h = h.to(dtype).to(DEV).requires_grad_(requires_grad)
    W = W.to(dtype).to(DEV).requires_grad_(requires_grad)
    return h, mask.to(DEV), W, grad


def sdpa(backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel
    which = {"flash": SDPBackend.FLASH_ATTENTION, "efficient": SDPBackend.EFFICIENT_ATTENTION,
             "cudnn": SDPBackend.CUDNN_ATTENTION, "math": SDPBackend.MATH}[backend]

    def fn(h, mask, W):
        q = W.unsqueeze(0).unsqueeze(0).expand(h.shape[0], 1, *W.shape)     # [B, 1, L, D]
        kv = h.unsqueeze(1)                                                  # [B, 1, N, D]
        with sdpa_kernel(which):
            out = F.scaled_dot_product_attention(q, kv, kv, attn_mask=mask[:, None, None, :], scale=1.0)
        return out.squeeze(1)
    return fn


class _GemmPath(torch.autograd.Function):
    """label_attention through the private cuBLAS-path operators, differentiable."""

    @staticmethod
    def forward(ctx, h, mask, W):
        out, lse = torch.ops.xmcnas_fast._label_attention_gemm(h, mask, W)
        ctx.save_for_backward(h, mask, W, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad):
        h, mask, W, out, lse = ctx.saved_tensors
        gh, gW, _ = torch.ops.xmcnas_fast._label_attention_gemm_backward(grad.contiguous(), h, mask, W, None,
                                                                         out, lse)
        return gh, None, gW


def attention_impl(impl):
    if impl == "ours":
        return ops.label_attention
    if impl == "ours-gemm":
        return _GemmPath.apply
    if impl == "eager":
        return ops.label_attention_reference
    return sdpa(impl.removeprefix("sdpa-"))


@pytest.mark.parametrize("impl", ["ours", "ours-gemm", "eager"] + [f"sdpa-{b}" for b in SDPA_BACKENDS])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
@pytest.mark.parametrize("labels", list(ATTENTION_SHAPES))
def test_label_attention(benchmark, labels, mode, dtype, impl):
    benchmark.group = f"label_attention {labels} {mode} {dtype}"
    L, D = ATTENTION_SHAPES[labels]
    if impl == "ours-gemm" and dtype == "float32":
        pytest.skip("float32: ours is this path")
    if impl.startswith("ours") and not ops.has_kernel("label_attention", "cuda"):
        pytest.fail("the extension has no CUDA kernels: rebuild with FORCE_CUDA=1")
    h, mask, W, grad = attention_inputs(L, getattr(torch, dtype), mode != "forward", D)
    fn = attention_impl(impl)
    if mode == "forward":
        def step():
            with torch.no_grad():
                return fn(h, mask, W)
    else:
        def step():
            h.grad = W.grad = None
            fn(h, mask, W).backward(grad)
    try:
        step()
        torch.cuda.synchronize()
    except (RuntimeError, torch.OutOfMemoryError) as e:  # a backend refusing the case, or too big
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: {str(e).splitlines()[0][:200]}")
    timed(benchmark, step, rounds=5 if L > 10000 else 10, B=B, N=N, D=D, L=L)
    flops = 4 * L * int(mask.sum()) * D * (1.0 if mode == "forward" else 3.5)
    benchmark.extra_info["TFLOP/s"] = flops / (benchmark.extra_info["cuda_event_ms"] * 1e-3) / 1e12


FC = 256
HEAD_IMPLS = {
    "eager": lambda h, mask, W, A, c: F.linear(ops.label_attention_reference(h, mask, W), A, c),
    "unfused": lambda h, mask, W, A, c: F.linear(ops.label_attention(h, mask, W), A, c),
    "fused": lambda h, mask, W, A, c: ops.label_attention(h, mask, W, F.linear(h, A, c)),
}


@pytest.mark.parametrize("impl", list(HEAD_IMPLS))
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("labels", list(LABELS))
def test_label_attention_head(benchmark, labels, dtype, impl):
    benchmark.group = f"label_attention + Linear({FC}) {labels} forward+backward {dtype}"
    if impl != "eager" and not ops.has_kernel("label_attention", "cuda"):
        pytest.fail("the extension has no CUDA kernels: rebuild with FORCE_CUDA=1")
    L = LABELS[labels]
    h, mask, W, _ = attention_inputs(L, getattr(torch, dtype), True)
    g = torch.Generator().manual_seed(1)
    A = (torch.randn(FC, D, generator=g) / D ** 0.5).to(h.dtype).to(DEV).requires_grad_()
    c = (torch.randn(FC, generator=g) * 0.1).to(h.dtype).to(DEV).requires_grad_()
    grad = torch.randn(B, L, FC, generator=g).to(h.dtype).to(DEV)
    fn = HEAD_IMPLS[impl]

    def step():
        h.grad = W.grad = A.grad = c.grad = None
        fn(h, mask, W, A, c).backward(grad)

    try:
        step()
        torch.cuda.synchronize()
    except torch.OutOfMemoryError as e:
        torch.cuda.empty_cache()
        pytest.skip(f"{impl}: {str(e).splitlines()[0][:200]}")
    timed(benchmark, step, rounds=5 if L > 10000 else 10, B=B, N=N, D=D, L=L, FC=FC)


# --------------------------------------------------------------------------------------------
# topk_metrics
# --------------------------------------------------------------------------------------------

METRIC_SHAPES = {"eurlex-4k-test": (3809, 3993), "amazoncat-13k-sized": (100000, 13330)}
CHUNK = 10000
K = 5


def metric_inputs(R, L):
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(R, L, generator=torch.Generator(device=DEV).manual_seed(1), device=DEV)
    counts = torch.randint(1, 11, (R,), generator=g)                     # 5.5 true labels a row
    indices = torch.randint(0, L, (int(counts.sum()),), generator=g)
    indptr = torch.zeros(R + 1, dtype=torch.long)
    indptr[1:] = counts.cumsum(0)
    return scores, indptr, indices


def host_metrics(topk, truth, k):
    """P@1..k and nDCG@1..k sums with numpy/scipy from the top-k indices on the host."""
    R = topk.shape[0]
    hit = np.asarray(truth[np.repeat(np.arange(R), k), topk.ravel()]).reshape(R, k) > 0
    disc = 1.0 / np.log2(np.arange(k) + 2.0)
    n_true = np.diff(truth.indptr)
    ideal = np.cumsum(disc)[np.clip(np.minimum(np.arange(k)[None, :], n_true[:, None] - 1), 0, None)]
    dcg = np.cumsum(hit * disc, axis=1)
    ndcg = np.where(n_true[:, None] > 0, dcg / ideal, 0.0)
    return np.cumsum(hit, axis=1).sum(0), ndcg.sum(0)


@pytest.mark.parametrize("impl", ["ours", "torch.topk+host"])
@pytest.mark.parametrize("shape", list(METRIC_SHAPES))
def test_topk_metrics(benchmark, shape, impl):
    import scipy.sparse as sp
    benchmark.group = f"topk_metrics {shape} k={K}"
    R, L = METRIC_SHAPES[shape]
    scores, indptr, indices = metric_inputs(R, L)
    chunks = [(r, min(r + CHUNK, R)) for r in range(0, R, CHUNK)]
    if impl == "ours":
        parts = [(indptr[a:b + 1] - indptr[a], indices[indptr[a]:indptr[b]]) for a, b in chunks]
        parts = [(p.to(DEV), i.to(DEV)) for p, i in parts]

        def step():
            total = torch.zeros(4, K, dtype=torch.float64, device=DEV)
            for (a, b), (p, i) in zip(chunks, parts):
                total += ops.topk_metrics(scores[a:b], p, i, K)[0]
            return total.cpu()
    else:
        truth = sp.csr_matrix((np.ones(len(indices)), indices.numpy(), indptr.numpy()), shape=(R, L))
        truths = [truth[a:b] for a, b in chunks]

        def step():
            hits, ndcg = np.zeros(K), np.zeros(K)
            for (a, b), t in zip(chunks, truths):
                top = torch.topk(scores[a:b], K, dim=1).indices.cpu().numpy()
                h_, n_ = host_metrics(top, t, K)
                hits += h_
                ndcg += n_
            return hits, ndcg
    timed(benchmark, step, rounds=5, R=R, L=L, k=K, chunk=CHUNK)


def test_topk_metrics_agree_with_host_metrics():
    """The two timed implementations compute the same P@k and nDCG@k (no ties in float32 random scores)."""
    import scipy.sparse as sp
    R, L = 3809, 3993
    scores, indptr, indices = metric_inputs(R, L)
    sums = ops.topk_metrics(scores, indptr, indices, K)[0].cpu().numpy()
    truth = sp.csr_matrix((np.ones(len(indices)), indices.numpy(), indptr.numpy()), shape=(R, L))
    truth.sum_duplicates()
    truth.data[:] = 1.0
    top = torch.topk(scores, K, dim=1).indices.cpu().numpy()
    hits, _ = host_metrics(top, truth, K)
    np.testing.assert_allclose(sums[0], hits)


# --------------------------------------------------------------------------------------------
# layer_sum
# --------------------------------------------------------------------------------------------

LAYER_K, LAYER_SHAPE = 6, (40, 500, 512)


@pytest.mark.parametrize("impl", ["ours", "stack+mul+sum", "copy"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("mode", ["forward", "forward+backward"])
def test_layer_sum(benchmark, mode, dtype, impl):
    benchmark.group = f"layer_sum K={LAYER_K} {mode} {dtype}"
    dt = getattr(torch, dtype)
    g = torch.Generator(device=DEV).manual_seed(0)
    xs = [torch.randn(LAYER_SHAPE, generator=g, device=DEV).to(dt).requires_grad_(mode != "forward")
          for _ in range(LAYER_K)]
    w = torch.randn(LAYER_K, device=DEV, requires_grad=mode != "forward")
    grad = torch.randn(LAYER_SHAPE, device=DEV).to(dt)
    elem = xs[0].element_size() * xs[0].numel()
    if impl == "copy":
        dst = torch.empty_like(xs[0])

        def step():
            dst.copy_(xs[0].detach())
        moved = 2 * elem
    else:
        fn = ops.layer_sum if impl == "ours" else ops.layer_sum_reference
        if mode == "forward":
            def step():
                with torch.no_grad():
                    return fn(xs, w)
            moved = (LAYER_K + 1) * elem                                 # read K inputs, write one
        else:
            def step():
                for x in xs:
                    x.grad = None
                w.grad = None
                fn(xs, w).backward(grad)
            moved = (LAYER_K + 1) * elem + (2 * LAYER_K + 1) * elem      # + read grad and K inputs, write K
    timed(benchmark, step, rounds=20, K=LAYER_K, shape=list(LAYER_SHAPE), bytes_moved=moved)
    benchmark.extra_info["GB/s"] = moved / (benchmark.extra_info["cuda_event_ms"] * 1e-3) / 1e9
