"""layer_sum on every device: forward and backward against the stacked reference in float64,
gradcheck through the public function, opcheck of both ops.

Parametrized over the device as pytorch/extension-cpp does. The cases reach
both devices' paths: on the CPU its blocks, groups of 4 inputs and streamed
stores past 16 MB; on CUDA its 16-byte and element-wise paths (a view off the
16-byte boundary) and its groups of 16 inputs (K = 17). The input contract is
tests/test_op_contract.py's.
"""
import math

import pytest
import torch

from xmcnas_fast import ops

from _kernels import DEVICES, close, kernel_required

fwd = torch.ops.xmcnas_fast.layer_sum
bwd = torch.ops.xmcnas_fast.layer_sum_backward
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# Error bound relative to the largest reference value, per dtype, for one rounding of the result.
TOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.bfloat16: 8e-3, torch.float16: 1e-3}


_kernels = kernel_required("layer_sum")


def inputs(K, shape, dtype=torch.float32, w_dtype=torch.float32, device="cpu", offset=0, seed=0):
    """K inputs of `shape` and w [K]; offset > 0: each input a view `offset` elements into its buffer."""
    g = torch.Generator().manual_seed(seed)
    xs = []
    for _ in range(K):
        buf = torch.empty(math.prod(shape) + offset, dtype=dtype, device=device)
        xs.append(buf[offset:].view(shape).copy_(torch.randn(shape, generator=g)))
    return xs, torch.randn(K, generator=g).to(w_dtype).to(device)


def reference64(xs, w, grad):
    """out, grad_xs and grad_w of the stacked reference, by autograd, in float64 on the CPU."""
    xs64 = [x.detach().double().cpu().requires_grad_() for x in xs]
    w64 = w.detach().double().cpu().requires_grad_()
    out = ops.layer_sum_reference(xs64, w64)
    out.backward(grad.double().cpu())
    return out.detach(), [x.grad for x in xs64], w64.grad


def assert_matches_reference(xs, w, grad=None):
    """Both ops against the float64 reference: out and grad_xs within a rounding of their dtype, grad_w of
    w's dtype (the products are summed without loss, then rounded)."""
    K, dtype = len(xs), xs[0].dtype
    grad = torch.randn(xs[0].shape, dtype=torch.float64).to(dtype).to(xs[0].device) if grad is None else grad
    out = fwd(xs, w)
    grad_xs, grad_w = bwd(grad, xs, w)
    want, want_xs, want_w = reference64(xs, w, grad)
    assert out.dtype == dtype and out.shape == xs[0].shape and out.device == xs[0].device
    assert len(grad_xs) == K and grad_w.dtype == w.dtype and grad_w.shape == (K,)
    close(out, want, K * TOL[dtype], "out")
    for i, (g, want_g) in enumerate(zip(grad_xs, want_xs)):
        assert g.dtype == dtype
        close(g, want_g, TOL[dtype], f"grad_xs[{i}]")
    close(grad_w, want_w, TOL[w.dtype] + 2e-6, "grad_w")


# Shapes: tiny, odd (tails of every vector width), several threads' worth of chunks.
SHAPES = [(1,), (3, 5), (7, 33, 9), (4, 100, 257)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("K", [1, 4, 6, 17])
@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients(device, dtype, K, shape):
    assert_matches_reference(*inputs(K, shape, dtype, dtype, device))


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("offset", [0, 1])
@pytest.mark.parametrize("device", DEVICES)
def test_float32_weights_and_misaligned_views(device, offset, dtype):
    """w in float32 with inputs of any dtype (the model's mixed precision), inputs off the 16-byte boundary."""
    xs, w = inputs(4, (5, 7, 16), dtype, torch.float32, device, offset)
    assert offset == 0 or xs[0].data_ptr() % 16 != 0
    assert_matches_reference(xs, w)


@pytest.mark.parametrize("device", DEVICES)
def test_public_function_differentiates_through_the_kernel(device):
    xs, w = inputs(3, (5, 40, 16), device=device)
    xs = [x.requires_grad_() for x in xs]
    w.requires_grad_()
    out = ops.layer_sum(xs, w)
    grad = torch.randn_like(out)
    out.backward(grad)
    want, want_xs, want_w = reference64(xs, w, grad)
    close(out, want, 3 * TOL[torch.float32], "out")
    for x, want_g in zip(xs, want_xs):
        close(x.grad, want_g, TOL[torch.float32], "grad_x")
    close(w.grad, want_w, 1e-5, "grad_w")
    first = bwd(grad, xs, w)[1]
    assert torch.equal(first, bwd(grad, xs, w)[1]), "grad_w is reproducible"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_large_outputs(device, dtype):
    """Past 16 MB of output the CPU kernels stream their stores and ask for huge pages; an odd size leaves a
    tail after the last full vector."""
    assert_matches_reference(*inputs(2, (4_500_003,), dtype, torch.float32, device))


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device):
    xs, w = inputs(3, (2, 3, 5), torch.float64, torch.float64, device)
    leaves = [t.requires_grad_() for t in [w, *xs]]
    assert torch.autograd.gradcheck(lambda w, *xs: ops.layer_sum(list(xs), w), leaves)


@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_only_some_inputs_require_grad(device):
    xs, w = inputs(2, (4, 3), torch.float64, torch.float64, device)
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda w: ops.layer_sum(xs, w), (w,))


@pytest.mark.parametrize("device", DEVICES)
def test_non_contiguous_inputs(device):
    base = [torch.randn(16, 9, 20, device=device) for _ in range(2)]
    xs = [base[0].transpose(0, 2), base[1].permute(2, 1, 0), torch.randn(40, 9, 16, device=device)[::2]]
    w = torch.randn(3, device=device)
    assert not any(x.is_contiguous() for x in xs)
    assert_matches_reference(xs, w, torch.randn(16, 9, 20, device=device).transpose(0, 2))


def test_grad_w_independent_of_thread_count():
    xs, w = inputs(4, (40, 500, 16))
    grad = torch.randn(40, 500, 16)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = bwd(grad, xs, w)
    finally:
        torch.set_num_threads(threads)
    two = bwd(grad, xs, w)
    assert torch.equal(one[1], two[1])  # bit for bit
    assert all(torch.equal(a, b) for a, b in zip(one[0], two[0]))


@pytest.mark.parametrize("device", DEVICES)
def test_empty_tensors(device):
    xs, w = inputs(2, (0, 7), device=device)
    assert fwd(xs, w).shape == (0, 7)
    grad_xs, grad_w = bwd(torch.zeros(0, 7, device=device), xs, w)
    assert [g.shape for g in grad_xs] == [(0, 7), (0, 7)] and torch.equal(grad_w.cpu(), torch.zeros(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, dtype):
    xs, w = inputs(3, (4, 6, 5), dtype, torch.float32, device)
    torch.library.opcheck(fwd.default, ([x.requires_grad_() for x in xs], w.requires_grad_()))
    torch.library.opcheck(bwd.default, (torch.randn(4, 6, 5, device=device).to(dtype), [x.detach() for x in xs],
                                        w.detach()))
