"""label_attention_head, the attention head in training in one op, against the two ops it replaces
(label_attention, then relu_dropout_dot with the same seed: the same dropout mask) and, without dropout,
against the float64 reference composition; gradcheck in float64; opcheck.

On the CPU the shapes reach both paths of the kernel: short rows (at most 64 real tokens, D and Dv at most
128, float32 on AVX-512) packed several to a unit, where the context is never written and the backward
works from the gate bits (Dv = 64, and 37: a gate word half used, a row that starts inside a dropout
word; L = 2,500 is a multiple of neither the label block nor the panel); and everything else through
label_attention's kernels (rows of 70 and 300 tokens, D = 256, float64, the 16-bit types). XMCNAS_CPU_ISA=
generic runs them again without AVX-512. There is no CUDA kernel: there the public function takes the two ops.
"""
import pytest
import torch

from xmcnas_fast import ops
from xmcnas_fast.model import AttentionHead

from _kernels import close, kernel_required, passes_without_avx512
from test_label_attention import TOL, make_inputs

XOPS = torch.ops.xmcnas_fast
OP = XOPS.label_attention_head

_kernels = kernel_required("label_attention_head")


def head_inputs(B, N, D, L, Dv, dtype=torch.float32, w_dtype=None, seed=0, **kw):
    h, mask, W, v = make_inputs(B, N, D, L, Dv=Dv, dtype=dtype, seed=seed, **kw)
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(Dv, generator=g, dtype=torch.float64).to(w_dtype or dtype)
    grad = torch.randn(B, L, generator=g, dtype=torch.float64).to(dtype)
    return h, mask, W, v, w, grad


