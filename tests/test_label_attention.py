"""The CPU label_attention kernel against the plain-PyTorch reference (AttentionXML's MLAttention)."""
import json
import os
import subprocess
import sys

import pytest
import torch

from xmcnas_fast import ops

pytestmark = pytest.mark.skipif(not ops.has_kernel("label_attention", "cpu"),
                                reason=f"compiled kernel not in use: {ops.extension_status()}")

OP = torch.ops.xmcnas_fast.label_attention
OP_BACKWARD = torch.ops.xmcnas_fast.label_attention_backward


def make_inputs(B, N, D, L, dtype=torch.float32, padding="end", empty_rows=(), scale=1.0):
    """h [B,N,D], mask [B,N], W [L,D]; padding at the end of rows of random lengths, or anywhere."""
    h = torch.randn(B, N, D, dtype=torch.float64) * scale
    W = torch.randn(L, D, dtype=torch.float64) / D ** 0.5 * 2
    if padding == "end":
        lengths = torch.randint(1, N + 1, (B,))
        mask = torch.arange(N).unsqueeze(0) < lengths.unsqueeze(1)
    elif padding == "anywhere":
        mask = torch.rand(B, N) < 0.6
        mask[:, 0] = False  # a row that starts with padding, and a run in the middle of most rows
        mask[torch.arange(B), torch.randint(1, N, (B,))] = True if N > 1 else False
    else:
        mask = torch.ones(B, N, dtype=torch.bool)
    for b in empty_rows:
        mask[b] = False
    return h.to(dtype), mask, W.to(dtype)


def exact(h, mask, W):
    """ctx and lse in float64, straight from the definition (lse = +inf for a row with no real token)."""
    s = torch.einsum("ld,bnd->bln", W.double(), h.double())
    s = s.masked_fill(~mask.unsqueeze(1), float("-inf"))
    lse = torch.logsumexp(s, dim=-1)
    p = torch.exp(s - lse.unsqueeze(-1)).nan_to_num(0.0)
    lse = lse.masked_fill(~mask.any(1, keepdim=True), float("inf"))
    return p @ h.double(), lse


def grads(fn, h, mask, W, grad_out):
    h = h.detach().clone().requires_grad_()
    W = W.detach().clone().requires_grad_()
    out = fn(h, mask, W)
    gh, gW = torch.autograd.grad(out, (h, W), grad_out)
    return out.detach(), gh, gW


def assert_matches_reference(h, mask, W, atol=1e-5, rtol=1e-4):
    """Values and both gradients of ops.label_attention against autograd through the reference."""
    g = torch.randn(h.shape[0], W.shape[0], h.shape[2], dtype=h.dtype)
    out, gh, gW = grads(ops.label_attention, h, mask, W, g)
    ref, rgh, rgW = grads(ops.label_attention_reference, h, mask, W, g)
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(gh, rgh, atol=atol, rtol=rtol)
    torch.testing.assert_close(gW, rgW, atol=atol * 10, rtol=rtol)
    return out, gh, gW


def test_public_function_runs_the_compiled_kernel(monkeypatch):
    assert ops.has_kernel("label_attention", "cpu") and ops.has_kernel("label_attention_backward", "cpu")
    h, mask, W = make_inputs(3, 9, 8, 5)
    expected = OP(h, mask, W)[0]

    def reference_must_not_run(*args):
        raise AssertionError("ops.label_attention fell back to the reference")

    monkeypatch.setattr(ops, "label_attention_reference", reference_must_not_run)
    assert torch.equal(ops.label_attention(h, mask, W), expected)


@pytest.mark.parametrize("padding", ["end", "anywhere", "none"])
def test_float32_values_and_gradients(padding):
    h, mask, W = make_inputs(5, 37, 24, 50, padding=padding)
    assert_matches_reference(h, mask, W)


