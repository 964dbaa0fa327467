"""relu_dropout_dot, the attention head's tail in one pass: sum_h w[h] * dropout(relu(x))[..., h].

Its mask is dropout's, at x's element indices, so with the same seed it equals the compiled
dropout (relu=True) followed by the product: that, and torch's autograd through those two, are the
oracle. The kernel is the CPU's: on a GPU the public function takes the two steps (the fused
dropout kernel, then the product), which the last test checks there.
"""
import os
import subprocess
import sys

import pytest
import torch

from xmcnas_fast import ops

from _kernels import close, kernel_required

XOPS = torch.ops.xmcnas_fast
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 4e-3}

_kernels = kernel_required("relu_dropout_dot")
DEVICES = ["cpu"]          # the devices with a kernel of this op


def unfused(x, w, p, seed):
    """The two-step oracle: the compiled dropout with the same seed, then the product, in float64."""
    y = XOPS.dropout(x, p, seed, True) if p > 0 else torch.relu(x)
    return y.double() @ w.double()


# rows of 64 (4 vectors), 5 and 37 (rows that start inside a group of 4 lanes; a vector and a tail), 17;
# 600 x 37: chunks of 256 rows, the last one partial
SHAPES = [(4, 33, 64), (3, 7, 5), (2, 1), (130, 3), (600, 37), (3, 5, 17)]


@pytest.mark.parametrize("wdtype", ["float32", "same"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("device", DEVICES)
def test_forward_and_backward_equal_dropout_then_the_product(device, shape, p, dtype, wdtype):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(device).requires_grad_()
    w = torch.randn(shape[-1], generator=g, dtype=torch.float64)
    w = w.to(torch.float32 if wdtype == "float32" else dtype).to(device).requires_grad_()
    seed = torch.tensor(987654321)
    out = XOPS.relu_dropout_dot(x, w, p, seed)
    assert out.shape == shape[:-1] and out.dtype == dtype
    close(out, unfused(x.detach(), w.detach(), p, seed), TOL[dtype], "out")
    grad = torch.randn(shape[:-1], generator=g, dtype=torch.float64).to(dtype).to(device)
    gx, gw = torch.autograd.grad(out, (x, w), grad)
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    keep = (XOPS.dropout(torch.ones_like(x.detach()), p, seed, False) > 0) if p > 0 else torch.ones_like(x, dtype=bool)
    ref = (torch.relu(x64) * keep / (1 - round(p * 65536) / 65536)) @ w64
    rx, rw = torch.autograd.grad(ref, (x64, w64), grad.double())
    assert gx.dtype == dtype and gw.dtype == w.dtype
    close(gx, rx, 5 * TOL[dtype], "grad_x")
    close(gw, rw, 5 * max(TOL[dtype], TOL[w.dtype]) * shape[0], "grad_w")     # in w's dtype


@pytest.mark.parametrize("device", DEVICES)
def test_grad_w_is_the_same_bits_whatever_the_thread_count(device):
    x = torch.randn(3000, 16, device=device)      # 12 chunks of 256 rows
    w, grad, seed = torch.randn(16, device=device), torch.randn(3000, device=device), torch.tensor(5)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = XOPS.relu_dropout_dot_backward(grad, x, w, 0.5, seed)
        torch.set_num_threads(2)
        two = XOPS.relu_dropout_dot_backward(grad, x, w, 0.5, seed)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, two))


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    x = torch.randn(3, 5, 8, device=device, requires_grad=True)
    w = torch.randn(8, device=device, requires_grad=True)
    torch.library.opcheck(XOPS.relu_dropout_dot, (x, w, 0.3, torch.tensor(11)))
    torch.library.opcheck(XOPS.relu_dropout_dot_backward, (torch.randn(3, 5, device=device), x.detach(),
                                                           w.detach(), 0.3, torch.tensor(11)))


REFUSALS = [
    (lambda x, w: (x, w, 1.0), "p must be in [0, 1), got 1"),
    (lambda x, w: (x.long(), w, 0.5), "x must be float32, float64, bfloat16 or float16, got int64"),
    (lambda x, w: (x, w[:-1], 0.5), "w must be [H] with H = x's last size (8), got [7]"),
    (lambda x, w: (x, w.unsqueeze(0), 0.5), "w must be [H] with H = x's last size (8), got [1, 8]"),
    (lambda x, w: (x.bfloat16(), w.double(), 0.5), "w must be float32 or x's dtype (bfloat16), got float64"),
]


