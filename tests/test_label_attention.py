"""label_attention on every device against its reference (AttentionXML's MLAttention), in float64.

Written once and parametrized, as pytorch/extension-cpp does: over the device
(`cpu`; `cuda`, marked and skipped without a GPU) and over the values (None:
the values are h; or separate values v of width Dv). The shapes reach every
code path of both devices: on the CPU its label blocks (128 labels at 256
tokens a tile, up to 2,048 at 16) and token tiles (256), the packed path of short
rows (at most 64 tokens, D and Dv at most 128: several rows a unit, 512 labels a
block in panels of 32), on AVX-512 and, through
XMCNAS_CPU_ISA=generic, on the portable path (rows padded to 16); on CUDA the tensor-core kernels (float16/bfloat16,
D and Dv multiples of 8 up to 1024: D = 136 is two 128-wide warp slices, the
second mostly padding; D = 520 five; D = 1024 eight; Dv = 264 three slices,
more than D = 136 has), the simple kernels (float64; 16-bit inputs at D = 100,
Dv = 5, a misaligned view, or D = Dv = 1024, whose tiles do not fit in shared
memory) and, for float32, cuBLAS a block of labels at a time (that path at every
block size: tests/test_label_attention_gemm.py). The input contract (what is refused, with which message) is
tests/test_op_contract.py's.
"""
import math

import pytest
import torch

from xmcnas_fast import ops

from _kernels import DEVICES, close, kernel_required, passes_without_avx512

OP = torch.ops.xmcnas_fast.label_attention
OP_BACKWARD = torch.ops.xmcnas_fast.label_attention_backward
VALUES = [None, 5, 24, 264]  # Dv: None = the values are h; odd; narrower than D; three warp slices
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Error bound on ctx, relative to the largest reference value, per input dtype (gradients: 5x).
# float64: the backward recomputes the weights from lse, which is float32 (the schema's).
TOL = {torch.float64: 1e-6, torch.float32: 2e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2}


_kernels = kernel_required("label_attention")


def make_inputs(B, N, D, L, Dv=None, dtype=torch.float32, device="cpu", padding="anywhere", empty_rows=(), seed=0):
    """h [B,N,D], mask [B,N], W [L,D], v [B,N,Dv] or None, in `dtype` on `device`.

    padding: "end" (rows of random lengths), "anywhere" (a row that starts with
    padding, runs in the middle) or "none"; empty_rows: rows with no real token.
    """
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(B, N, D, generator=g, dtype=torch.float64)
    W = torch.randn(L, D, generator=g, dtype=torch.float64) * (2.0 / math.sqrt(max(D, 1)))  # peaked, not one-hot
    v = None if Dv is None else torch.randn(B, N, Dv, generator=g, dtype=torch.float64)
    if padding == "end":
        mask = torch.arange(N).unsqueeze(0) < torch.randint(1, N + 1, (B,), generator=g).unsqueeze(1)
    elif padding == "anywhere":
        mask = torch.rand(B, N, generator=g) < 0.6
        mask[:, 0] = False
        if N > 1:
            mask[torch.arange(B), torch.randint(1, N, (B,), generator=g)] = True
    else:
        mask = torch.ones(B, N, dtype=torch.bool)
    for b in empty_rows:
        mask[b] = False
    to = lambda t: None if t is None else t.to(dtype).to(device)  # noqa: E731
    return to(h), mask.to(device), to(W), to(v)