def test_log_sum_exp_and_float64_truth():
    h, mask, W = make_inputs(4, 30, 16, 20, padding="anywhere", empty_rows=[2])
    ctx, lse = OP(h, mask, W)
    ctx64, lse64 = exact(h, mask, W)
    assert lse.dtype == torch.float32 and lse.shape == (4, 20)
    torch.testing.assert_close(ctx.double(), ctx64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-6)  # +inf on the empty row
    assert torch.isinf(lse[2]).all() and (lse[2] > 0).all()


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
def test_half_precision(dtype, tol):
    h, mask, W = make_inputs(4, 40, 32, 70, dtype=dtype, padding="anywhere")
    g = torch.randn(4, 70, 32, dtype=dtype)
    out, gh, gW = grads(ops.label_attention, h, mask, W, g)
    assert out.dtype == gh.dtype == gW.dtype == dtype
    # the reference on the same rounded inputs, in float32 (what the kernel accumulates in)
    ref, rgh, rgW = grads(ops.label_attention_reference, h.float(), mask, W.float(), g.float())
    torch.testing.assert_close(out.float(), ref, atol=tol, rtol=tol)
    torch.testing.assert_close(gh.float(), rgh, atol=tol * rgh.abs().max().item(), rtol=tol)
    torch.testing.assert_close(gW.float(), rgW, atol=tol * rgW.abs().max().item(), rtol=tol)


def test_gradcheck_float64():
    h, mask, W = make_inputs(3, 6, 4, 5, dtype=torch.float64, padding="anywhere", empty_rows=[1])
    h.requires_grad_()
    W.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, W: ops.label_attention(h, mask, W), (h, W))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(requires_grad):
    h, mask, W = make_inputs(3, 7, 8, 6, padding="anywhere", empty_rows=[0])
    h.requires_grad_(requires_grad)
    W.requires_grad_(requires_grad)
    torch.library.opcheck(OP, (h, mask, W))


def test_opcheck_backward():
    h, mask, W = make_inputs(3, 7, 8, 6, padding="anywhere", empty_rows=[0])
    ctx, lse = OP(h, mask, W)
    torch.library.opcheck(OP_BACKWARD, (torch.randn_like(ctx), h, mask, W, None, ctx, lse))


def test_non_contiguous_inputs():
    h, mask, W = make_inputs(4, 11, 16, 9, padding="anywhere")
    h_nc = h.transpose(1, 2).contiguous().transpose(1, 2)          # [B,N,D] with D-major storage
    W_nc = W.t().contiguous().t()
    mask_nc = torch.stack([mask, ~mask], dim=-1)[..., 0]           # a strided view
    assert not (h_nc.is_contiguous() or W_nc.is_contiguous() or mask_nc.is_contiguous())
    out, gh, gW = assert_matches_reference(h_nc, mask_nc, W_nc)
    ctx, lse = OP(h, mask, W)
    g = torch.randn_like(ctx)
    g_nc = g.transpose(0, 1).contiguous().transpose(0, 1)
    ref = OP_BACKWARD(g, h, mask, W, None, ctx, lse)
    for a, b in zip(OP_BACKWARD(g_nc, h_nc, mask_nc, W_nc, None, ctx, lse), ref):
        torch.testing.assert_close(a, b)


def test_single_token():
    h, mask, W = make_inputs(3, 1, 8, 4, padding="none")
    out, gh, gW = assert_matches_reference(h, mask, W)
    # one token: the context is that token, for every label
    torch.testing.assert_close(out, h.expand(3, 4, 8))


def test_all_padding_rows_give_zeros_and_zero_gradients():
    h, mask, W = make_inputs(4, 10, 8, 6, empty_rows=[1, 3])
    g = torch.randn(4, 6, 8)
    out, gh, gW = grads(ops.label_attention, h, mask, W, g)
    assert torch.isfinite(out).all() and torch.isfinite(gh).all() and torch.isfinite(gW).all()
    assert (out[[1, 3]] == 0).all() and (gh[[1, 3]] == 0).all()
    assert_matches_reference(h, mask, W)
    # grad_W gets nothing from the empty rows
    _, _, gW_rest = grads(ops.label_attention, h[[0, 2]], mask[[0, 2]], W, g[[0, 2]])
    torch.testing.assert_close(gW, gW_rest)
    # every row empty
    out, gh, gW = grads(ops.label_attention, h, torch.zeros_like(mask), W, g)
    assert (out == 0).all() and (gh == 0).all() and (gW == 0).all()


