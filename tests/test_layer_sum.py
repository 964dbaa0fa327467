"""layer_sum on the CPU: forward and backward against the stacked reference,
gradcheck through the public function, opcheck of both ops."""
import pytest
import torch

from xmcnas_fast import ops

fwd = torch.ops.xmcnas_fast.layer_sum
bwd = torch.ops.xmcnas_fast.layer_sum_backward

TOL = {torch.float64: dict(rtol=1e-12, atol=1e-12), torch.float32: dict(rtol=1e-5, atol=1e-5),
       torch.bfloat16: dict(rtol=2e-2, atol=2e-2), torch.float16: dict(rtol=2e-3, atol=2e-3)}


def inputs(K, shape, dtype=torch.float32, w_dtype=torch.float32, requires_grad=False):
    xs = [torch.randn(shape).to(dtype).requires_grad_(requires_grad) for _ in range(K)]
    w = torch.randn(K).to(w_dtype).requires_grad_(requires_grad)
    return xs, w


def reference_grads(xs, w, grad):
    """Gradients of the stacked reference, by autograd, in float64."""
    xs64 = [x.detach().double().requires_grad_() for x in xs]
    w64 = w.detach().double().requires_grad_()
    ops.layer_sum_reference(xs64, w64).backward(grad.double())
    return [x.grad for x in xs64], w64.grad


def test_kernel_is_registered():
    assert ops.has_kernel("layer_sum", "cpu") and ops.has_kernel("layer_sum_backward", "cpu")


# Shapes: tiny, odd (tails of every vector width), several threads' worth of chunks.
SHAPES = [(1,), (3, 5), (7, 33, 9), (4, 100, 257)]


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("K", [1, 4, 6])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_matches_reference(shape, K, dtype):
    xs, w = inputs(K, shape, dtype, dtype)
    out = fwd(xs, w)
    assert out.dtype == dtype and out.shape == xs[0].shape
    torch.testing.assert_close(out, ops.layer_sum_reference(xs, w), **TOL[dtype])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("w_dtype", ["same", torch.float32])
def test_reduced_precision(dtype, w_dtype):
    w_dtype = dtype if w_dtype == "same" else w_dtype
    xs, w = inputs(5, (6, 50, 31), dtype, w_dtype)
    out = fwd(xs, w)
    assert out.dtype == dtype
    # Accumulated in float32 and rounded once: within one rounding of the exact sum.
    exact = sum(wi * x.double() for wi, x in zip(w.double(), xs))
    torch.testing.assert_close(out, exact.to(dtype), **TOL[dtype])
    grad = torch.randn_like(xs[0])
    grad_xs, grad_w = bwd(grad, xs, w)
    want_xs, want_w = reference_grads(xs, w, grad)
    assert grad_w.dtype == w.dtype and all(g.dtype == dtype for g in grad_xs)
    for g, want in zip(grad_xs, want_xs):
        torch.testing.assert_close(g, want.to(dtype), **TOL[dtype])
    # grad_w: the products of the inputs as given, summed without loss, rounded to w's dtype.
    exact_w = torch.stack([(grad.double() * x.double()).sum() for x in xs])
    torch.testing.assert_close(grad_w, exact_w.to(w.dtype), **TOL[w.dtype])


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_matches_autograd_of_reference(shape, dtype):
    xs, w = inputs(4, shape, dtype, dtype)
    grad = torch.randn(shape, dtype=dtype)
    grad_xs, grad_w = bwd(grad, xs, w)
    want_xs, want_w = reference_grads(xs, w, grad)
    assert len(grad_xs) == 4 and grad_w.shape == (4,)
    for g, want in zip(grad_xs, want_xs):
        torch.testing.assert_close(g, want.to(dtype), **TOL[dtype])
    torch.testing.assert_close(grad_w, want_w.to(dtype), **TOL[dtype])