def run(fn, h, mask, W, v, grad):
    """ctx and the gradients of h, W (and v) of fn(h, mask, W, v) for the output gradient `grad`."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, W) + (() if v is None else (v,))]
    out = fn(leaves[0], mask, leaves[1], leaves[2] if v is not None else None)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def reference64(h, mask, W, v, grad):
    """run() through the reference, in float64 on the CPU, from the inputs as given (already rounded)."""
    c = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    return run(ops.label_attention_reference, c(h), mask.cpu(), c(W), c(v), c(grad))


def assert_matches_reference(h, mask, W, v, tol=None, seed=1):
    """ctx and every gradient of ops.label_attention against the float64 reference; returns ours."""
    tol = tol or TOL[h.dtype]
    Dv = h.shape[2] if v is None else v.shape[2]
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(h.shape[0], W.shape[0], Dv, generator=g, dtype=torch.float64).to(h.dtype).to(h.device)
    ours = run(ops.label_attention, h, mask, W, v, grad)
    ref = reference64(h, mask, W, v, grad)
    assert ours[0].shape == (h.shape[0], W.shape[0], Dv) and all(t.dtype == h.dtype for t in ours)
    assert all(t.device == h.device for t in ours)
    for what, a, b, k in zip(("ctx", "grad_h", "grad_W", "grad_v"), ours, ref, (1, 5, 5, 5)):
        close(a, b, k * tol, what)
    return ours


# (B, N, D, L): the code paths each reaches are in the module docstring.
SHAPES = [(5, 37, 24, 50), (3, 37, 100, 21), (4, 70, 136, 45), (3, 65, 520, 40), (3, 33, 1024, 19),
          (3, 5, 8, 3), (2, 1, 64, 130)]


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("Dv", VALUES)
@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients(device, Dv, shape, dtype):
    h, mask, W, v = make_inputs(*shape, Dv=Dv, dtype=dtype, device=device, empty_rows=[1] if shape[0] > 2 else [])
    ctx, gh, _, *gv = assert_matches_reference(h, mask, W, v)
    real = mask.cpu()
    assert (gh.cpu()[~real] == 0).all() and all((g.cpu()[~real] == 0).all() for g in gv), "padding: no gradient"
    assert (ctx.cpu()[~real.any(1)] == 0).all(), "a row with no real token gives zeros"


@pytest.mark.parametrize("padding", ["end", "anywhere", "none"])
@pytest.mark.parametrize("Dv", [None, 24])
@pytest.mark.parametrize("device", DEVICES)
def test_log_sum_exp(device, Dv, padding):
    h, mask, W, v = make_inputs(4, 30, 16, 20, Dv=Dv, device=device, padding=padding, empty_rows=[2])
    _, lse = OP(h, mask, W, v)
    s = torch.einsum("ld,bnd->bln", W.double().cpu(), h.double().cpu())
    want = torch.logsumexp(s.masked_fill(~mask.cpu().unsqueeze(1), -math.inf), dim=-1)
    assert lse.dtype == torch.float32 and lse.shape == (4, 20)
    close(lse.cpu()[[0, 1, 3]], want[[0, 1, 3]], 1e-6, "lse")
    assert torch.isinf(lse[2]).all() and (lse[2] > 0).all(), "+inf for a row with no real token"


@pytest.mark.parametrize("Dv", [None, 3, 9])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, Dv):
    h, mask, W, v = make_inputs(3, 6, 4, 5, Dv=Dv, dtype=torch.float64, device=device, empty_rows=[1])
    leaves = [t.requires_grad_() for t in (h, W) + (() if v is None else (v,))]
    fn = (lambda h, W: ops.label_attention(h, mask, W)) if v is None else \
        (lambda h, W, v: ops.label_attention(h, mask, W, v))
    assert torch.autograd.gradcheck(fn, leaves)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("requires_grad", [False, True])
@pytest.mark.parametrize("Dv", [None, 16])
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, Dv, requires_grad, dtype):
    h, mask, W, v = make_inputs(3, 7, 8, 6, Dv=Dv, dtype=dtype, device=device, empty_rows=[0])
    for t in (h, W, v):
        if t is not None:
            t.requires_grad_(requires_grad)
    torch.library.opcheck(OP, (h, mask, W, v))
    with torch.no_grad():  # the backward op's inputs: saved tensors, not differentiated through
        ctx, lse = OP(h, mask, W, v)
    torch.library.opcheck(OP_BACKWARD, (torch.randn_like(ctx), h.detach(), mask, W.detach(),
                                        None if v is None else v.detach(), ctx, lse))


@pytest.mark.parametrize("Dv", [None, 12])
@pytest.mark.parametrize("device", DEVICES)
def test_all_padding_rows_give_zeros_and_zero_gradients(device, Dv):
    h, mask, W, v = make_inputs(4, 10, 8, 6, Dv=Dv, device=device, padding="end", empty_rows=[1, 3])
    out, gh, gW, *gv = assert_matches_reference(h, mask, W, v)
    assert (out[[1, 3]] == 0).all() and (gh[[1, 3]] == 0).all() and all((g[[1, 3]] == 0).all() for g in gv)
    grad = torch.randn_like(out)
    # grad_W gets nothing from the empty rows
    keep = lambda t: None if t is None else t[[0, 2]]  # noqa: E731
    gW_rest = run(ops.label_attention, keep(h), keep(mask), W, keep(v), grad[[0, 2]])[2]
    close(run(ops.label_attention, h, mask, W, v, grad)[2], gW_rest, 1e-6, "grad_W")
    # every row empty
    for t in run(ops.label_attention, h, torch.zeros_like(mask), W, v, grad):
        assert (t == 0).all()


@pytest.mark.parametrize("B, N, L", [(0, 6, 5), (2, 0, 5), (2, 6, 0)])
@pytest.mark.parametrize("Dv", [None, 7])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_sizes(device, Dv, B, N, L):
    h = torch.randn(B, N, 16, device=device)
    v = None if Dv is None else torch.randn(B, N, Dv, device=device)
    W = torch.randn(L, 16, device=device)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    ctx, lse = OP(h, mask, W, v)
    assert ctx.shape == (B, L, Dv or 16) and lse.shape == (B, L)
    assert (ctx == 0).all() and (torch.isinf(lse) & (lse > 0)).all()  # no real token anywhere
    gh, gW, gv = OP_BACKWARD(torch.ones_like(ctx), h, mask, W, v, ctx, lse)
    assert gh.shape == h.shape and gW.shape == W.shape and (gh == 0).all() and (gW == 0).all()
    assert gv.shape == ((0,) if v is None else v.shape) and (gv == 0).all()


@pytest.mark.parametrize("Dv", [None, 13])
@pytest.mark.parametrize("device", DEVICES)
def test_padding_is_never_read(device, Dv):
    """Whatever sits in the padding of h and v (here NaN) changes nothing, and gets zero gradient."""
    h, mask, W, v = make_inputs(3, 16, 8, 5, Dv=Dv, device=device, padding="none")
    mask[0, 5:9] = False   # a hole
    mask[1, ::2] = False   # every other token
    mask[2, :3] = False    # leading and trailing padding
    mask[2, -3:] = False
    ours = assert_matches_reference(h, mask, W, v)
    pad = ~mask.unsqueeze(-1)
    nan = lambda t: None if t is None else t.masked_fill(pad, float("nan"))  # noqa: E731
    grad = torch.randn_like(ours[0])
    for a, b in zip(run(ops.label_attention, h, mask, W, v, grad), run(ops.label_attention, nan(h), mask, W, nan(v),
                                                                       grad)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("Dv", [None, 6])
@pytest.mark.parametrize("device", DEVICES)
def test_single_token(device, Dv):
    h, mask, W, v = make_inputs(3, 1, 8, 4, Dv=Dv, device=device, padding="none")
    out = assert_matches_reference(h, mask, W, v)[0]
    values = h if v is None else v
    torch.testing.assert_close(out, values.expand(3, 4, values.shape[2]))  # one token: its value, for every label


@pytest.mark.parametrize("L", [1, 127, 129, 300])
@pytest.mark.parametrize("Dv", [None, 40])
@pytest.mark.parametrize("device", DEVICES)
def test_label_counts_around_the_block_sizes(device, Dv, L):
    assert_matches_reference(*make_inputs(3, 13, 8, L, Dv=Dv, device=device))


@pytest.mark.parametrize("Dv", [None, 20])
@pytest.mark.parametrize("device", DEVICES)
def test_rows_longer_than_a_token_tile(device, Dv):
    """More real tokens than one score tile (CPU: 256) or chunk (CUDA: 32): the online softmax across them."""
    h, mask, W, v = make_inputs(2, 1300, 8, 5, Dv=Dv, device=device)
    mask[0] = True
    assert_matches_reference(h, mask, W, v)


@pytest.mark.parametrize("device", DEVICES)
def test_row_lengths_at_tile_edges(device):
    """Real-token counts on and around the multiples of 16 (CPU row padding), 32 (CUDA chunks) and 256."""
    counts = [1, 15, 16, 17, 31, 32, 33, 255, 256, 257, 272, 513]
    h, _, W, v = make_inputs(len(counts), 520, 8, 6, Dv=24, device=device)
    mask = (torch.arange(520).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)).to(device)
    assert_matches_reference(h, mask, W, None)
    assert_matches_reference(h, mask, W, v)


@pytest.mark.parametrize("device", DEVICES)
def test_large_scores_are_stable(device):
    """Scores near +-5000 (exp overflows float32 beyond 88) with moderate differences between tokens:
    the result is the float64 softmax, up to the float32 rounding of the scores (ulp(5000) ~ 5e-4)."""
    h, mask, W, _ = make_inputs(3, 25, 16, 8, device=device)
    h[..., 0] = 1000.0
    W[:, 0] = torch.tensor([5.0, -5.0, 4.0, -4.0, 3.0, 2.0, -1.0, 1.0], device=device)
    ctx, lse = OP(h, mask, W)
    ref = reference64(h, mask, W, None, torch.ones_like(ctx))
    s = torch.einsum("ld,bnd->bln", W.double().cpu(), h.double().cpu())
    lse64 = torch.logsumexp(s.masked_fill(~mask.cpu().unsqueeze(1), -math.inf), dim=-1)
    assert lse64.abs().max() > 4000
    torch.testing.assert_close(lse.double().cpu(), lse64, atol=0, rtol=1e-6)
    torch.testing.assert_close(ctx.double().cpu(), ref[0], atol=3e-3, rtol=1e-5)


@pytest.mark.parametrize("Dv", [None, 10])
@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device, Dv):
    h, mask, W, v = make_inputs(4, 11, 16, 9, Dv=Dv, device=device)
    strided = lambda t: None if t is None else t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
    mask_nc = torch.stack([mask, ~mask], dim=-1)[..., 0]
    assert not (strided(h).is_contiguous() or strided(W).is_contiguous() or mask_nc.is_contiguous())
    ours = assert_matches_reference(strided(h), mask_nc, strided(W), strided(v))
    for a, b in zip(ours, assert_matches_reference(h, mask, W, v)):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("Dv", [None, 24])
@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device, Dv, dtype):
    h, mask, W, v = make_inputs(5, 70, 136, 300, Dv=Dv, dtype=dtype, device=device, seed=5)
    ctx, lse = OP(h, mask, W, v)
    grad = torch.randn_like(ctx)
    first = OP_BACKWARD(grad, h, mask, W, v, ctx, lse)
    for a, b in zip(first, OP_BACKWARD(grad, h, mask, W, v, ctx, lse)):
        assert torch.equal(a, b)


@pytest.mark.parametrize("device", DEVICES)
def test_values_h_are_the_kernel_without_values(device):
    """v = a copy of h gives the same ctx and lse as v=None, and grad_h without values is the sum of
    grad_h and grad_v with them; without values grad_v is empty."""
    h, mask, W, _ = make_inputs(4, 30, 16, 40, device=device, empty_rows=[1])
    ctx, lse = OP(h, mask, W)
    ctx_v, lse_v = OP(h, mask, W, h.clone())
    torch.testing.assert_close(ctx_v, ctx, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(lse_v, lse, atol=1e-6, rtol=1e-6)  # +inf on the empty row
    g = torch.randn_like(ctx)
    gh, gW, gv = OP_BACKWARD(g, h, mask, W, None, ctx, lse)
    assert gv.numel() == 0 and gv.dtype == h.dtype and gv.device == h.device
    gh_v, gW_v, gv_v = OP_BACKWARD(g, h, mask, W, h.clone(), ctx, lse)
    assert gv_v.shape == h.shape
    close(gh_v + gv_v, gh, 1e-5, "grad_h")
    close(gW_v, gW, 1e-5, "grad_W")


@pytest.mark.parametrize("device", DEVICES)
def test_values_fold_a_linear_layer(device):
    """What the model does with values: Linear(attention(h)) = attention(h, values = Linear(h)) on rows
    with a real token (a row with none gives zeros, where the unfused head gives the bias)."""
    h, mask, W, _ = make_inputs(4, 25, 32, 30, device=device, empty_rows=[3])
    fc = torch.nn.Linear(32, 12).to(device)
    unfused = fc(ops.label_attention(h, mask, W))
    fused = ops.label_attention(h, mask, W, fc(h))
    close(fused[:3], unfused[:3], 1e-5, "ctx")
    assert (fused[3] == 0).all()
    g = torch.randn_like(fused)
    g[3] = 0
    gu = torch.autograd.grad(unfused, list(fc.parameters()), g)
    gf = torch.autograd.grad(fused, list(fc.parameters()), g)
    for a, b in zip(gf, gu):
        close(a, b, 1e-5, "fc gradient")


# (D, Dv, dtype): the model's widths (D = 512 or 1024, values = the first FC layer's 256), and
# D = Dv = 1024, whose tensor-core tiles do not fit in shared memory.
MODEL_WIDTHS = [(512, None, torch.float32), (512, 256, torch.bfloat16), (1024, 256, torch.bfloat16),
                (1024, 256, torch.float16), (1024, 1024, torch.bfloat16), (512, 256, torch.float32)]


@pytest.mark.parametrize("D, Dv, dtype", MODEL_WIDTHS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_model_widths(device, D, Dv, dtype):
    """A realistic length (300 tokens) and label count (L = 257: a multiple of no tile)."""
    assert_matches_reference(*make_inputs(4, 300, D, 257, Dv=Dv, dtype=dtype, device=device, seed=3))


@pytest.mark.parametrize("N", [1, 2, 15, 16, 17])
@pytest.mark.parametrize("Dv", [None, 24])
@pytest.mark.parametrize("device", DEVICES)
def test_short_rows_many_labels(device, Dv, N):
    """Short texts against many labels: on the CPU, label blocks of up to 2,048 labels (L = 2,500 is a
    multiple of no block, tile or vector width), score tiles of the real tokens only, rows of 1 to 17
    tokens with padding anywhere, and an empty row."""
    h, mask, W, v = make_inputs(6, N, 20, 2500, Dv=Dv, device=device, padding="anywhere" if N > 2 else "end",
                                empty_rows=[2], seed=N)
    ctx = assert_matches_reference(h, mask, W, v)[0]
    assert (ctx[2] == 0).all()


@pytest.mark.parametrize("threads", [2, 3])
def test_cpu_short_rows_cut_between_threads(threads):
    """CPU: 3 rows of 16 tokens, 2 label blocks each, over 2 or 3 threads: rows cut between thread ranges."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_reference(*make_inputs(3, 16, 32, 4190, Dv=8, padding="end"))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.parametrize("threads", [1, 2, 3])
