"""The CUDA kernels against the plain-PyTorch references of xmcnas_fast.ops, in float64 on the CPU.

Every test here needs a GPU (marker `cuda`; tests/conftest.py skips them, with
the reason, where none is present). The shapes are chosen to reach each code
path of csrc/cuda/: label_attention's tensor-core kernels (float16/bfloat16, D
a multiple of 8 up to 1024: D = 136 is two 128-wide warp slices, the second
mostly padding; D = 520 five; D = 1024 eight) and its simple kernels (every
float32 call; float16/bfloat16 with D = 100, or a misaligned view);
topk_metrics' warp-selection kernel (k <= 8 and 9 <= k <= 32) and its sort
path (k > 32); layer_sum's 16-byte and element-wise paths and its groups of 16
inputs.
"""
import math

import pytest
import torch

from xmcnas_fast import ops

pytestmark = pytest.mark.cuda

XOPS = torch.ops.xmcnas_fast if ops.EXTENSION_LOADED else None
DEV = "cuda"
FLOATS = [torch.float32, torch.bfloat16, torch.float16]
# Error bound, relative to the largest reference value, per input dtype.
TOL = {torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


@pytest.fixture(autouse=True)
def _cuda_kernels():
    if not ops.EXTENSION_LOADED:
        pytest.fail(f"the compiled extension is not loaded: {ops.extension_status()}")
    if not ops.has_kernel("label_attention", "cuda"):
        pytest.fail("the extension was built without its CUDA kernels: rebuild with FORCE_CUDA=1")


def close(actual, expected, tol, what=""):
    """max |actual - expected| <= tol * max(|expected|, 1), compared in float64 on the CPU."""
    a, e = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert a.shape == e.shape, (what, a.shape, e.shape)
    assert torch.isfinite(a).all(), f"{what}: non-finite values"
    err = (a - e).abs().max().item() if a.numel() else 0.0
    scale = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
    assert err <= tol * scale, f"{what}: max error {err:.3g} > {tol:.1g} x {scale:.3g}"


# --------------------------------------------------------------------------------------------
# label_attention
# --------------------------------------------------------------------------------------------

def attention_inputs(B, N, D, L, dtype, seed=0):
    """Inputs in `dtype` on the GPU; mask with padding at the end, in the middle, a full row and an empty row."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, D, generator=g)
    W = torch.randn(L, D, generator=g) * (2.0 / math.sqrt(D))  # peaked softmax, not one-hot
    mask = torch.rand(B, N, generator=g) < 0.75
    mask[0] = True                               # a row without padding
    if B > 2:
        mask[1] = False                          # a row with no real token
        mask[2, : N // 2] = True
        mask[2, N // 2:] = False                 # padding at the end only
    if N > 3:
        mask[0, N // 3] = False                  # padding in the middle of a row
    return h.to(dtype).to(DEV), mask.to(DEV), W.to(dtype).to(DEV)


def attention_reference64(h, mask, W):
    """ctx and lse in float64 on the CPU, from the (rounded) inputs; lse is meaningful on non-empty rows only."""
    h64, W64, m = h.double().cpu(), W.double().cpu(), mask.cpu()
    ctx = ops.label_attention_reference(h64, m, W64)
    s = torch.einsum("ld,bnd->bln", W64, h64).masked_fill(~m.unsqueeze(1), -math.inf)
    return ctx, torch.logsumexp(s, dim=-1)


# (B, N, D, L): the code path each reaches is in the module docstring.
ATTN_SHAPES = [
    (3, 37, 100, 21),
    (4, 70, 136, 45),
    (3, 65, 520, 40),
    (3, 33, 1024, 19),
    (3, 5, 8, 3),
    (2, 1, 64, 130),
]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_label_attention_forward(shape, dtype):
    h, mask, W = attention_inputs(*shape, dtype)
    ctx, lse = XOPS.label_attention(h, mask, W)
    assert ctx.dtype == dtype and lse.dtype == torch.float32 and ctx.device == h.device
    ref_ctx, ref_lse = attention_reference64(h, mask, W)
    close(ctx, ref_ctx, TOL[dtype], "ctx")
    empty = ~mask.cpu().any(1)
    assert torch.isinf(lse.cpu()[empty]).all() and (lse.cpu()[empty] > 0).all(), "lse of an empty row is +inf"
    assert (ctx.cpu()[empty] == 0).all(), "ctx of an empty row is 0"
    close(lse.cpu()[~empty], ref_lse[~empty], 2e-5 if dtype == torch.float32 else 2e-3, "lse")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", ATTN_SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_label_attention_gradients(shape, dtype):
    h, mask, W = attention_inputs(*shape, dtype, seed=1)
    B, N, D, L = shape
    grad = torch.randn(B, L, D, generator=torch.Generator().manual_seed(2)).to(dtype).to(DEV)
    h.requires_grad_(True)
    W.requires_grad_(True)
    ops.label_attention(h, mask, W).backward(grad)

    h64 = h.detach().double().cpu().requires_grad_(True)
    W64 = W.detach().double().cpu().requires_grad_(True)
    ops.label_attention_reference(h64, mask.cpu(), W64).backward(grad.double().cpu())
    tol = 5 * TOL[dtype]
    assert h.grad.dtype == dtype and W.grad.dtype == dtype
    close(h.grad, h64.grad, tol, "grad_h")
    close(W.grad, W64.grad, tol, "grad_W")
    assert (h.grad.cpu()[~mask.cpu()] == 0).all(), "padding tokens get no gradient"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_label_attention_eurlex_width(dtype):
    """The paper's widths at a realistic length: D = 512, 300 tokens, L not a multiple of any tile."""
    h, mask, W = attention_inputs(4, 300, 512, 257, dtype, seed=3)
    ctx, _ = XOPS.label_attention(h, mask, W)
    close(ctx, attention_reference64(h, mask, W)[0], TOL[dtype], "ctx")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_label_attention_misaligned_view_takes_the_simple_path(dtype):
    """A contiguous view 2 bytes off a 16-byte boundary: same results (through the simple kernels)."""
    h, mask, W = attention_inputs(3, 40, 136, 33, dtype, seed=4)
    buf = torch.empty(h.numel() + 1, dtype=dtype, device=DEV)
    hv = buf[1:].view_as(h).copy_(h)
    assert hv.data_ptr() % 16 != 0
    ctx, lse = XOPS.label_attention(hv, mask, W)
    close(ctx, attention_reference64(h, mask, W)[0], TOL[dtype], "ctx")
    grad = torch.randn_like(ctx)
    gh, gW, _ = XOPS.label_attention_backward(grad, hv, mask, W, None, ctx, lse)
    gh2, gW2, _ = XOPS.label_attention_backward(grad, h, mask, W, None, ctx, lse)  # tensor-core path
    close(gh, gh2.float(), 5 * TOL[dtype], "grad_h, simple vs tensor cores")
    close(gW, gW2.float(), 5 * TOL[dtype], "grad_W, simple vs tensor cores")


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
def test_label_attention_backward_is_deterministic(dtype):
    h, mask, W = attention_inputs(5, 70, 136, 300, dtype, seed=5)
    ctx, lse = XOPS.label_attention(h, mask, W)
    grad = torch.randn_like(ctx)
    first = XOPS.label_attention_backward(grad, h, mask, W, None, ctx, lse)
    second = XOPS.label_attention_backward(grad, h, mask, W, None, ctx, lse)
    assert torch.equal(first[0], second[0]) and torch.equal(first[1], second[1])


def test_label_attention_all_padding_and_empty_sizes():
    h, _, W = attention_inputs(2, 6, 16, 5, torch.float32)
    mask = torch.zeros(2, 6, dtype=torch.bool, device=DEV)
    ctx, lse = XOPS.label_attention(h, mask, W)
    assert (ctx == 0).all() and torch.isinf(lse).all() and (lse > 0).all()
    gh, gW, gv = XOPS.label_attention_backward(torch.ones_like(ctx), h, mask, W, None, ctx, lse)
    assert (gh == 0).all() and (gW == 0).all() and gv.numel() == 0
    for B, N, L in [(0, 6, 5), (2, 0, 5), (2, 6, 0)]:
        hh = torch.randn(B, N, 16, device=DEV)
        mm = torch.ones(B, N, dtype=torch.bool, device=DEV)
        ctx, lse = XOPS.label_attention(hh, mm, torch.randn(L, 16, device=DEV))
        assert ctx.shape == (B, L, 16) and lse.shape == (B, L)
        if N == 0:
            assert (ctx == 0).all() and torch.isinf(lse).all()


def test_label_attention_float32_weights_with_bfloat16_states():
    """W in float32 (a parameter) and h in bfloat16 (autocast output): ctx in h's dtype, grad_W in W's."""
    h, mask, W = attention_inputs(3, 30, 64, 10, torch.bfloat16, seed=6)
    W32 = W.float().requires_grad_(True)
    ctx = ops.label_attention(h, mask, W32)
    assert ctx.dtype == torch.bfloat16
    ctx.float().sum().backward()
    assert W32.grad.dtype == torch.float32
    close(ctx, attention_reference64(h, mask, W)[0], TOL[torch.bfloat16], "ctx")


def test_label_attention_opcheck():
    h, mask, W = attention_inputs(3, 20, 64, 9, torch.float32)
    torch.library.opcheck(torch.ops.xmcnas_fast.label_attention.default,
                          (h.requires_grad_(True), mask, W.requires_grad_(True)))
    h, mask, W = attention_inputs(3, 20, 64, 9, torch.bfloat16)
    ctx, lse = XOPS.label_attention(h, mask, W)
    torch.library.opcheck(torch.ops.xmcnas_fast.label_attention_backward.default,
                          (torch.randn_like(ctx), h, mask, W, None, ctx, lse))


def test_label_attention_separate_values_not_implemented():
    h, mask, W = attention_inputs(2, 5, 8, 3, torch.float32)
    ctx, lse = XOPS.label_attention(h, mask, W)
    assert not ops.label_attention_supports_values(h.device)
    with pytest.raises(NotImplementedError, match="separate values are not implemented on CUDA"):
        XOPS.label_attention(h, mask, W, torch.randn_like(h))
    with pytest.raises(NotImplementedError, match="separate values are not implemented on CUDA"):
        XOPS.label_attention_backward(torch.randn_like(ctx), h, mask, W, torch.randn_like(h), ctx, lse)


@pytest.mark.parametrize("case, message", [
    (lambda h, m, W: (h[0], m, W), "h must be"),
    (lambda h, m, W: (h, m[:, :-1], W), "mask must be"),
    (lambda h, m, W: (h, m, W[:, :-1]), "W must be"),
    (lambda h, m, W: (h.long(), m, W), "h must be float32"),
    (lambda h, m, W: (h, m.int(), W), "mask must be bool"),
    (lambda h, m, W: (h, m.cpu(), W), "mask is on cpu"),
    (lambda h, m, W: (h, m, W.cpu()), "W is on cpu"),
])
def test_label_attention_bad_inputs(case, message):
    h, mask, W = attention_inputs(2, 5, 8, 3, torch.float32)
    with pytest.raises(ValueError, match=r"^label_attention: .*" + message):
        XOPS.label_attention(*case(h, mask, W))


# --------------------------------------------------------------------------------------------
# topk_metrics
# --------------------------------------------------------------------------------------------

def truth_csr(R, L, seed, n_total=None, empty_every=7, max_true=9):
    """A CSR truth with empty rows, ids up to n_total - 1 (>= L: unseen labels) and a duplicate."""
    g = torch.Generator().manual_seed(seed)
    n_total = n_total or L
    counts = torch.randint(0, max_true + 1, (R,), generator=g)
    counts[::empty_every] = 0
    indices = torch.cat([torch.randperm(n_total, generator=g)[: int(c)] for c in counts]) if R else \
        torch.zeros(0, dtype=torch.long)
    indptr = torch.zeros(R + 1, dtype=torch.long)
    indptr[1:] = counts.cumsum(0)
    return indptr, indices


def check_topk(scores, indptr, indices, k, inv_prop=None):
    sums, topk = XOPS.topk_metrics(scores, indptr, indices, k, inv_prop)
    ref_sums, ref_topk = ops.topk_metrics_reference(scores.cpu(), indptr, indices, k,
                                                    None if inv_prop is None else inv_prop.cpu())
    assert sums.device == scores.device and topk.device == scores.device
    assert sums.dtype == torch.float64 and topk.dtype == torch.int64 and sums.shape == (4, k)
    assert torch.equal(topk.cpu(), ref_topk.cpu()), "top-k labels, ties by lower label id"
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-12, atol=1e-9)
    return sums