def test_padding_is_never_read():
    """Whatever sits in the padding (here NaN) changes nothing, and gets zero gradient."""
    h, mask, W = make_inputs(4, 20, 8, 7, padding="anywhere")
    g = torch.randn(4, 7, 8)
    out, gh, gW = grads(ops.label_attention, h, mask, W, g)
    h_nan = h.masked_fill(~mask.unsqueeze(-1), float("nan"))
    out2, gh2, gW2 = grads(ops.label_attention, h_nan, mask, W, g)
    assert torch.equal(out, out2) and torch.equal(gh, gh2) and torch.equal(gW, gW2)
    assert (gh[~mask] == 0).all()


def test_padding_in_the_middle_of_rows():
    h, mask, W = make_inputs(3, 16, 8, 5, padding="none")
    mask[0, 5:9] = False   # a hole
    mask[1, ::2] = False   # every other token
    mask[2, :3] = False    # leading padding
    mask[2, -3:] = False
    assert_matches_reference(h, mask, W)


@pytest.mark.parametrize("L", [1, 127, 129, 300])
def test_label_counts_around_the_block_size(L):
    h, mask, W = make_inputs(3, 13, 8, L, padding="anywhere")
    assert_matches_reference(h, mask, W)


def test_rows_longer_than_a_token_tile():
    """More real tokens than one score tile: the online softmax across tiles."""
    h, mask, W = make_inputs(2, 1300, 8, 5, padding="anywhere")
    mask[0] = True
    out = OP(h, mask, W)
    ctx64, lse64 = exact(h, mask, W)
    torch.testing.assert_close(out[0].double(), ctx64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1].double(), lse64, atol=1e-4, rtol=1e-6)
    assert_matches_reference(h, mask, W)


def test_row_lengths_at_tile_edges():
    """Real-token counts on and around the multiples of 16 (row padding) and 256 (score tiles)."""
    counts = [1, 15, 16, 17, 255, 256, 257, 272, 513]
    h, mask, W = make_inputs(len(counts), 520, 8, 6, padding="none")
    mask = torch.arange(520).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
    ctx, lse = OP(h, mask, W)
    ctx64, lse64 = exact(h, mask, W)
    torch.testing.assert_close(ctx.double(), ctx64, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lse.double(), lse64, atol=1e-5, rtol=1e-6)
    assert_matches_reference(h, mask, W)


def test_large_scores_are_stable():
    """Scores near +-5000 (exp overflows float32 beyond 88) with moderate differences between tokens:
    the result is the float64 softmax, up to the float32 rounding of the scores (ulp(5000) ~ 5e-4)."""
    h, mask, W = make_inputs(3, 25, 16, 8, padding="anywhere")
    h[..., 0] = 1000.0
    W[:, 0] = torch.tensor([5.0, -5.0, 4.0, -4.0, 3.0, 2.0, -1.0, 1.0])
    ctx, lse = OP(h, mask, W)
    ctx64, lse64 = exact(h, mask, W)
    assert lse64.abs().max() > 4000
    torch.testing.assert_close(lse.double(), lse64, atol=0, rtol=1e-6)
    torch.testing.assert_close(ctx.double(), ctx64, atol=3e-3, rtol=1e-5)
    g = torch.randn_like(ctx)
    _, gh, gW = grads(ops.label_attention, h, mask, W, g)
    _, rgh, rgW = grads(ops.label_attention_reference, h.double(), mask, W.double(), g.double())
    torch.testing.assert_close(gh.double(), rgh, atol=1e-2, rtol=1e-3)
    # grad_W[:, 0] = 1000 * sum_n ds_n, a sum that is 0 up to float32 cancellation: only finite
    assert torch.isfinite(gW[:, 0]).all()
    torch.testing.assert_close(gW[:, 1:].double(), rgW[:, 1:], atol=1e-2, rtol=1e-3)


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_any_thread_count(threads):
    """Work split over more threads than rows cuts rows between threads: their grad_h partial sums."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h, mask, W = make_inputs(2, 30, 16, 700, padding="end")
        assert_matches_reference(h, mask, W)
    finally:
        torch.set_num_threads(saved)


@pytest.mark.filterwarnings("ignore:TF32 acceleration on top of oneDNN")  # said by mkldnn.flags()
def test_blas_fallback_without_onednn():
    """With oneDNN switched off, the float32 tiles go to ATen's BLAS instead: same results."""
    h, mask, W = make_inputs(3, 40, 16, 150, padding="anywhere")
    with torch.backends.mkldnn.flags(enabled=False):
        assert_matches_reference(h, mask, W)


