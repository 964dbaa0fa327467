"""layer_sum on the CPU beside its peers and beside the memory traffic it needs.

    python -m pytest benchmarks/bench_layer_sum.py --benchmark-enable

K inputs of [40, 500, 512] float32 (EURLex-4K's B, N, D), 2 threads.

Forward, K = 4 and K = 6: ours (ops.layer_sum); torch.stack(xs).mul(w).sum(0)
(ops.layer_sum_reference); torch.einsum over the stacked inputs. In the same
group, for scale:
  "copy"   the floor: the op reads K inputs and writes one output, K+1
           input-sized streams, and this copies (K+1)/2 inputs' worth of
           memory into a tensor that exists already (reads + writes =
           (K+1) x one input): the machine's copy bandwidth applied to the
           op's bytes. It leaves out what any op returning a new tensor pays
           and a copy into existing memory does not: the first touch of the
           new pages.
  "clone"  context: x.clone() of one input, torch's own out-of-place copy of
           a new tensor of the output's size (2 streams, one of them new).
Backward (grad of the output given; both through autograd, the forward done
in the set-up): ours against autograd through the reference. It reads grad
and K inputs and writes K new input gradients: 2K+1 streams; "clone" there
clones K inputs.
"""
import pytest
import torch

from xmcnas_fast import ops

THREADS = 2
torch.set_num_threads(THREADS)

SHAPE = (40, 500, 512)


def make_inputs(K, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(SHAPE, generator=g) for _ in range(K)], torch.randn(K, generator=g)


def einsum_peer(xs, w):
    return torch.einsum("k,k...->...", w, torch.stack(xs))


def copy_floor(streams):
    """A copy into existing memory moving `streams` input-sized streams (reads + writes)."""
    src = torch.randn(torch.Size(SHAPE).numel() * streams // 2)
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def clones(n):
    sources = [torch.randn(SHAPE) for _ in range(n)]
    return lambda: [s.clone() for s in sources]


def scale_case(benchmark, which, streams, new_outputs):
    """Runs the "copy" floor or the "clone" context of a group."""
    if which == "copy":
        benchmark.extra_info.update(role="floor", what=f"copy into existing memory, {streams} input-sized streams")
        benchmark(copy_floor(streams))
    else:
        benchmark.extra_info.update(role="context", what=f"{new_outputs} x clone of one input (new memory)")
        benchmark(clones(new_outputs))


@pytest.fixture(scope="module", params=[4, 6], ids=lambda K: f"K{K}")
def forward_case(request):
    K = request.param
    xs, w = make_inputs(K)
    want = ops.layer_sum_reference(xs, w)
    torch.testing.assert_close(ops.layer_sum(xs, w), want)
    torch.testing.assert_close(einsum_peer(xs, w), want, rtol=1e-5, atol=1e-5)
    return K, xs, w


# ours beside its floor first: the closer in time, the likelier they share the machine's state.
@pytest.mark.parametrize("which", ["copy", "ours", "clone", "einsum", "stack+mul+sum"])
def test_forward(benchmark, forward_case, which):
    K, xs, w = forward_case
    benchmark.group = f"layer_sum forward K={K} {'x'.join(map(str, SHAPE))} float32"
    if which in ("copy", "clone"):
        scale_case(benchmark, which, K + 1, 1)
        return
    fn = {"ours": ops.layer_sum, "stack+mul+sum": ops.layer_sum_reference, "einsum": einsum_peer}[which]
    benchmark.extra_info["role"] = "ours" if which == "ours" else "peer"
    benchmark(fn, xs, w)


@pytest.mark.parametrize("which", ["copy", "ours", "clone", "autograd of stack+mul+sum"])
def test_backward(benchmark, which):
    K = 4
    benchmark.group = f"layer_sum backward K={K} {'x'.join(map(str, SHAPE))} float32"
    if which in ("copy", "clone"):
        scale_case(benchmark, which, 2 * K + 1, K)
        return
    xs, w = make_inputs(K)
    fn = ops.layer_sum if which == "ours" else ops.layer_sum_reference
    benchmark.extra_info["role"] = "ours" if which == "ours" else "peer"
    leaves = [x.requires_grad_() for x in xs] + [w.requires_grad_()]
    grad = torch.randn(SHAPE)

    def setup():
        return (fn(xs, w),), {}

    def backward(out):
        return torch.autograd.grad(out, leaves, grad)

    grads = backward(*setup()[0])
    want = torch.autograd.grad(ops.layer_sum_reference(xs, w), leaves, grad)
    for a, b in zip(grads, want):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-3)
    benchmark.pedantic(backward, setup=setup, rounds=15, warmup_rounds=1)