@pytest.mark.parametrize("k", [1, 5, 8, 9, 32, 33, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_topk_metrics_matches_reference(k, dtype):
    R, L = 53, 1007
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(R, L, generator=g).to(dtype)   # bfloat16/float16 round to many ties
    scores[3] = 0.5                                     # a row of ties
    scores[4, ::3] = -math.inf
    indptr, indices = truth_csr(R, L, seed=k)
    inv_prop = torch.rand(L, generator=g) * 3 + 1
    check_topk(scores.to(DEV), indptr, indices, k)
    check_topk(scores.to(DEV), indptr, indices, k, inv_prop.to(DEV))


def test_topk_metrics_ties_rank_lower_label_first():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [0.0] * 6], device=DEV)
    indptr = torch.tensor([0, 2, 3])
    indices = torch.tensor([2, 4, 5])
    sums, topk = XOPS.topk_metrics(scores, indptr, indices, 3)
    assert topk.cpu().tolist() == [[1, 2, 4], [0, 1, 2]]
    assert sums[0].cpu().tolist() == [0.0, 1.0, 2.0]
    check_topk(scores, indptr, indices, 3)


@pytest.mark.parametrize("L", [1, 5, 32, 33])
def test_topk_metrics_k_equals_L(L):
    R = 9
    scores = torch.randn(R, L, generator=torch.Generator().manual_seed(L), device="cpu").to(DEV)
    indptr, indices = truth_csr(R, L, seed=L, max_true=min(L, 4))
    check_topk(scores, indptr, indices, L, torch.rand(L).to(DEV) + 1)


