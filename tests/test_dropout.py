"""The fused ReLU + dropout op: its mask is the documented counter-based stream, recomputed in backward."""
import numpy as np
import pytest
import torch

from xmcnas_fast import ops

from _kernels import DEVICES, require_kernel

def numpy_keep(seed, n, p):
    """dropout_mask.h in numpy: 16-bit lane i % 4 of splitmix64(seed + (i // 4) * phi) >= round(p * 2^16)."""
    i = np.arange(n, dtype=np.uint64)
    with np.errstate(over="ignore"):
        z = np.uint64(seed) + (i >> np.uint64(2)) * np.uint64(0x9E3779B97F4A7C15)
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    lane = (z >> (np.uint64(16) * (i & np.uint64(3)))) & np.uint64(0xFFFF)
    return lane.astype(np.int64) >= int(round(p * 2**16))


def scale(p):
    return 65536 / (65536 - round(p * 2**16))


def op(x, p, seed, relu):
    return torch.ops.xmcnas_fast.dropout(x, p, torch.tensor(seed), relu)


pytestmark = pytest.mark.skipif(not ops.has_kernel("dropout", "cpu"), reason="compiled extension not built")


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("p", [0.2, 0.5])
def test_mask_is_the_documented_stream(relu, p):
    x = torch.randn(7, 33, 65)
    seed = 123456789012345
    y = op(x, p, seed, relu)
    keep = torch.from_numpy(numpy_keep(seed, x.numel(), p)).view_as(x)
    expected = torch.where(keep, (x.clamp_min(0) if relu else x) * scale(p), torch.zeros(()))
    torch.testing.assert_close(y, expected, rtol=1e-6, atol=0)


def test_kept_fraction_and_scale():
    x = torch.ones(1 << 20)
    for p in (0.1, 0.5, 0.9):
        y = op(x, p, 7, False)
        kept = (y != 0).double().mean().item()
        assert abs(kept - (1 - p)) < 5 * np.sqrt(p * (1 - p) / x.numel())
        assert y.sum().item() / x.numel() == pytest.approx(1.0, abs=0.01)


@pytest.mark.parametrize("relu", [False, True])
def test_backward_recomputes_the_mask(relu):
    x = torch.randn(5, 17, 9, dtype=torch.float64, requires_grad=True)
    seed = 99
    torch.autograd.gradcheck(lambda t: op(t, 0.3, seed, relu), (x,))
    y = op(x, 0.3, seed, relu)
    g = torch.randn_like(y)
    (gx,) = torch.autograd.grad(y, x, g)
    keep = torch.from_numpy(numpy_keep(seed, x.numel(), 0.3)).view_as(x)
    flows = keep & (x > 0) if relu else keep
    torch.testing.assert_close(gx, torch.where(flows, g * scale(0.3), torch.zeros(())))


def test_opcheck():
    x = torch.randn(4, 6, requires_grad=True)
    for relu in (False, True):
        torch.library.opcheck(torch.ops.xmcnas_fast.dropout.default, (x, 0.4, torch.tensor(5), relu))


def test_public_function_seeding_eval_and_dtypes():
    x = torch.randn(64, 64)
    torch.manual_seed(3)
    a = ops.dropout(x, 0.5, True, relu=True)
    torch.manual_seed(3)
    b = ops.dropout(x, 0.5, True, relu=True)
    c = ops.dropout(x, 0.5, True, relu=True)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(ops.dropout(x, 0.5, training=False, relu=True), torch.relu(x))
    assert ops.dropout(x, 0.0, True) is x
    xb = x.bfloat16()
    yb = op(xb, 0.5, 11, True)
    assert yb.dtype == torch.bfloat16
    torch.testing.assert_close(yb.float(), op(xb.float(), 0.5, 11, True), rtol=1e-2, atol=1e-2)
    xt = torch.randn(8, 10).t()                          # non-contiguous: mask by row-major index
    torch.testing.assert_close(op(xt, 0.5, 1, False), op(xt.contiguous(), 0.5, 1, False))
    with pytest.raises(ValueError, match="p must be in"):
        ops.dropout(x, 1.0)
    with pytest.raises(ValueError, match="p must be in"):
        op(x, -0.1, 0, False)


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, relu):
    require_kernel("dropout", device)
    x = torch.randn(5, 7, dtype=torch.float64, device=device)
    x = (x + x.sign() * 0.1).requires_grad_()          # away from ReLU's kink at 0
    seed = torch.tensor(99)
    assert torch.autograd.gradcheck(lambda x: torch.ops.xmcnas_fast.dropout(x, 0.3, seed, relu), (x,))


@pytest.mark.parametrize("case, message", [
    (lambda x, s: (x, 1.0, s, True), "p must be in [0, 1), got 1"),
    (lambda x, s: (x, -0.1, s, True), "p must be in [0, 1), got -0.1"),
    (lambda x, s: (x.long(), 0.5, s, True), "x must be float32, float64, bfloat16 or float16, got int64"),
    (lambda x, s: (x, 0.5, s.int(), True), "seed must be one int64 on the CPU"),
    (lambda x, s: (x, 0.5, torch.tensor([1, 2]), True), "seed must be one int64 on the CPU"),
], ids=["p=1", "p<0", "int64", "int32 seed", "two seeds"])
@pytest.mark.parametrize("device", DEVICES)
def test_refusals_are_the_same_on_every_device(device, case, message):
    require_kernel("dropout", device)
    args = case(torch.randn(3, 4, device=device), torch.tensor(5))
    with pytest.raises(ValueError) as forward:
        torch.ops.xmcnas_fast.dropout(*args)
    assert str(forward.value).splitlines()[0] == "dropout: " + message
    with pytest.raises(ValueError) as backward:
        torch.ops.xmcnas_fast.dropout_backward(args[0], args[0], *args[1:])
    assert str(backward.value).splitlines()[0] == "dropout_backward: " + message
    x = torch.randn(3, 4, device=device)
    with pytest.raises(ValueError) as shapes:
        torch.ops.xmcnas_fast.dropout_backward(x, x.t(), 0.5, torch.tensor(5), True)
    assert str(shapes.value).splitlines()[0] == "dropout_backward: grad [3, 4] and output [4, 3] differ in shape"


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("relu", [False, True])
def test_cuda_drops_the_same_elements_as_the_cpu(dtype, relu):
    x = torch.randn(3, 1001, 37).to(dtype)
    g = torch.randn_like(x)
    y_cpu = op(x, 0.35, 2024, relu)
    y_gpu = op(x.cuda(), 0.35, 2024, relu)
    torch.testing.assert_close(y_gpu.cpu(), y_cpu)
    gx_cpu = torch.ops.xmcnas_fast.dropout_backward(g, y_cpu, 0.35, torch.tensor(2024), relu)
    gx_gpu = torch.ops.xmcnas_fast.dropout_backward(g.cuda(), y_gpu, 0.35, torch.tensor(2024), relu)
    torch.testing.assert_close(gx_gpu.cpu(), gx_cpu)
    torch.library.opcheck(torch.ops.xmcnas_fast.dropout.default, (x.cuda().float().requires_grad_(), 0.35, torch.tensor(7), relu))
