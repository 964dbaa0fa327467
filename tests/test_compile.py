"""The custom ops trace into one graph under torch.compile (fake tensors, autograd registration)."""
import pytest
import torch

from xmcnas_fast import ops

pytestmark = pytest.mark.skipif(not ops.EXTENSION_LOADED, reason="compiled extension not built")


def test_ops_compile_without_graph_breaks():
    def f(h, mask, W, v, xs, w):
        x = ops.layer_sum(xs, w) + h
        z = ops.label_attention(x, mask, W, v)
        return ops.dropout(z, 0.3, True, relu=True).sum()

    torch.manual_seed(0)
    h = torch.randn(2, 7, 8, requires_grad=True)
    mask = torch.ones(2, 7, dtype=torch.bool)
    mask[1, 4:] = False
    W = torch.randn(5, 8, requires_grad=True)
    v = torch.randn(2, 7, 6, requires_grad=True)
    xs = [torch.randn(2, 7, 8, requires_grad=True) for _ in range(3)]
    w = torch.randn(3, requires_grad=True)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    torch.manual_seed(1)
    out = compiled(h, mask, W, v, xs, w)
    out.backward()
    grads = [t.grad.clone() for t in (h, W, v, w)]
    for t in (h, W, v, w, *xs):
        t.grad = None
    torch.manual_seed(1)
    ref = f(h, mask, W, v, xs, w)
    ref.backward()
    torch.testing.assert_close(out, ref)
    for g, t in zip(grads, (h, W, v, w)):
        torch.testing.assert_close(g, t.grad)
