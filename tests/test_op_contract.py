"""One contract per op (label_attention, layer_sum, topk_metrics; dropout's is in test_dropout.py).

The same inputs are refused with the same ValueError message by the compiled
op on every device, by its fake implementation and by the plain-PyTorch
reference (csrc/checks.h and its Python twin, xmcnas_fast/op_contracts.py),
and the same inputs are accepted.
"""
import math
import re

import pytest
import torch

from xmcnas_fast import ops

from _kernels import DEVICES, require_kernel

XOPS = torch.ops.xmcnas_fast


def refusal(fn, *args) -> str:
    """The message of the ValueError that fn(*args) raises."""
    with pytest.raises(ValueError) as info:
        fn(*args)
    return str(info.value).splitlines()[0]


def attention_inputs(device, dtype=torch.float32):
    h = torch.randn(2, 5, 4, dtype=dtype, device=device)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    return h, mask, torch.randn(3, 4, dtype=dtype, device=device), torch.randn(2, 5, 6, dtype=dtype, device=device)


# (case, the start of its message): h, mask, W, v -> the op's arguments
ATTENTION_REFUSALS = [
    (lambda h, m, W, v: (h[0], m, W, None), "expected h [B,N,D], mask [B,N], W [L,D]; got h [5, 4]"),
    (lambda h, m, W, v: (h, m[:, :-1], W, None), "mask must be [B,N] = [2, 5], got [2, 4]"),
    (lambda h, m, W, v: (h, m, W[:, :-1], None), "W must be [L, D=4], got [3, 3]"),
    (lambda h, m, W, v: (h, m.float(), W, None), "mask must be bool, got float32"),
    (lambda h, m, W, v: (h.long(), m, W.long(), None), "h must be float32, bfloat16, float16 or float64, got int64"),
    (lambda h, m, W, v: (h, m, W.double(), None), "W must have h's dtype (float32), got float64"),
    (lambda h, m, W, v: (h.bfloat16(), m, W, None), "W must have h's dtype (bfloat16), got float32"),
    (lambda h, m, W, v: (h, m, W, v[:, :-1]), "v must be [B,N,Dv] with [B,N] = [2, 5], got [2, 4, 6]"),
    (lambda h, m, W, v: (h, m, W, v[0]), "v must be [B,N,Dv] with [B,N] = [2, 5], got [5, 6]"),
    (lambda h, m, W, v: (h, m, W, v.double()), "v must have h's dtype (float32), got float64"),
]


@pytest.mark.parametrize("case, message", ATTENTION_REFUSALS, ids=[m for _, m in ATTENTION_REFUSALS])
@pytest.mark.parametrize("device", DEVICES)
def test_label_attention_refusals(device, case, message):
    require_kernel("label_attention", device)
    h, mask, W, v = attention_inputs(device)
    args = case(h, mask, W, v)
    compiled = refusal(XOPS.label_attention, *args)
    assert compiled.startswith("label_attention: " + message), compiled
    assert refusal(ops.label_attention_reference, *args) == compiled
    ctx, lse = XOPS.label_attention(h, mask, W, None if args[3] is None else v)
    bad_backward = refusal(XOPS.label_attention_backward, torch.ones_like(ctx), *args[:3], args[3], ctx, lse)
    assert bad_backward == compiled, "the backward checks the forward's inputs first, the same way"


@pytest.mark.cuda
@pytest.mark.parametrize("name", ["mask", "W", "v"])
def test_label_attention_device_mismatch(name):
    require_kernel("label_attention", "cuda")
    inputs = dict(zip(("h", "mask", "W", "v"), attention_inputs("cuda")))
    inputs[name] = inputs[name].cpu()
    compiled = refusal(XOPS.label_attention, *inputs.values())
    assert compiled == f"label_attention: {name} is on cpu but h is on cuda:0"
    assert refusal(ops.label_attention_reference, *inputs.values()) == compiled


@pytest.mark.parametrize("Dv", [None, 6])
@pytest.mark.parametrize("device", DEVICES)
def test_label_attention_backward_refusals(device, Dv):
    require_kernel("label_attention", device)
    h, mask, W, v = attention_inputs(device)
    v = None if Dv is None else v
    ctx, lse = XOPS.label_attention(h, mask, W, v)
    g = torch.randn_like(ctx)
    Dv = Dv or 4
    for args, message in [
        ((g[:, :2], h, mask, W, v, ctx, lse), f"grad_ctx and ctx must be [B,L,Dv] = [2, 3, {Dv}], got [2, 2, {Dv}]"),
        ((g.double(), h, mask, W, v, ctx, lse), "grad_ctx and ctx must have h's dtype (float32), got float64"),
        ((g, h, mask, W, v, ctx, lse.double()), "lse must be float32 [B,L] = [2, 3], got float64 [2, 3]"),
    ]:
        assert refusal(XOPS.label_attention_backward, *args).startswith("label_attention: " + message)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_label_attention_accepts_every_kernel_dtype(device, dtype):
    require_kernel("label_attention", device)
    h, mask, W, v = attention_inputs(device, dtype)
    for values in (None, v):
        ctx, lse = XOPS.label_attention(h, mask, W, values)
        assert ctx.dtype == dtype and lse.dtype == torch.float32
        torch.testing.assert_close(ops.label_attention_reference(h, mask, W, values), ctx, atol=2e-2, rtol=2e-2)