def test_topk_metrics_unseen_labels_duplicates_and_host_truth():
    """Ids >= L (unseen) count as true, never hit; a duplicated id counts twice in #true (as the reference)."""
    R, L, n_total = 40, 300, 360
    scores = torch.randn(R, L, generator=torch.Generator().manual_seed(7)).to(DEV)
    indptr, indices = truth_csr(R, L, seed=7, n_total=n_total)
    assert indptr[2] > indptr[1], "row 1 has labels"
    first = int(indptr[1])
    indices = torch.cat([indices[: first + 1], indices[first:]])  # row 1's first label, twice
    indptr[2:] += 1
    dup = int(indices[first])
    if dup < L:
        scores[1, dup] = 10.0                           # ranked first: one hit, counted once
    inv_prop = torch.rand(n_total) * 2 + 1
    check_topk(scores, indptr, indices.int(), 5, inv_prop)      # int32 indices, truth on the host
    check_topk(scores, indptr.to(DEV), indices.to(DEV), 40, inv_prop.to(DEV))


def test_topk_metrics_many_rows_and_long_rows():
    R, L = 1203, 13330
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(R, L, generator=g).to(DEV)
    indptr, indices = truth_csr(R, L, seed=11)
    check_topk(scores, indptr, indices, 5, torch.rand(L, generator=g) + 1)