@pytest.mark.parametrize("args,message", [
    (lambda h, m, W: (h[0], m, W), "expected h [B,N,D]"),
    (lambda h, m, W: (h, m[:, :-1], W), "mask must be [B,N]"),
    (lambda h, m, W: (h, m, W[:, :-1]), "W must be [L, D="),
    (lambda h, m, W: (h, m.float(), W), "mask must be bool"),
    (lambda h, m, W: (h, m, W.double()), "W must have h's dtype"),
    (lambda h, m, W: (h.long(), m, W.long()), "h must be float32"),
])
def test_bad_inputs_raise_value_error(args, message):
    h, mask, W = make_inputs(2, 5, 4, 3)
    with pytest.raises(ValueError, match="^label_attention: " + message.replace("[", r"\[")):
        OP(*args(h, mask, W))


def test_bad_backward_inputs_raise_value_error():
    h, mask, W = make_inputs(2, 5, 4, 3)
    ctx, lse = OP(h, mask, W)
    g = torch.randn_like(ctx)
    with pytest.raises(ValueError, match=r"^label_attention: grad_ctx and ctx must be \[B,L,Dv\]"):
        OP_BACKWARD(g[:, :2], h, mask, W, None, ctx, lse)
    with pytest.raises(ValueError, match="^label_attention: grad_ctx and ctx must have"):
        OP_BACKWARD(g.double(), h, mask, W, None, ctx, lse)
    with pytest.raises(ValueError, match="^label_attention: lse must be float32"):
        OP_BACKWARD(g, h, mask, W, None, ctx, lse.double())
    with pytest.raises(ValueError, match="^label_attention: "):
        ops.label_attention(h, mask[:1], W)


# --------------------------------------------------------------------------------------------
# Separate values: ctx = softmax(W h^T) v, v [B,N,Dv] with h's padding
# --------------------------------------------------------------------------------------------

def make_values(h, Dv):
    """Values [B,N,Dv] in h's dtype, independent of h."""
    return torch.randn(h.shape[0], h.shape[1], Dv, dtype=torch.float64).to(h.dtype)


def grads_v(fn, h, mask, W, v, grad_out):
    h, W, v = (t.detach().clone().requires_grad_() for t in (h, W, v))
    out = fn(h, mask, W, v)
    return (out.detach(), *torch.autograd.grad(out, (h, W, v), grad_out))


def assert_values_match_reference(h, mask, W, v, atol=1e-5, rtol=1e-4):
    """ctx and the gradients of h, W and v against autograd through the reference."""
    g = torch.randn(h.shape[0], W.shape[0], v.shape[2], dtype=h.dtype)
    ours = grads_v(ops.label_attention, h, mask, W, v, g)
    ref = grads_v(ops.label_attention_reference, h, mask, W, v, g)
    assert ours[0].shape == (h.shape[0], W.shape[0], v.shape[2])
    for what, a, b, scale in zip(("ctx", "grad_h", "grad_W", "grad_v"), ours, ref, (1, 1, 10, 1)):
        torch.testing.assert_close(a, b, atol=atol * scale, rtol=rtol, msg=lambda m: f"{what}: {m}")
    return ours


@pytest.mark.parametrize("Dv", [5, 24, 72])  # narrower than D = 24, as wide, wider
@pytest.mark.parametrize("padding", ["end", "anywhere", "none"])
def test_values_float32(padding, Dv):
    h, mask, W = make_inputs(5, 37, 24, 50, padding=padding)
    assert_values_match_reference(h, mask, W, make_values(h, Dv))