@pytest.mark.parametrize("Dv", [None, 24])
def test_cpu_short_rows_packed(Dv, threads):
    """CPU: 40 rows of 0 to 64 real tokens, most of them short: several rows packed in one unit (up to 48
    tokens), a row of 60 and one of 64 alone, runs of empty rows inside units; L = 1,100, a multiple of
    no label block (512) or panel (32); over 1 to 3 threads, which cut units between their ranges."""
    h, mask, W, v = make_inputs(40, 64, 32, 1100, Dv=Dv, padding="none", seed=threads)
    g = torch.Generator().manual_seed(threads)
    lengths = torch.randint(1, 18, (40,), generator=g)
    lengths[[3, 4, 5, 21]] = 0
    lengths[7], lengths[30] = 60, 64
    mask = torch.arange(64).unsqueeze(0) < lengths.unsqueeze(1)
    mask[9] = mask[9].roll(20)  # padding before the real tokens
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        ctx, gh, *_ = assert_matches_reference(h, mask, W, v)
    finally:
        torch.set_num_threads(saved)
    assert (ctx[[3, 4, 5, 21]] == 0).all() and (gh[~mask] == 0).all()


def test_cpu_large_outputs_are_recycled_not_shared():
    """CPU: a [B,L,Dv] output of 8 MB or more comes from a cache of buffers that dead outputs return to:
    a live output is never handed out again, and a recycled one gives the same results."""
    h, mask, W, v = make_inputs(40, 6, 16, 4190, Dv=16, padding="end", seed=7)
    first, _ = OP(h, mask, W, v)
    assert first.numel() * 4 >= 8 << 20
    second, _ = OP(h, mask, W, v)
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, second)
    del second  # back to the cache: the next call takes it (or another of the same size)
    third, lse = OP(h, mask, W, v)
    assert third.data_ptr() != first.data_ptr() and torch.equal(third, first)
    third.mul_(0)  # writable like any output, and the live first output untouched
    assert torch.equal(first, OP(h, mask, W, v)[0])
    assert_matches_reference(h[:4], mask[:4], W, v[:4])