def test_topk_metrics_empty_batch():
    sums, topk = XOPS.topk_metrics(torch.zeros(0, 10, device=DEV), torch.zeros(1, dtype=torch.long),
                                   torch.zeros(0, dtype=torch.long), 3)
    assert topk.shape == (0, 3) and (sums.cpu() == 0).all()


def test_topk_metrics_opcheck():
    scores = torch.randn(6, 50, device=DEV)
    indptr, indices = truth_csr(6, 50, seed=3)
    torch.library.opcheck(torch.ops.xmcnas_fast.topk_metrics.default,
                          (scores, indptr.to(DEV), indices.to(DEV), 5, torch.rand(50, device=DEV)))


@pytest.mark.parametrize("change, message", [
    (lambda s, p, i: (s, p, i, 0), "k must be in"),
    (lambda s, p, i: (s, p[:-1], i, 2), "indptr must have R\\+1"),
    (lambda s, p, i: (s, p + 1, i, 2), "indptr must start at 0"),
    (lambda s, p, i: (s, torch.tensor([0, 3, 1, 4]), i, 2), "non-decreasing"),
    (lambda s, p, i: (s, p, i - 5, 2), "must be >= 0"),
    (lambda s, p, i: (s, p, i + 10, 2), "is >= the number of labels \\(40\\)"),
    (lambda s, p, i: (s.index_fill(1, torch.tensor([4], device=DEV), math.nan), p, i, 2), "NaN"),
    (lambda s, p, i: (s.index_fill(1, torch.tensor([4], device=DEV), math.nan), p, i, 35), "NaN"),  # sort path
    (lambda s, p, i: (s, p, i, 41), "k must be in"),
])
def test_topk_metrics_bad_inputs(change, message):
    scores = torch.randn(3, 40, device=DEV)
    indptr, indices = torch.tensor([0, 2, 2, 4]), torch.tensor([1, 3, 0, 39])
    with pytest.raises(ValueError, match=r"^topk_metrics: .*" + message):
        XOPS.topk_metrics(*change(scores, indptr, indices))


# --------------------------------------------------------------------------------------------
# layer_sum
# --------------------------------------------------------------------------------------------