def layer_inputs(device, dtype=torch.float32):
    return [torch.randn(3, 4, dtype=dtype, device=device) for _ in range(2)], torch.ones(2, device=device)


# (case, the start of its message): xs, w -> the op's arguments
LAYER_REFUSALS = [
    (lambda xs, w: ([], w[:0]), "expected at least one input tensor"),
    (lambda xs, w: (xs, torch.ones(3, device=w.device)), "expected w of shape [K] = [2], got [3]"),
    (lambda xs, w: (xs, w.view(2, 1)), "expected w of shape [K] = [2], got [2, 1]"),
    (lambda xs, w: ([xs[0], xs[1].t()], w), "all inputs must have one shape; input 1 has [4, 3], input 0 has [3, 4]"),
    (lambda xs, w: ([xs[0], xs[1].double()], w), "all inputs must have one dtype; input 1 is float64, input 0 is "
                                                 "float32"),
    (lambda xs, w: ([x.long() for x in xs], w), "inputs must be float32, float64, bfloat16 or float16, got int64"),
    (lambda xs, w: (xs, w.double()), "w must be float32 or the inputs' dtype (float32), got float64"),
    (lambda xs, w: ([x.bfloat16() for x in xs], w.half()), "w must be float32 or the inputs' dtype (bfloat16), "
                                                           "got float16"),
]


@pytest.mark.parametrize("case, message", LAYER_REFUSALS, ids=[m for _, m in LAYER_REFUSALS])
@pytest.mark.parametrize("device", DEVICES)
def test_layer_sum_refusals(device, case, message):
    require_kernel("layer_sum", device)
    xs, w = case(*layer_inputs(device))
    compiled = refusal(XOPS.layer_sum, xs, w)
    assert compiled.startswith("layer_sum: " + message), compiled
    assert refusal(ops.layer_sum_reference, xs, w) == compiled
    assert refusal(ops.layer_sum, xs, w) == compiled
    grad = torch.zeros(3, 4, device=device)
    assert refusal(XOPS.layer_sum_backward, grad, xs, w) == compiled.replace("layer_sum:", "layer_sum_backward:", 1)


@pytest.mark.parametrize("device", DEVICES)
def test_layer_sum_backward_refuses_a_mismatched_grad(device):
    require_kernel("layer_sum", device)
    xs, w = layer_inputs(device)
    for grad, got in [(torch.zeros(4, 3, device=device), "[4, 3] float32"),
                      (torch.zeros(3, 4, dtype=torch.float64, device=device), "[3, 4] float64")]:
        message = refusal(XOPS.layer_sum_backward, grad, xs, w)
        assert message == f"layer_sum_backward: grad must have the inputs' shape [3, 4] and dtype float32, got {got}"


@pytest.mark.cuda
def test_layer_sum_device_mismatch():
    require_kernel("layer_sum", "cuda")
    xs, w = layer_inputs("cuda")
    for args, message in [((xs, w.cpu()), "w is on cpu but input 0 is on cuda:0"),
                          (([xs[0], xs[1].cpu()], w), "input 1 is on cpu but input 0 is on cuda:0")]:
        compiled = refusal(XOPS.layer_sum, *args)
        assert compiled == "layer_sum: " + message
        assert refusal(ops.layer_sum_reference, *args) == compiled


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_layer_sum_accepts_float32_or_the_inputs_dtype_for_w(device, dtype):
    require_kernel("layer_sum", device)
    xs, _ = layer_inputs(device, dtype)
    for w_dtype in {torch.float32, dtype}:
        w = torch.tensor([0.5, -2.0], dtype=w_dtype, device=device)
        out = XOPS.layer_sum(xs, w)
        assert out.dtype == dtype
        torch.testing.assert_close(out, ops.layer_sum_reference(xs, w))


def topk_inputs(device):
    return (torch.randn(3, 10, device=device), torch.tensor([0, 2, 3, 4]), torch.tensor([1, 2, 3, 4]), 2,
            torch.ones(10, device=device))


