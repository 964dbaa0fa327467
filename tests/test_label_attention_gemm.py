"""label_attention through the matrix-product library, a block of labels at a time (what CUDA runs
for float32, and the rival of the tensor-core kernels for 16-bit inputs; csrc/label_attention_gemm.h),
on every device against the float64 reference.

The path is built for every device and reached through the private operators
_label_attention_gemm(_backward), which take the labels per block (0: chosen by size), so that
blocks of 1, 7 and more labels than there are run here on the CPU as they do on a GPU.
"""
import pytest
import torch

from _kernels import DEVICES, close, kernel_required
from test_label_attention import TOL, make_inputs, reference64

GEMM = torch.ops.xmcnas_fast._label_attention_gemm
GEMM_BACKWARD = torch.ops.xmcnas_fast._label_attention_gemm_backward

_kernels = kernel_required("label_attention")


def gemm_run(h, mask, W, v, grad, block):
    """ctx and the gradients of h, W (and v) through the private forward and backward operators."""
    ctx, lse = GEMM(h, mask, W, v, block)
    gh, gW, gv = GEMM_BACKWARD(grad, h, mask, W, v, ctx, lse, block)
    return (ctx, gh, gW) + (() if v is None else (gv,)), lse


def check(h, mask, W, v, block, seed=1):
    Dv = h.shape[2] if v is None else v.shape[2]
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(h.shape[0], W.shape[0], Dv, generator=g, dtype=torch.float64).to(h.dtype).to(h.device)
    ours, lse = gemm_run(h, mask, W, v, grad, block)
    ref = reference64(h, mask, W, v, grad)
    assert all(t.dtype == h.dtype and t.device == h.device for t in ours) and lse.dtype == torch.float32
    for what, a, b, k in zip(("ctx", "grad_h", "grad_W", "grad_v"), ours, ref, (1, 5, 5, 5)):
        close(a, b, k * TOL[h.dtype], what)
    return ours, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("block", [0, 1, 7, 64])
@pytest.mark.parametrize("Dv", [None, 5, 24])
@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients_for_any_block_of_labels(device, Dv, block, dtype):
    h, mask, W, v = make_inputs(5, 37, 24, 50, Dv=Dv, dtype=dtype, device=device, empty_rows=[2])
    (ctx, gh, *_), lse = check(h, mask, W, v, block)
    assert (ctx[2] == 0).all() and (gh[2] == 0).all() and torch.isinf(lse[2]).all() and (lse[2] > 0).all()


@pytest.mark.parametrize("shape", [(3, 65, 520, 40), (3, 33, 1024, 19), (2, 1, 64, 130), (4, 300, 16, 9)],
                         ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_wide_and_long_shapes(device, dtype, shape):
    B, N, D, L = shape
    for Dv in (None, 264):
        check(*make_inputs(B, N, D, L, Dv=Dv, dtype=dtype, device=device, padding="end"), block=0)


@pytest.mark.parametrize("device", DEVICES)
def test_the_blocks_change_nothing_but_rounding(device):
    h, mask, W, v = make_inputs(4, 20, 16, 33, Dv=12, device=device)
    grad = torch.randn(4, 33, 12, device=device)
    whole, lse = gemm_run(h, mask, W, v, grad, 33)
    for block in (1, 5, 32):
        parts, lse_b = gemm_run(h, mask, W, v, grad, block)
        close(lse_b, lse, 1e-6, "lse")
        for a, b in zip(parts, whole):
            close(a, b, 1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_padding_is_never_read(device):
    h, mask, W, v = make_inputs(3, 16, 8, 5, Dv=13, device=device, padding="none")
    mask[1, ::2] = False
    grad = torch.randn(3, 5, 13, device=device)
    pad = ~mask.unsqueeze(-1)
    clean, _ = gemm_run(h, mask, W, v, grad, 2)
    dirty, _ = gemm_run(h.masked_fill(pad, float("nan")), mask, W, v.masked_fill(pad, float("inf")), grad, 2)
    for a, b in zip(clean, dirty):
        assert torch.equal(a, b)


@pytest.mark.parametrize("B, N, L", [(0, 6, 5), (2, 0, 5), (2, 6, 0)])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_sizes(device, B, N, L):
    h, W = torch.randn(B, N, 16, device=device), torch.randn(L, 16, device=device)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    ctx, lse = GEMM(h, mask, W)
    assert ctx.shape == (B, L, 16) and (ctx == 0).all() and (torch.isinf(lse) & (lse > 0)).all()
    gh, gW, gv = GEMM_BACKWARD(torch.ones_like(ctx), h, mask, W, None, ctx, lse)
    assert (gh == 0).all() and gW.shape == W.shape and (gW == 0).all() and gv.numel() == 0


@pytest.mark.parametrize("device", DEVICES)
def test_it_refuses_what_it_does_not_compute(device):
    h, mask, W, _ = make_inputs(2, 4, 8, 3, device=device)
    with pytest.raises(ValueError, match="block must be >= 0"):
        GEMM(h, mask, W, None, -1)
    with pytest.raises(ValueError, match="W must have h's dtype"):     # the operator's own contract
        GEMM(h, mask, W.double())
    with pytest.raises(ValueError, match="h must be float32, bfloat16, float16 or float64, got int64"):
        GEMM(h.long(), mask, W.long())


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("device", DEVICES)
def test_16bit_gradients_are_summed_over_blocks_in_float32(device, seed):
    """grad_h sums one product per block. In float32, 40 blocks of one label stay within a bfloat16
    unit in the last place (of the largest value) of the float64 truth, as one block does; summed in
    bfloat16, each block would add a rounding of the running sum (3-5 units, measured)."""
    h, mask, W, _ = make_inputs(3, 24, 16, 40, dtype=torch.bfloat16, device=device, padding="none", seed=seed)
    grad = torch.randn(3, 40, 16, generator=torch.Generator().manual_seed(seed)).bfloat16().to(device)
    truth = reference64(h, mask, W, None, grad)[1]
    (_, gh, *_), _ = gemm_run(h, mask, W, None, grad, 1)
    units = (gh.double().cpu() - truth).abs().max() / truth.abs().max() * 256
    assert units <= 2.0, units


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_autocast_does_not_reach_the_products(device, dtype):
    """Under torch.autocast the products inside would run in autocast's dtype; the path turns it off."""
    h, mask, W, v = make_inputs(3, 30, 64, 20, Dv=16, dtype=dtype, device=device)
    grad = torch.randn(3, 20, 16, device=device).to(dtype)
    plain, _ = gemm_run(h, mask, W, v, grad, 7)
    with torch.autocast(device, dtype=torch.bfloat16 if dtype == torch.float32 else torch.float16):
        under, _ = gemm_run(h, mask, W, v, grad, 7)
    for a, b in zip(under, plain):
        assert a.dtype == b.dtype and torch.equal(a, b)


@pytest.mark.cuda
@pytest.mark.parametrize("Dv", [None, 24])
def test_cuda_float32_label_attention_is_this_path(Dv):
    h, mask, W, v = make_inputs(3, 40, 64, 70, Dv=Dv, device="cuda")
    ours = torch.ops.xmcnas_fast.label_attention(h, mask, W, v)
    for a, b in zip(ours, GEMM(h, mask, W, v)):
        assert torch.equal(a, b)