def test_cpu_portable_path():
    """CPU: the tests of the tiling paths again with XMCNAS_CPU_ISA=generic, the kernels a CPU without
    AVX-512 runs (oneDNN or BLAS tiles padded to 16 tokens, std::exp)."""
    passes_without_avx512(__file__, "short_rows or label_counts or row_lengths or any_thread or rows_longer or padding_is_never")


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("Dv", [None, 40])
def test_cpu_any_thread_count(Dv, threads):
    """CPU: work split over more threads than rows cuts rows between threads: their grad_h (and grad_v)
    partial sums."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        assert_matches_reference(*make_inputs(2, 30, 16, 700, Dv=Dv, padding="end"))
    finally:
        torch.set_num_threads(saved)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # said by mkldnn.flags()
@pytest.mark.parametrize("Dv", [None, 24])
def test_cpu_blas_fallback_without_onednn(Dv):
    """CPU: with oneDNN switched off, the float32 tiles go to ATen's BLAS instead: same results."""
    with torch.backends.mkldnn.flags(enabled=False):
        assert_matches_reference(*make_inputs(3, 40, 16, 150, Dv=Dv))


@pytest.mark.parametrize("device", DEVICES)
def test_public_function_runs_the_compiled_kernel(device, monkeypatch):
    h, mask, W, v = make_inputs(3, 9, 8, 5, Dv=7, device=device)
    expected = OP(h, mask, W, v)[0]

    def reference_must_not_run(*args):
        raise AssertionError("ops.label_attention fell back to the reference")

    monkeypatch.setattr(ops, "label_attention_reference", reference_must_not_run)
    assert torch.equal(ops.label_attention(h, mask, W, v), expected)
    assert torch.equal(ops.label_attention(h, mask.to(torch.uint8), W, v), expected)  # any mask dtype, as bool