def test_values_none_is_unchanged_and_equals_values_h():
    """v=None is the kernel of before (checked against the reference above); v = a copy of h gives the
    same ctx, and grad_h without values is the sum of grad_h and grad_v with them."""
    h, mask, W = make_inputs(4, 30, 16, 40, padding="anywhere", empty_rows=[1])
    ctx, lse = OP(h, mask, W)
    ctx_v, lse_v = OP(h, mask, W, h.clone())
    assert torch.equal(ctx, ctx_v) and torch.equal(lse, lse_v)
    g = torch.randn_like(ctx)
    gh, gW, gv = OP_BACKWARD(g, h, mask, W, None, ctx, lse)
    assert gv.numel() == 0 and gv.dtype == h.dtype
    gh_v, gW_v, gv_v = OP_BACKWARD(g, h, mask, W, h.clone(), ctx, lse)
    assert gv_v.shape == h.shape
    torch.testing.assert_close(gh, gh_v + gv_v, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(gW, gW_v, atol=1e-5, rtol=1e-5)
    assert_matches_reference(h, mask, W)


def test_values_fold_a_linear_layer():
    """What the model does with values: Linear(attention(h)) = attention(h, values = Linear(h)) on rows
    with a real token (a row with none gives zeros, where the unfused head gives the bias)."""
    h, mask, W = make_inputs(4, 25, 32, 30, padding="anywhere", empty_rows=[3])
    fc = torch.nn.Linear(32, 12)
    unfused = fc(ops.label_attention(h, mask, W))
    fused = ops.label_attention(h, mask, W, fc(h))
    torch.testing.assert_close(fused[:3], unfused[:3], atol=1e-5, rtol=1e-5)
    assert (fused[3] == 0).all()
    g = torch.randn_like(fused)
    g[3] = 0
    gu = torch.autograd.grad(unfused, list(fc.parameters()), g)
    gf = torch.autograd.grad(fused, list(fc.parameters()), g)
    for a, b in zip(gf, gu):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


@pytest.mark.parametrize("Dv", [3, 9])
def test_values_gradcheck_float64(Dv):
    h, mask, W = make_inputs(3, 6, 4, 5, dtype=torch.float64, padding="anywhere", empty_rows=[1])
    v = make_values(h, Dv)
    for t in (h, W, v):
        t.requires_grad_()
    assert torch.autograd.gradcheck(lambda h, W, v: ops.label_attention(h, mask, W, v), (h, W, v))


@pytest.mark.parametrize("requires_grad", [False, True])
def test_values_opcheck(requires_grad):
    h, mask, W = make_inputs(3, 7, 8, 6, padding="anywhere", empty_rows=[0])
    v = make_values(h, 5)
    for t in (h, W, v):
        t.requires_grad_(requires_grad)
    torch.library.opcheck(OP, (h, mask, W, v))


def test_values_opcheck_backward():
    h, mask, W = make_inputs(3, 7, 8, 6, padding="anywhere", empty_rows=[0])
    v = make_values(h, 11)
    ctx, lse = OP(h, mask, W, v)
    torch.library.opcheck(OP_BACKWARD, (torch.randn_like(ctx), h, mask, W, v, ctx, lse))


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-2), (torch.float16, 2e-3)])
@pytest.mark.parametrize("Dv", [16, 48])
def test_values_half_precision(dtype, tol, Dv):
    h, mask, W = make_inputs(4, 40, 32, 70, dtype=dtype, padding="anywhere")
    v = make_values(h, Dv)
    g = torch.randn(4, 70, Dv, dtype=dtype)
    ours = grads_v(ops.label_attention, h, mask, W, v, g)
    assert all(t.dtype == dtype for t in ours)
    # the reference on the same rounded inputs, in float32 (what the kernel accumulates in)
    ref = grads_v(ops.label_attention_reference, h.float(), mask, W.float(), v.float(), g.float())
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a.float(), b, atol=tol * b.abs().max().item(), rtol=tol)


def test_values_padding_in_the_middle_of_rows_and_never_read():
    h, mask, W = make_inputs(3, 16, 8, 5, padding="none")
    mask[0, 5:9] = False   # a hole
    mask[1, ::2] = False   # every other token
    mask[2, :3] = False    # leading and trailing padding
    mask[2, -3:] = False
    v = make_values(h, 13)
    ours = assert_values_match_reference(h, mask, W, v)
    # NaN in the padding of h and v changes nothing, and the padding gets zero gradient
    pad = ~mask.unsqueeze(-1)
    g = torch.randn(3, 5, 13)
    g_ref = grads_v(ops.label_attention, h, mask, W, v, g)
    nan = grads_v(ops.label_attention, h.masked_fill(pad, float("nan")), mask, W, v.masked_fill(pad, float("nan")), g)
    for a, b in zip(g_ref, nan):
        assert torch.equal(a, b)
    assert (ours[1][~mask] == 0).all() and (ours[3][~mask] == 0).all()


