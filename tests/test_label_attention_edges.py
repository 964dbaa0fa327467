"""label_attention at its edges, on every kernel path of every device, in every dtype.

The targets: the CPU kernel; on CUDA the kernels as the op chooses them ("cuda": cuBLAS for float32,
the tensor-core kernels for 16-bit shapes that fit the GPU's shared memory and are 16-byte aligned,
the simple kernels otherwise) and the simple kernels forced ("cuda-simple":
XMCNAS_CUDA_SIMPLE_KERNELS=1), so that every 16-bit case reaches both kernel families on any GPU.
Each case runs in float64, float32, bfloat16 and float16 against the float64 reference
(tests/test_label_attention.py's helpers and tolerances). The widths are multiples of 8 so that the
tensor-core kernels take the 16-bit cases on the "cuda" target.

Also here: values that are h itself or a view of it (the backward tells them apart by whether v was
given, never by where its data lives), 16-bit inputs at an odd element offset of a larger buffer (the
alignment gate), tensors on a device other than the current one and work on a side stream, the
public op under autocast, and float32 results that do not depend on PyTorch's TF32 setting.
"""
import math

import pytest
import torch

from xmcnas_fast import ops

from _kernels import close, kernel_required
from test_label_attention import FLOATS, OP, OP_BACKWARD, TOL, assert_matches_reference, make_inputs, reference64, run

SIMPLE_KERNELS = "XMCNAS_CUDA_SIMPLE_KERNELS"
CUDA = pytest.mark.cuda
TARGETS = [pytest.param("cpu", "auto", id="cpu"), pytest.param("cuda", "auto", marks=CUDA, id="cuda"),
           pytest.param("cuda", "simple", marks=CUDA, id="cuda-simple")]
CUDA_TARGETS = TARGETS[1:]
HALVES = [torch.bfloat16, torch.float16]

_kernels = kernel_required("label_attention")


@pytest.fixture(autouse=True)
def _path(request, monkeypatch):
    """The kernel path of the test's `path` parameter, through the private switch."""
    callspec = getattr(request.node, "callspec", None)
    if callspec is not None and callspec.params.get("path") == "simple":
        monkeypatch.setenv(SIMPLE_KERNELS, "1")
    else:
        monkeypatch.delenv(SIMPLE_KERNELS, raising=False)


def two_gpus():
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA GPUs (a tensor on a device other than the current one)")


dtypes = pytest.mark.parametrize("dtype", FLOATS, ids=str)
targets = pytest.mark.parametrize("device, path", TARGETS)


# ---- the cases of every path ----------------------------------------------------------------------

@dtypes
@pytest.mark.parametrize("Dv", [None, 24])
@targets
def test_row_lengths_at_chunk_edges(device, path, Dv, dtype):
    """Real-token counts around the CUDA chunk of 32 tokens (and the CPU's 16-row padding)."""
    counts = [1, 15, 16, 17, 31, 32, 33, 63, 64, 65]
    h, _, W, v = make_inputs(len(counts), 70, 16, 6, Dv=Dv, dtype=dtype, device=device)
    mask = (torch.arange(70).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)).to(device)
    assert_matches_reference(h, mask, W, v)


@dtypes
@pytest.mark.parametrize("B, N, L", [(0, 6, 5), (2, 0, 5), (2, 6, 0)])
@pytest.mark.parametrize("Dv", [None, 8])
@targets
def test_empty_sizes(device, path, Dv, B, N, L, dtype):
    h = torch.randn(B, N, 16, device=device).to(dtype)
    v = None if Dv is None else torch.randn(B, N, Dv, device=device).to(dtype)
    W = torch.randn(L, 16, device=device).to(dtype)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    ctx, lse = OP(h, mask, W, v)
    assert ctx.shape == (B, L, Dv or 16) and ctx.dtype == dtype and lse.shape == (B, L)
    assert (ctx == 0).all() and (torch.isinf(lse) & (lse > 0)).all()  # no real token anywhere
    gh, gW, gv = OP_BACKWARD(torch.ones_like(ctx), h, mask, W, v, ctx, lse)
    assert gh.shape == h.shape and gW.shape == W.shape and (gh == 0).all() and (gW == 0).all()
    assert gv.shape == ((0,) if v is None else v.shape) and (gv == 0).all()


@dtypes
@targets
def test_values_of_width_zero(device, path, dtype):
    """Dv = 0: an empty context, the log-sum-exp still, and no gradient anywhere."""
    h, mask, W, _ = make_inputs(3, 20, 16, 7, dtype=dtype, device=device, empty_rows=[1])
    v = h.new_empty(3, 20, 0)
    ctx, lse = OP(h, mask, W, v)
    assert ctx.shape == (3, 7, 0)
    close(lse.cpu()[[0, 2]], lse_reference(h, mask, W)[[0, 2]], 1e-6, "lse")
    assert torch.isinf(lse[1]).all()
    gh, gW, gv = OP_BACKWARD(torch.ones_like(ctx), h, mask, W, v, ctx, lse)
    assert gv.shape == v.shape and (gh == 0).all() and (gW == 0).all()