def grads(fn, h, mask, W, v, w, grad):
    """fn's scores and the gradients of (h, W, v, w) for the output gradient `grad`."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, W, v, w)]
    out = fn(leaves[0], mask, leaves[1], leaves[2], leaves[3])
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def assert_matches_two_ops(h, mask, W, v, w, grad, p, seed=1234):
    """The op against label_attention then relu_dropout_dot with the same seed, forward and backward."""
    s = torch.tensor(seed)
    ours = grads(lambda *a: OP(*a[:5], p, s)[0], h, mask, W, v, w, grad)
    two = grads(lambda h_, m, W_, v_, w_: XOPS.relu_dropout_dot(XOPS.label_attention(h_, m, W_, v_)[0], w_, p, s),
                h, mask, W, v, w, grad)
    tol = 4 * TOL[h.dtype]
    for name, a, b in zip(("score", "grad_h", "grad_W", "grad_v", "grad_w"), ours, two):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        close(a, b, tol if name != "grad_w" else tol * h.shape[0], name)
    return ours


@pytest.mark.parametrize("p", [0.0, 0.5])
@pytest.mark.parametrize("Dv", [64, 37])
@pytest.mark.parametrize("N", [1, 9, 16])
def test_short_rows(N, Dv, p, device="cpu"):
    """Short texts, many labels (the packed path): the two ops' scores and gradients; an empty row scores 0
    and sends no gradient."""
    inputs = head_inputs(9, N, 24, 2500, Dv, padding="anywhere" if N > 2 else "end", empty_rows=[2], seed=N)
    score, gh, gW, gv, gw = assert_matches_two_ops(*inputs, p)
    assert (score[2] == 0).all() and (gh[2] == 0).all() and (gv[2] == 0).all()


@pytest.mark.parametrize("p", [0.0, 0.3])
def test_against_the_reference(p, device="cpu"):
    """Packed float32 against the float64 two ops (the same mask), and at p = 0 the plain-PyTorch reference."""
    h, mask, W, v, w, grad = head_inputs(12, 16, 32, 700, 40, padding="end", empty_rows=[5], seed=3)
    s = torch.tensor(99)
    ours = grads(lambda *a: OP(*a, p, s)[0], h, mask, W, v, w, grad)
    c = lambda t: t.double()  # noqa: E731
    f64 = grads(lambda *a: OP(*a, p, s)[0], c(h), mask, c(W), c(v), c(w), c(grad))
    for name, a, b in zip(("score", "grad_h", "grad_W", "grad_v", "grad_w"), ours, f64):
        close(a, b, 4 * TOL[torch.float32] * (12 if name == "grad_w" else 1), name)
    if p == 0.0:
        ref = grads(lambda *a: ops.label_attention_head_reference(*a, 0.0), c(h), mask, c(W), c(v), c(w), c(grad))
        for name, a, b in zip(("score", "grad_h", "grad_W", "grad_v", "grad_w"), f64, ref):
            close(a, b, 4 * TOL[torch.float64], name)  # lse is kept in float32


@pytest.mark.parametrize("shape", [(4, 300, 64, 257, 64), (3, 40, 256, 130, 32), (3, 70, 24, 50, 20)],
                         ids=lambda s: "x".join(map(str, s)))
def test_long_rows_and_wide_states(shape, device="cpu"):
    """Rows longer than the packed path takes (70, 300 tokens) and a state wider (D = 256): label_attention's
    kernels inside the op, the context recomputed in the backward."""
    assert_matches_two_ops(*head_inputs(*shape, padding="end", empty_rows=[1]), 0.4)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("w_dtype", [None, torch.float32], ids=["w in h's dtype", "w float32"])
def test_dtypes(w_dtype, dtype, device="cpu"):
    assert_matches_two_ops(*head_inputs(5, 12, 32, 300, 16, dtype=dtype, w_dtype=w_dtype), 0.25)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_any_thread_count(threads):
    """40 short rows over 1 to 3 threads (rows cut between two threads' ranges): the two ops' results, and
    the same bits on a second call."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = head_inputs(40, 16, 64, 1100, 64, padding="end", empty_rows=[0, 17], seed=5)
        first = assert_matches_two_ops(*inputs, 0.5)
        again = grads(lambda *a: OP(*a[:5], 0.5, torch.tensor(1234))[0], *inputs)
        assert all(torch.equal(a, b) for a, b in zip(first, again))
    finally:
        torch.set_num_threads(saved)


def test_gate_is_relu_and_dropout(device="cpu"):
    """The saved gate: bit d % 16 of word d / 16 is set exactly where the context is positive and dropout
    keeps the element (the compiled dropout's mask, at the context's element indices)."""
    h, mask, W, v, w, _ = head_inputs(6, 10, 16, 90, 37, padding="end", seed=8)
    seed = torch.tensor(77)
    _, lse, gate = OP(h, mask, W, v, w, 0.5, seed)
    ctx, lse2 = XOPS.label_attention(h, mask, W, v)
    keep = XOPS.dropout(torch.ones_like(ctx), 0.5, seed, False) > 0
    d = torch.arange(37)
    bits = ((gate.long()[..., d // 16] >> (d % 16)) & 1).bool()
    assert torch.equal(bits, (ctx > 0) & keep)
    close(lse, lse2, 1e-5, "lse")


def test_gradcheck_float64(device="cpu"):
    h, mask, W, v, w, _ = head_inputs(3, 6, 5, 7, 4, dtype=torch.float64, padding="anywhere", empty_rows=[1], seed=2)
    leaves = [t.requires_grad_() for t in (h, W, v, w)]
    seed = torch.tensor(3)
    assert torch.autograd.gradcheck(lambda h_, W_, v_, w_: OP(h_, mask, W_, v_, w_, 0.3, seed)[0], leaves)


def test_opcheck(device="cpu"):
    for N in (5, 70):  # the packed path and label_attention's kernels
        h, mask, W, v, w, grad = head_inputs(3, N, 8, 40, 16, empty_rows=[0])
        for t in (h, W, v, w):
            t.requires_grad_()
        torch.library.opcheck(OP, (h, mask, W, v, w, 0.3, torch.tensor(11)))
        _, lse, gate = OP(h, mask, W, v, w, 0.3, torch.tensor(11))
        torch.library.opcheck(XOPS.label_attention_head_backward, (grad, h.detach(), mask, W.detach(), v.detach(),
                                                                   w.detach(), 0.3, torch.tensor(11), lse, gate))


def test_refusals(device="cpu"):
    h, mask, W, v, w, _ = head_inputs(2, 5, 8, 6, 4)
    cases = [((h, mask, W, v, w[:3], 0.5), "w must be [Dv] with Dv = 4, got [3]"),
             ((h, mask, W, v, w.double(), 0.5), "w must be float32 or h's dtype (float32), got float64"),
             ((h, mask, W, v, w, 1.0), "p must be in [0, 1), got 1"),
             ((h, mask, W[:, :3], v, w, 0.5), "W must be [L, D=8], got [6, 3]")]
    for args, message in cases:
        with pytest.raises(ValueError) as compiled:
            OP(*args, torch.tensor(1))
        assert str(compiled.value).splitlines()[0] == "label_attention_head: " + message
        with pytest.raises(ValueError) as reference:
            ops.label_attention_head_reference(*args)
        assert str(reference.value) == str(compiled.value).splitlines()[0]
        meta = [a.to("meta") if isinstance(a, torch.Tensor) else a for a in args]
        with pytest.raises(ValueError) as fake:      # the fake (meta) implementation torch.compile traces
            OP(*meta, torch.tensor(1))
        assert str(fake.value).splitlines()[0] == str(compiled.value).splitlines()[0]


def test_public_function_draws_what_the_two_ops_draw(monkeypatch):
    """ops.label_attention_head in training: one seed from torch's generator, as relu_dropout_dot draws it, so
    that the same generator state gives the two ops' scores; the op only where its packed path runs."""
    h, mask, W, v, w, grad = head_inputs(8, 16, 32, 500, 32, padding="end", seed=4)
    calls = []
    real = XOPS.label_attention_head
    monkeypatch.setattr(ops.torch.ops.xmcnas_fast, "label_attention_head", lambda *a: calls.append(1) or real(*a),
                        raising=False)
    torch.manual_seed(5)
    fused = grads(lambda *a: ops.label_attention_head(*a, 0.5), h, mask, W, v, w, grad)
    torch.manual_seed(5)
    two = grads(lambda h_, m, W_, v_, w_: ops.relu_dropout_dot(ops.label_attention(h_, m, W_, v_), w_, 0.5),
                h, mask, W, v, w, grad)
    for name, a, b in zip(("score", "grad_h", "grad_W", "grad_v", "grad_w"), fused, two):
        close(a, b, 4 * TOL[torch.float32] * (8 if name == "grad_w" else 1), name)
    assert calls == ([1] if ops._head_packs(h, v, w) else [])
    calls.clear()
    long_rows = head_inputs(3, 80, 32, 50, 32, seed=6)
    grads(lambda *a: ops.label_attention_head(*a, 0.5), *long_rows)
    assert calls == []                                   # rows longer than 64 tokens: the two ops


def test_head_in_training_equals_the_two_ops(monkeypatch):
    """AttentionHead in training (dropout 0.5): the same scores and parameter gradients through the one op as
    through label_attention and relu_dropout_dot, given the same generator state."""
    torch.manual_seed(0)
    head = AttentionHead(16, 300, [12], dropout=0.5)
    h, mask, *_ = make_inputs(6, 14, 16, 1, empty_rows=[3], seed=4)

    def step():
        head.zero_grad()
        torch.manual_seed(9)
        out = head(h, mask)
        out.square().sum().backward()
        return [out.detach()] + [p.grad.clone() for p in head.parameters()]

    fused = step()
    monkeypatch.setitem(ops._KERNELS, ("label_attention_head", "cpu"), False)
    two = step()
    for a, b in zip(fused, two):
        close(a, b, 1e-4, "head")


@pytest.mark.cuda
def test_cuda_composes_the_two_ops():
    """On a GPU (no kernel of this op there): label_attention then relu_dropout_dot, in training."""
    h, mask, W, v, w, grad = (t.cuda() for t in head_inputs(5, 16, 32, 600, 16, empty_rows=[1]))
    out = grads(lambda *a: ops.label_attention_head(*a, 0.0), h, mask, W, v, w, grad)
    c = lambda t: t.double().cpu()  # noqa: E731
    ref = grads(lambda *a: ops.label_attention_head_reference(*a, 0.0), c(h), mask.cpu(), c(W), c(v), c(w), c(grad))
    for a, b in zip(out, ref):
        close(a, b, 4 * TOL[torch.float32] * 5, "cuda")


def test_cpu_portable_path():
    """CPU: the tests again with XMCNAS_CPU_ISA=generic (no packed path: label_attention's tiled kernels)."""
    passes_without_avx512(__file__, "short_rows or long_rows or any_thread or dtypes or gradcheck or public")