# (case, the start of its message): scores, indptr, indices, k, inv_prop -> the op's arguments. Several
# faults at once (the last cases) are reported in the contract's order.
TOPK_REFUSALS = [
    (lambda s, p, i, k, q: (s[0], p, i, k, q), "scores must be [R, L], got shape [10]"),
    (lambda s, p, i, k, q: (s.long(), p, i, k, q), "scores must be float32, float64, bfloat16 or float16, got int64"),
    (lambda s, p, i, k, q: (s, p, i, 0, q), "k must be in [1, L=10], got 0"),
    (lambda s, p, i, k, q: (s, p, i, 11, q), "k must be in [1, L=10], got 11"),
    (lambda s, p, i, k, q: (s, p.view(2, 2), i, k, q), "indptr must be 1-D, got shape [2, 2]"),
    (lambda s, p, i, k, q: (s, p, i.float(), k, q), "indices must be int64 or int32, got float32"),
    (lambda s, p, i, k, q: (s, p[:-1], i, k, q), "indptr must have R+1 = 4 entries, has 3"),
    (lambda s, p, i, k, q: (s, p, i, k, q.view(2, 5)), "inv_prop must be a 1-D floating tensor, got float32 of "
                                                        "shape [2, 5]"),
    (lambda s, p, i, k, q: (s, p, i, k, q[:9]), "inv_prop must have at least L = 10 entries, has 9"),
    (lambda s, p, i, k, q: (s, p + 1, i, k, q), "indptr must start at 0 and end at len(indices) = 4"),
    (lambda s, p, i, k, q: (s, torch.tensor([0, 3, 2, 4]), i, k, q), "indptr must be non-decreasing"),
    (lambda s, p, i, k, q: (s, p, torch.tensor([1, -2, 30, 4]), k, q), "label indices must be >= 0"),
    (lambda s, p, i, k, q: (s, p, torch.tensor([1, 2, 30, 4]), k, q), "a label index is >= the number of labels "
                                                                       "(10)"),
    (lambda s, p, i, k, q: (s, p, torch.tensor([1, 2, 12, 4]), k, torch.ones(12, device=s.device)),
     "a label index is >= the number of labels (12)"),
    (lambda s, p, i, k, q: (s.index_fill(1, torch.tensor([4], device=s.device), math.nan), p, i, k, q),
     "scores contain NaN"),
    (lambda s, p, i, k, q: (s.index_fill(1, torch.tensor([4], device=s.device), math.nan), p, i + 30, k, q),
     "a label index is >= the number of labels (10)"),
]


@pytest.mark.parametrize("case, message", TOPK_REFUSALS, ids=[m for _, m in TOPK_REFUSALS])
@pytest.mark.parametrize("device", DEVICES)
def test_topk_metrics_refusals(device, case, message):
    require_kernel("topk_metrics", device)
    args = case(*topk_inputs(device))
    compiled = refusal(XOPS.topk_metrics, *args)
    assert compiled == "topk_metrics: " + message
    assert refusal(ops.topk_metrics_reference, *args) == compiled


@pytest.mark.cuda
def test_topk_metrics_truth_on_the_host_or_the_device():
    require_kernel("topk_metrics", "cuda")
    scores, indptr, indices, k, inv_prop = topk_inputs("cuda")
    want = XOPS.topk_metrics(scores, indptr, indices, k, inv_prop)
    got = XOPS.topk_metrics(scores, indptr.cuda(), indices.cuda(), k, inv_prop.cpu())
    assert torch.equal(want[0], got[0]) and torch.equal(want[1], got[1])
    message = refusal(XOPS.topk_metrics, scores.cpu(), indptr.cuda(), indices, k, None)
    assert message == "topk_metrics: indptr is on cuda:0 but must be on the CPU or on scores' device (cpu)"
    assert refusal(ops.topk_metrics_reference, scores.cpu(), indptr.cuda(), indices, k, None) == message


def test_messages_name_dtypes_as_torch_does():
    """The C++ and Python spellings agree on every dtype a caller is likely to pass by mistake."""
    require_kernel("layer_sum", "cpu")
    for dtype in (torch.int8, torch.uint8, torch.int16, torch.int32, torch.int64, torch.bool, torch.complex64):
        xs = [torch.zeros(2, dtype=dtype)]
        compiled = refusal(XOPS.layer_sum, xs, torch.ones(1))
        assert compiled == refusal(ops.layer_sum_reference, xs, torch.ones(1))
        assert re.search(r"got " + str(dtype).removeprefix("torch.") + "$", compiled)


@pytest.mark.parametrize("case, message", ATTENTION_REFUSALS, ids=[m for _, m in ATTENTION_REFUSALS])
def test_fake_label_attention_refuses_alike(case, message):
    """The fake (meta) implementation, which torch.compile traces through, holds to the same contract."""
    require_kernel("label_attention", "cpu")
    args = case(*attention_inputs("meta"))
    assert refusal(XOPS.label_attention, *args) == refusal(XOPS.label_attention, *case(*attention_inputs("cpu")))


@pytest.mark.parametrize("case, message", LAYER_REFUSALS, ids=[m for _, m in LAYER_REFUSALS])
def test_fake_layer_sum_refuses_alike(case, message):
    require_kernel("layer_sum", "cpu")
    assert refusal(XOPS.layer_sum, *case(*layer_inputs("meta"))) == \
        refusal(XOPS.layer_sum, *case(*layer_inputs("cpu")))