def layer_inputs(K, shape, dtype, w_dtype, offset=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    xs = []
    for _ in range(K):
        buf = torch.empty(numel + offset, dtype=dtype, device=DEV)
        x = buf[offset:].view(shape)                    # offset > 0: a view off the 16-byte boundary
        x.copy_(torch.randn(shape, generator=g))
        xs.append(x)
    w = torch.randn(K, generator=g).to(w_dtype).to(DEV)
    return xs, w


LAYER_CASES = [  # K, shape, offset
    (1, (2, 3, 8), 0),
    (3, (4, 17, 33), 0),                               # numel not a multiple of 8
    (6, (40, 50, 64), 0),
    (16, (3, 5, 24), 0),
    (17, (3, 5, 24), 0),                               # two groups of inputs
    (4, (5, 7, 16), 1),                                # misaligned: element-wise path
]


@pytest.mark.parametrize("w_dtype", ["float32", "same"])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("K, shape, offset", LAYER_CASES)
def test_layer_sum_values_and_gradients(K, shape, offset, dtype, w_dtype):
    xs, w = layer_inputs(K, shape, dtype, torch.float32 if w_dtype == "float32" else dtype, offset)
    out = XOPS.layer_sum(xs, w)
    assert out.dtype == dtype and out.shape == shape
    x64 = [x.double().cpu() for x in xs]
    w64 = w.double().cpu()
    ref = ops.layer_sum_reference(x64, w64)
    close(out, ref, TOL[dtype] * K, "out")

    grad = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype).to(DEV)
    gxs, gw = XOPS.layer_sum_backward(grad, xs, w)
    assert len(gxs) == K and gw.dtype == w.dtype and gw.shape == (K,)
    g64 = grad.double().cpu()
    for i in range(K):
        close(gxs[i], w64[i] * g64, TOL[dtype], f"grad_xs[{i}]")
    ref_gw = torch.stack([(g64 * x).sum() for x in x64])
    close(gw, ref_gw, TOL[w.dtype] + 1e-5, "grad_w")


def test_layer_sum_autograd_and_determinism():
    xs, w = layer_inputs(5, (8, 30, 32), torch.float32, torch.float32, seed=2)
    xs = [x.requires_grad_(True) for x in xs]
    w.requires_grad_(True)
    out = ops.layer_sum(xs, w)
    grad = torch.randn_like(out)
    out.backward(grad)
    x64 = [x.detach().double().cpu().requires_grad_(True) for x in xs]
    w64 = w.detach().double().cpu().requires_grad_(True)
    ops.layer_sum_reference(x64, w64).backward(grad.double().cpu())
    close(w.grad, w64.grad, 1e-5, "grad_w")
    for x, r in zip(xs, x64):
        close(x.grad, r.grad, 1e-6, "grad_x")
    first = XOPS.layer_sum_backward(grad, xs, w)[1]
    assert torch.equal(first, XOPS.layer_sum_backward(grad, xs, w)[1])


def test_layer_sum_opcheck():
    xs, w = layer_inputs(3, (4, 6, 8), torch.float32, torch.float32)
    torch.library.opcheck(torch.ops.xmcnas_fast.layer_sum.default,
                          ([x.requires_grad_(True) for x in xs], w.requires_grad_(True)))
    xs, w = layer_inputs(3, (4, 6, 8), torch.bfloat16, torch.float32)
    torch.library.opcheck(torch.ops.xmcnas_fast.layer_sum_backward.default, (torch.randn_like(xs[0]), xs, w))


def test_layer_sum_empty_tensors():
    xs, w = layer_inputs(2, (0, 5), torch.float32, torch.float32)
    assert XOPS.layer_sum(xs, w).shape == (0, 5)
    gxs, gw = XOPS.layer_sum_backward(torch.zeros(0, 5, device=DEV), xs, w)
    assert (gw == 0).all() and gxs[0].shape == (0, 5)


@pytest.mark.parametrize("change, message", [
    (lambda xs, w: ([], w[:0]), "at least one input"),
    (lambda xs, w: (xs, w[:1]), "expected w of shape"),
    (lambda xs, w: ([xs[0], xs[1][:1]], w), "one shape"),
    (lambda xs, w: ([xs[0], xs[1].half()], w), "one dtype"),
    (lambda xs, w: ([x.long() for x in xs], w), "float32, float16 or bfloat16"),
    (lambda xs, w: (xs, w.cpu()), "w is on cpu"),
])
def test_layer_sum_bad_inputs(change, message):
    xs, w = layer_inputs(2, (3, 4), torch.float32, torch.float32)
    with pytest.raises(ValueError, match=r"^layer_sum: .*" + message):
        XOPS.layer_sum(*change(xs, w))