@pytest.mark.parametrize("case, message", REFUSALS, ids=[m for _, m in REFUSALS])
@pytest.mark.parametrize("device", DEVICES)
def test_the_kernel_the_fake_and_the_reference_refuse_alike(device, case, message):
    x, w = torch.randn(2, 3, 8, device=device), torch.randn(8, device=device)
    xx, ww, p = case(x, w)
    with pytest.raises(ValueError) as compiled:
        XOPS.relu_dropout_dot(xx, ww, p, torch.tensor(1))
    assert str(compiled.value).splitlines()[0] == "relu_dropout_dot: " + message
    with pytest.raises(ValueError) as reference:
        ops.relu_dropout_dot_reference(xx, ww, p)
    assert str(reference.value) == str(compiled.value).splitlines()[0]
    with pytest.raises(ValueError) as fake:          # the fake (meta) implementation torch.compile traces
        XOPS.relu_dropout_dot(*case(x.to("meta"), w.to("meta"))[:2], p, torch.tensor(1))
    assert str(fake.value).splitlines()[0] == str(compiled.value).splitlines()[0]


def test_large_grad_x_is_recycled_not_shared():
    """grad_x of 8 MB or more comes from the cache of output buffers: never one that is still alive."""
    x, w, seed = torch.randn(40, 4190, 16), torch.randn(16), torch.tensor(3)
    grad = torch.randn(40, 4190)
    first = XOPS.relu_dropout_dot_backward(grad, x, w, 0.5, seed)[0]
    second = XOPS.relu_dropout_dot_backward(grad, x, w, 0.5, seed)[0]
    assert first.data_ptr() != second.data_ptr() and torch.equal(first, second)
    keep = XOPS.dropout(torch.ones_like(x), 0.5, seed, False) > 0
    close(first, grad.unsqueeze(-1) * w * (x > 0) * keep * 2.0, 1e-6, "grad_x")


def test_cpu_portable_path():
    """The forward and backward tests again with XMCNAS_CPU_ISA=generic: the rows a CPU without AVX-512
    runs (the float32 ones vectorized there otherwise)."""
    env = {**os.environ, "XMCNAS_CPU_ISA": "generic"}
    res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", __file__, "-k",
                          "equal_dropout_then_the_product or same_bits"], env=env, capture_output=True, text=True,
                         timeout=600, cwd=os.path.dirname(__file__))
    assert res.returncode == 0, res.stdout[-4000:] + res.stderr[-2000:]
    assert " passed" in res.stdout and "failed" not in res.stdout


def test_out_of_training_nothing_is_dropped_and_no_seed_is_drawn():
    x, w = torch.randn(4, 6), torch.randn(6)
    state = torch.get_rng_state()
    out = ops.relu_dropout_dot(x, w, 0.5, training=False)
    assert torch.equal(torch.get_rng_state(), state)
    close(out, torch.relu(x).double() @ w.double(), 1e-6, "eval")


def test_the_head_uses_it_and_scores_as_the_unfused_tail(monkeypatch):
    """A model with one FC layer takes the fused tail (label_attention_head: the attention and this op's
    tail; not under autocast), and scores as the unfused head."""
    from xmcnas_fast import model as model_module
    from xmcnas_fast.model import ModelConfig, build_model

    calls, real = [], ops.label_attention_head
    monkeypatch.setattr(model_module.ops, "label_attention_head", lambda *a, **k: calls.append(1) or real(*a, **k))

    torch.manual_seed(0)
    cfg = ModelConfig(genotype={"nodes": [["conv3", 0]], "merge": "sum"}, emb_dim=8, width=8, fc=[8])
    model = build_model(cfg, 50, 30, seed=0)
    tokens = torch.randint(1, 50, (5, 12))
    mask = torch.ones(5, 12, dtype=torch.bool)
    model.eval()              # no dropout: the two tails must agree exactly
    fused = model(tokens, mask)
    head = model.head
    h_states = None

    def capture(_, inputs, __):
        nonlocal h_states
        h_states = inputs
    handle = head.register_forward_hook(capture)
    model(tokens, mask)
    handle.remove()
    h, m = h_states
    first = head.fc[0]
    ctx = ops.label_attention(h, m, head.attention, torch.nn.functional.linear(h, first.weight, first.bias))
    unfused_scores = head.out(torch.relu(ctx)).squeeze(-1) + head.label_bias
    close(fused, unfused_scores, 1e-5, "scores")
    assert len(calls) == 2
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model(tokens, mask)
    assert len(calls) == 2          # under autocast the head keeps its Linear (autocast's dtype for its weights)


@pytest.mark.cuda
def test_on_a_gpu_the_public_function_takes_the_two_steps():
    assert not ops.has_kernel("relu_dropout_dot", "cuda")
    x, w = torch.randn(4, 9, 16, device="cuda"), torch.randn(16, device="cuda")
    close(ops.relu_dropout_dot(x, w, 0.5, training=False), torch.relu(x).double() @ w.double(), 1e-5, "eval")
    torch.manual_seed(3)
    out = ops.relu_dropout_dot(x, w, 0.5)
    torch.manual_seed(3)
    close(out, ops.dropout(x, 0.5, relu=True).double() @ w.double(), 1e-5, "training")