def test_values_all_padding_rows():
    h, mask, W = make_inputs(4, 10, 8, 6, empty_rows=[1, 3])
    v = make_values(h, 12)
    out, gh, gW, gv = assert_values_match_reference(h, mask, W, v)
    assert (out[[1, 3]] == 0).all() and (gh[[1, 3]] == 0).all() and (gv[[1, 3]] == 0).all()
    g = torch.randn(4, 6, 12)
    out, gh, gW, gv = grads_v(ops.label_attention, h, torch.zeros_like(mask), W, v, g)
    assert (out == 0).all() and (gh == 0).all() and (gW == 0).all() and (gv == 0).all()


def test_values_single_token():
    h, mask, W = make_inputs(3, 1, 8, 4, padding="none")
    v = make_values(h, 6)
    out, _, _, _ = assert_values_match_reference(h, mask, W, v)
    torch.testing.assert_close(out, v.expand(3, 4, 6))  # one token: its value, for every label


def test_values_rows_longer_than_a_token_tile():
    """The online softmax across tiles rescales a [labels, Dv] accumulator."""
    h, mask, W = make_inputs(2, 600, 8, 5, padding="anywhere")
    mask[0] = True
    assert_values_match_reference(h, mask, W, make_values(h, 20))


@pytest.mark.parametrize("threads", [1, 3])
def test_values_any_thread_count(threads):
    """Rows cut between threads: partial sums of grad_h and grad_v."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h, mask, W = make_inputs(2, 30, 16, 700, padding="end")
        assert_values_match_reference(h, mask, W, make_values(h, 40))
    finally:
        torch.set_num_threads(saved)


def test_values_non_contiguous():
    h, mask, W = make_inputs(3, 11, 16, 9, padding="anywhere")
    v = make_values(h, 10).transpose(1, 2).contiguous().transpose(1, 2)
    assert not v.is_contiguous()
    assert_values_match_reference(h, mask, W, v)


def test_values_bad_inputs():
    h, mask, W = make_inputs(2, 5, 4, 3)
    v = make_values(h, 6)
    for bad, message in [(v[:, :-1], "v must be"), (v[0], "v must be"), (v.double(), "v must have h's dtype")]:
        with pytest.raises(ValueError, match="^label_attention: " + message):
            OP(h, mask, W, bad)
        with pytest.raises(ValueError, match="^label_attention: " + message):
            ops.label_attention(h, mask, W, bad)
    ctx, lse = OP(h, mask, W, v)
    with pytest.raises(ValueError, match=r"^label_attention: grad_ctx and ctx must be \[B,L,Dv\]"):
        OP_BACKWARD(torch.randn(2, 3, 4), h, mask, W, v, ctx, lse)


def test_supports_values(monkeypatch):
    assert ops.label_attention_supports_values("cpu")
    assert ops.label_attention_supports_values(torch.device("cpu"))
    # CUDA: yes where the reference serves it, no where the compiled CUDA kernel does
    monkeypatch.setattr(ops, "has_kernel", lambda op, device_type: True)
    assert not ops.label_attention_supports_values("cuda")
    monkeypatch.setattr(ops, "has_kernel", lambda op, device_type: device_type == "cpu")
    assert ops.label_attention_supports_values("cuda:0")
    assert ops.label_attention_supports_values("cpu")


def test_values_with_the_reference_fallback():
    """Without the compiled extension, label_attention(..., v) is the reference and says it supports values."""
    code = ("import warnings, torch; warnings.simplefilter('ignore')\n"
            "from xmcnas_fast import ops\n"
            "assert not ops.EXTENSION_LOADED and ops.label_attention_supports_values('cpu')\n"
            "torch.manual_seed(0)\n"
            "h, W, v = torch.randn(2, 5, 4), torch.randn(3, 4), torch.randn(2, 5, 6)\n"
            "m = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)\n"
            "print(ops.label_attention(h, m, W, v).tolist())\n")
    env = {**os.environ, "XMCNAS_DISABLE_EXTENSION": "1"}
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                         cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))), timeout=120)
    assert res.returncode == 0, res.stderr
    torch.manual_seed(0)
    h, W, v = torch.randn(2, 5, 4), torch.randn(3, 4), torch.randn(2, 5, 6)
    m = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool)
    torch.testing.assert_close(torch.tensor(json.loads(res.stdout)), OP(h, m, W, v)[0])