def test_public_function_differentiates_through_the_kernel():
    xs, w = inputs(3, (5, 40, 16), requires_grad=True)
    out = ops.layer_sum(xs, w)
    torch.testing.assert_close(out, ops.layer_sum_reference(xs, w))
    grad = torch.randn_like(out)
    out.backward(grad)
    want_xs, want_w = reference_grads(xs, w, grad)
    for x, want in zip(xs, want_xs):
        torch.testing.assert_close(x.grad, want.float())
    torch.testing.assert_close(w.grad, want_w.float(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_large_outputs(dtype):
    # Past 16 MB of output the kernels stream their stores and ask for huge
    # pages; an odd size leaves a tail after the last full vector.
    xs, w = inputs(2, (4_500_003,), dtype, torch.float32)
    torch.testing.assert_close(fwd(xs, w), ops.layer_sum_reference(xs, w), **TOL[dtype])
    grad = torch.randn(4_500_003).to(dtype)
    grad_xs, grad_w = bwd(grad, xs, w)
    for g, x_w in zip(grad_xs, w):
        torch.testing.assert_close(g, (grad.double() * float(x_w)).to(dtype), **TOL[dtype])
    exact_w = torch.stack([(grad.double() * x.double()).sum() for x in xs])
    torch.testing.assert_close(grad_w, exact_w.float(), rtol=1e-6, atol=1e-6)


def test_gradcheck_float64():
    xs, w = inputs(3, (2, 3, 5), torch.float64, torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda w, *xs: ops.layer_sum(list(xs), w), (w, *xs))


def test_gradcheck_only_some_inputs_require_grad():
    xs, w = inputs(2, (4, 3), torch.float64, torch.float64)
    w.requires_grad_()
    assert torch.autograd.gradcheck(lambda w: ops.layer_sum(xs, w), (w,))


def test_non_contiguous_inputs():
    base = [torch.randn(16, 9, 20) for _ in range(3)]
    xs = [base[0].transpose(0, 2), base[1].transpose(0, 2), base[2].permute(2, 1, 0)]
    xs[2] = torch.randn(40, 9, 16)[::2]           # strided in the first dim
    w = torch.randn(3)
    assert not any(x.is_contiguous() for x in xs)
    torch.testing.assert_close(fwd(xs, w), ops.layer_sum_reference(xs, w))
    grad = torch.randn(16, 9, 20).transpose(0, 2)
    grad_xs, grad_w = bwd(grad, xs, w)
    want_xs, want_w = reference_grads(xs, w, grad)
    for g, want in zip(grad_xs, want_xs):
        torch.testing.assert_close(g, want.float())
    torch.testing.assert_close(grad_w, want_w.float(), rtol=1e-5, atol=1e-4)


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


def test_empty_tensors():
    xs, w = inputs(2, (0, 7))
    assert fwd(xs, w).shape == (0, 7)
    grad_xs, grad_w = bwd(torch.zeros(0, 7), xs, w)
    assert [g.shape for g in grad_xs] == [(0, 7), (0, 7)] and torch.equal(grad_w, torch.zeros(2))


def bad_inputs():
    x = torch.randn(3, 4)
    return [
        ("expected at least one input", ([], torch.zeros(0))),
        ("expected w of shape \\[K\\]", ([x, x], torch.ones(3))),
        ("expected w of shape \\[K\\]", ([x, x], torch.ones(2, 1))),
        ("all inputs must have one shape", ([x, torch.randn(4, 3)], torch.ones(2))),
        ("all inputs must have one dtype", ([x, x.double()], torch.ones(2))),
        ("inputs must be float32, float64, bfloat16 or float16", ([x.long(), x.long()], torch.ones(2))),
        ("w must be float32 or the inputs' dtype", ([x, x], torch.ones(2, dtype=torch.float64))),
    ]


@pytest.mark.parametrize("message,args", bad_inputs(), ids=[m for m, _ in bad_inputs()])
def test_bad_inputs_raise_value_error(message, args):
    with pytest.raises(ValueError, match="^layer_sum: " + message):
        fwd(*args)
    with pytest.raises(ValueError, match="^layer_sum_backward: " + message):
        bwd(torch.randn(3, 4), *args)


def test_backward_checks_grad():
    xs, w = inputs(2, (3, 4))
    with pytest.raises(ValueError, match="^layer_sum_backward: grad must have the inputs' shape"):
        bwd(torch.randn(4, 3), xs, w)
    with pytest.raises(ValueError, match="^layer_sum_backward: grad must have the inputs' shape"):
        bwd(torch.randn(3, 4, dtype=torch.float64), xs, w)


def test_public_function_rejects_mismatches():
    x = torch.randn(3, 4)
    with pytest.raises(ValueError, match="^layer_sum"):
        ops.layer_sum([x, x], torch.ones(3))
    with pytest.raises(ValueError, match="^layer_sum"):
        ops.layer_sum([x, torch.randn(4, 3)], torch.ones(2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_opcheck(dtype):
    xs, w = inputs(3, (4, 6, 5), dtype, dtype, requires_grad=True)
    torch.library.opcheck(fwd.default, (xs, w))
    torch.library.opcheck(bwd.default, (torch.randn(4, 6, 5, dtype=dtype), [x.detach() for x in xs], w.detach()))