@dtypes
@pytest.mark.parametrize("Dv", [None, 24])
@targets
def test_nan_in_the_padding_changes_nothing(device, path, Dv, dtype):
    h, mask, W, v = make_inputs(3, 40, 16, 9, Dv=Dv, dtype=dtype, device=device, padding="none")
    mask[0, 5:9] = False
    mask[1, ::2] = False
    mask[2, :3] = False
    mask[2, -3:] = False
    clean = assert_matches_reference(h, mask, W, v)
    pad = ~mask.unsqueeze(-1)
    nan = lambda t: None if t is None else t.masked_fill(pad, float("nan"))  # noqa: E731
    grad = torch.randn(clean[0].shape, dtype=torch.float64).to(dtype).to(device)
    for a, b in zip(run(ops.label_attention, h, mask, W, v, grad), run(ops.label_attention, nan(h), mask, W,
                                                                       nan(v), grad)):
        assert torch.equal(a, b)


@dtypes
@pytest.mark.parametrize("L", [1, 127, 129, 300])
@pytest.mark.parametrize("Dv", [None, 40])
@targets
def test_label_counts_around_the_tiles(device, path, Dv, L, dtype):
    """L around the 64-row tiles of the tensor cores, the 32-label softmax blocks and the CPU's 128."""
    assert_matches_reference(*make_inputs(3, 13, 16, L, Dv=Dv, dtype=dtype, device=device))


def lse_reference(h, mask, W):
    """The log-sum-exp of the scores over each row's real tokens, in float64 on the CPU."""
    s = torch.einsum("ld,bnd->bln", W.double().cpu(), h.double().cpu())
    return torch.logsumexp(s.masked_fill(~mask.cpu().unsqueeze(1), -math.inf), dim=-1)


def large_scores(dtype, device):
    """Inputs whose scores lie near +-5000 (feature 0: 1000 in every token, +-5 .. 1 in the labels)
    with differences of a few units between tokens, and the float64 log-sum-exp of their scores."""
    h, mask, W, _ = make_inputs(3, 25, 16, 8, dtype=dtype, device=device)
    h[..., 0] = 1000.0
    W[:, 0] = torch.tensor([5.0, -5.0, 4.0, -4.0, 3.0, 2.0, -1.0, 1.0], device=device)
    lse64 = lse_reference(h, mask, W)
    assert lse64.abs().max() > 4000
    return h, mask, W, lse64


@dtypes
@targets
def test_large_scores_are_stable(device, path, dtype):
    """Scores near +-5000: the float64 softmax, up to the rounding of the scores (float32 for every
    dtype) and, in 16-bit, of the weights."""
    h, mask, W, lse64 = large_scores(dtype, device)
    ctx, lse = OP(h, mask, W)
    ref = reference64(h, mask, W, None, torch.ones_like(ctx))
    torch.testing.assert_close(lse.double().cpu(), lse64, atol=0, rtol=1e-6)
    if dtype in HALVES:
        close(ctx, ref[0], TOL[dtype], "ctx")
    else:
        torch.testing.assert_close(ctx.double().cpu(), ref[0], atol=3e-3, rtol=1e-5)


@dtypes
@pytest.mark.parametrize("Dv", [None, 16])
@targets
def test_non_contiguous_inputs(device, path, Dv, dtype):
    h, mask, W, v = make_inputs(4, 11, 16, 9, Dv=Dv, dtype=dtype, device=device)
    strided = lambda t: None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    mask_nc = torch.stack([mask, ~mask], dim=-1)[..., 0]
    assert not (strided(h).is_contiguous() or strided(W).is_contiguous() or mask_nc.is_contiguous())
    ours = assert_matches_reference(strided(h), mask_nc, strided(W), strided(v))
    for what, a, b in zip(("ctx", "grad_h", "grad_W", "grad_v"), ours, assert_matches_reference(h, mask, W, v)):
        close(a, b, TOL[dtype], what)


# ---- values that are h ----------------------------------------------------------------------------

def autograd_with_values(fn, h, mask, W, values_of, grad):
    """ctx and the gradients of h and W of fn(h, mask, W, values_of(h)), the values made from the leaf h."""
    hl, Wl = h.detach().clone().requires_grad_(), W.detach().clone().requires_grad_()
    out = fn(hl, mask, Wl, values_of(hl))
    return (out.detach(), *torch.autograd.grad(out, [hl, Wl], grad))


# How the values are made from h: h itself; h detached (the same memory, no gradient through the
# values); its first 8 features (a view; contiguous, at h's own address, when B = N = 1).
VALUES_OF_H = {"h": lambda h: h, "detached": lambda h: h.detach(), "first_features": lambda h: h[..., :8]}


@dtypes
@pytest.mark.parametrize("shape", [(3, 37, 16, 21), (1, 1, 16, 21)], ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("values", list(VALUES_OF_H))
@targets
def test_values_made_from_h(device, path, values, shape, dtype):
    """v = h passed as v, h.detach() or h[..., :8]: the same gradients as the reference computes for
    the same expression (v given is v, whatever memory it shares with h)."""
    B, N, D, L = shape
    h, mask, W, _ = make_inputs(B, N, D, L, dtype=dtype, device=device, padding="none" if N == 1 else "anywhere")
    values_of = VALUES_OF_H[values]
    v = values_of(h)
    if values == "first_features" and B * N == 1:
        assert v.is_contiguous() and v.data_ptr() == h.data_ptr()
    grad = torch.randn(B, L, v.shape[2], generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ours = autograd_with_values(ops.label_attention, h, mask, W, values_of, grad.to(dtype).to(device))
    c = lambda t: t.detach().double().cpu()  # noqa: E731
    ref = autograd_with_values(ops.label_attention_reference, c(h), mask.cpu(), c(W), values_of, grad)
    for what, a, b, k in zip(("ctx", "grad_h", "grad_W"), ours, ref, (1, 5, 5)):
        close(a, b, k * TOL[dtype], what)


@dtypes
@targets
def test_backward_with_values_h_returns_the_values_gradient_apart(device, path, dtype):
    """The backward op with v = h (the very tensor) returns what it returns for a copy of h: grad_h
    without the values' term, which comes back as grad_v; their sum is grad_h without values."""
    h, mask, W, _ = make_inputs(4, 30, 16, 40, dtype=dtype, device=device, empty_rows=[1])
    ctx, lse = OP(h, mask, W)
    g = torch.randn(ctx.shape, dtype=torch.float64).to(dtype).to(device)
    same = OP_BACKWARD(g, h, mask, W, h, ctx, lse)
    copy = OP_BACKWARD(g, h, mask, W, h.clone(), ctx, lse)
    for what, a, b in zip(("grad_h", "grad_W", "grad_v"), same, copy):
        assert torch.equal(a, b), what
    gh, gW, _ = OP_BACKWARD(g, h, mask, W, None, ctx, lse)
    close(same[0].double() + same[2].double(), gh, 5 * TOL[dtype], "grad_h + grad_v")
    close(same[1], gW, 5 * TOL[dtype], "grad_W")


# ---- alignment, devices, streams, autocast, TF32 --------------------------------------------------

def at_odd_offset(t):
    """t's values in a view one element into a larger buffer (2 bytes off 16 for 16-bit)."""
    buf = torch.empty(t.numel() + 1, dtype=t.dtype, device=t.device)
    return buf[1:].view_as(t).copy_(t)


@pytest.mark.parametrize("dtype", HALVES, ids=str)
@pytest.mark.parametrize("Dv", [None, 24])
@targets
def test_misaligned_16bit_inputs(device, path, Dv, dtype, monkeypatch):
    """Every input and the output gradient at an odd element offset: the simple kernels on CUDA (the
    same bits as the simple kernels forced on aligned copies), and the reference's values."""
    h, mask, W, v = make_inputs(3, 40, 16, 33, Dv=Dv, dtype=dtype, device=device, seed=4)
    hm, Wm, vm = at_odd_offset(h), at_odd_offset(W), None if v is None else at_odd_offset(v)
    assert hm.data_ptr() % 16 != 0 and Wm.data_ptr() % 16 != 0
    ctx, lse = OP(hm, mask, Wm, vm)
    g = at_odd_offset(torch.randn(ctx.shape, dtype=torch.float64).to(dtype).to(device))
    misaligned = (ctx, *OP_BACKWARD(g, hm, mask, Wm, vm, at_odd_offset(ctx), lse))
    ref = reference64(h, mask, W, v, g)
    for what, a, b, k in zip(("ctx", "grad_h", "grad_W", "grad_v"), misaligned, ref, (1, 5, 5, 5)):
        close(a, b, k * TOL[dtype], what)
    if device == "cuda":
        monkeypatch.setenv(SIMPLE_KERNELS, "1")
        ctx_s, lse_s = OP(h, mask, W, v)
        aligned_simple = (ctx_s, *OP_BACKWARD(g.clone(), h, mask, W, v, ctx_s, lse_s))
        for what, a, b in zip(("ctx", "grad_h", "grad_W", "grad_v"), misaligned, aligned_simple):
            assert torch.equal(a, b), what + ": not the simple kernels"


@pytest.mark.parametrize("op", ["label_attention", "_label_attention_gemm"])
@dtypes
@pytest.mark.parametrize("device, path", CUDA_TARGETS)
def test_tensors_on_a_device_other_than_the_current_one(device, path, dtype, op):
    """Tensors on cuda:1 while cuda:0 is current: the kernels run on cuda:1 (the public op and the
    private matrix-product op, whose softmax kernels are ours)."""
    two_gpus()
    fwd = getattr(torch.ops.xmcnas_fast, op)
    bwd = getattr(torch.ops.xmcnas_fast, op + "_backward")
    torch.cuda.set_device(0)
    h, mask, W, v = make_inputs(3, 40, 16, 20, Dv=24, dtype=dtype, device="cuda:1")
    ctx, lse = fwd(h, mask, W, v)
    g = torch.randn(ctx.shape, dtype=torch.float64).to(dtype).to("cuda:1")
    ours = (ctx, *bwd(g, h, mask, W, v, ctx, lse))
    assert all(t.device == torch.device("cuda:1") for t in ours) and torch.cuda.current_device() == 0
    for what, a, b, k in zip(("ctx", "grad_h", "grad_W", "grad_v"), ours, reference64(h, mask, W, v, g),
                             (1, 5, 5, 5)):
        close(a, b, k * TOL[dtype], what)


@pytest.mark.parametrize("op", ["label_attention", "_label_attention_gemm"])
@dtypes
@pytest.mark.parametrize("device, path", CUDA_TARGETS)
def test_work_on_a_side_stream(device, path, dtype, op):
    """Inputs written on a side stream and the op run there, the default stream busy meanwhile: the
    kernels run on the current stream, so they read the inputs after they are written."""
    fwd = getattr(torch.ops.xmcnas_fast, op)
    bwd = getattr(torch.ops.xmcnas_fast, op + "_backward")
    h, mask, W, v = make_inputs(4, 300, 64, 257, Dv=32, dtype=dtype, device=device, seed=7)
    g = torch.randn(4, 257, 32, dtype=torch.float64).to(dtype).to(device)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    busy = torch.randn(2048, 2048, device=device)
    with torch.cuda.stream(side):
        hs, Ws, vs = h * 1, W * 1, v * 1  # written on the side stream
        ctx, lse = fwd(hs, mask, Ws, vs)
        ours = (ctx, *bwd(g, hs, mask, Ws, vs, ctx, lse))
    for _ in range(4):
        busy = busy @ busy / 2048  # the default stream at work meanwhile
    torch.cuda.current_stream().wait_stream(side)
    for t in (hs, Ws, vs, ctx, lse, *ours):
        t.record_stream(torch.cuda.current_stream())
    for what, a, b, k in zip(("ctx", "grad_h", "grad_W", "grad_v"), ours, reference64(h, mask, W, v, g),
                             (1, 5, 5, 5)):
        close(a, b, k * TOL[dtype], what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("Dv", [None, 24])
@targets
def test_public_op_under_autocast(device, path, Dv, dtype):
    """Under torch.autocast (bfloat16) the op computes in its inputs' dtype: the same values and
    gradients as outside autocast, nothing cast on the way."""
    h, mask, W, v = make_inputs(3, 30, 16, 20, Dv=Dv, dtype=dtype, device=device)
    grad = torch.randn(3, 20, Dv or 16, dtype=torch.float64).to(dtype).to(device)
    plain = run(ops.label_attention, h, mask, W, v, grad)
    with torch.autocast(device, dtype=torch.bfloat16):
        under = run(ops.label_attention, h, mask, W, v, grad)
    for what, a, b in zip(("ctx", "grad_h", "grad_W", "grad_v"), under, plain):
        assert a.dtype == dtype, what
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=what)


@pytest.fixture
def float32_matmul(request):
    """Sets torch.backends.cuda.matmul.fp32_precision for the test, then puts it back."""
    saved = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = request.param
    yield request.param
    torch.backends.cuda.matmul.fp32_precision = saved


@pytest.mark.parametrize("float32_matmul", ["ieee", "tf32"], indirect=True)
@targets
def test_float32_does_not_follow_the_tf32_setting(device, path, float32_matmul):
    """float32 label attention multiplies in IEEE float32 whatever PyTorch allows for matrix products:
    scores near 5000 keep their float32 precision (TF32 would move them by about 2, a factor e^2 in a
    weight), and the usual float32 tolerance holds."""
    h, mask, W, lse64 = large_scores(torch.float32, device)
    _, lse = OP(h, mask, W)
    torch.testing.assert_close(lse.double().cpu(), lse64, atol=0, rtol=1e-6)
    for Dv in (None, 24):
        assert_matches_reference(*make_inputs(4, 70, 136, 45, Dv=Dv, device=device))
