"""label_attention_score, the attention head's scores out of training in one pass, against the two ops it
replaces (label_attention, then relu_dropout_dot without dropout) and against the float64 reference.

On the CPU the shapes reach both paths of the kernel: short rows (at most 64 real tokens, D and Dv at most
128, float32 arithmetic on AVX-512) packed several to a unit, with labels in blocks of 512 and panels of 32
(L = 2,500 and 1,100 are multiples of neither); long rows and wide states through the tiled path with its
online softmax (N = 300; D = 256); float64 and the 16-bit types; and, through XMCNAS_CPU_ISA=generic, the
portable path. There is no CUDA kernel: on a GPU the public function composes the two ops (tested too).
"""

import pytest
import torch

from xmcnas_fast import ops
from xmcnas_fast.model import AttentionHead

from _kernels import close, kernel_required, passes_without_avx512
from test_label_attention import TOL, make_inputs

OP = torch.ops.xmcnas_fast.label_attention_score

_kernels = kernel_required("label_attention_score")


def score_inputs(B, N, D, L, Dv=None, dtype=torch.float32, device="cpu", w_dtype=None, **kw):
    h, mask, W, v = make_inputs(B, N, D, L, Dv=Dv, dtype=dtype, device=device, **kw)
    g = torch.Generator().manual_seed(11)
    w = torch.randn((Dv or D), generator=g, dtype=torch.float64).to(w_dtype or dtype).to(device)
    return h, mask, W, v, w


def assert_matches(h, mask, W, v, w):
    """The kernel against the two ops (their own tolerance) and against the float64 reference."""
    ours = OP(h, mask, W, v, w)
    assert ours.shape == (h.shape[0], W.shape[0]) and ours.dtype == h.dtype and ours.device == h.device
    two_ops = ops.relu_dropout_dot(ops.label_attention(h, mask, W, v), w, 0.0, training=False)
    c = lambda t: None if t is None else t.double().cpu()  # noqa: E731
    ref = ops.label_attention_score_reference(c(h), mask.cpu(), c(W), c(v), c(w))
    # the score sums Dv products of context values: the context's tolerance, a few times over
    close(ours, two_ops, 4 * TOL[h.dtype], "against label_attention + relu_dropout_dot")
    close(ours, ref, 4 * TOL[h.dtype], "against the reference")
    return ours


@pytest.mark.parametrize("N", [1, 2, 15, 16, 17])
@pytest.mark.parametrize("Dv", [None, 24])
def test_short_rows(Dv, N, device="cpu"):
    """Short texts, many labels, rows packed several to a unit, an empty row: its scores are 0."""
    h, mask, W, v, w = score_inputs(9, N, 20, 2500, Dv=Dv, device=device, padding="anywhere" if N > 2 else "end",
                                    empty_rows=[2], seed=N)
    score = assert_matches(h, mask, W, v, w)
    assert (score[2] == 0).all()


@pytest.mark.parametrize("shape", [(4, 300, 64, 257), (3, 40, 256, 130), (3, 65, 24, 50)],
                         ids=lambda s: "x".join(map(str, s)))
def test_long_rows_and_wide_states(shape, device="cpu"):
    """EURLex-like rows (300 tokens: more than one token tile), a state wider than the packed path's (D = 256),
    rows longer than it packs (65 tokens)."""
    assert_matches(*score_inputs(*shape, Dv=shape[2], device=device, padding="end", empty_rows=[1]))


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("w_dtype", [None, torch.float32], ids=["w in h's dtype", "w float32"])
def test_dtypes(w_dtype, dtype, device="cpu"):
    for N in (12, 300):
        assert_matches(*score_inputs(5, N, 32, 700, Dv=16, dtype=dtype, device=device, w_dtype=w_dtype))


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_cpu_any_thread_count(threads):
    """CPU: 40 short rows (1 to 16 tokens; several packed a unit) over 1 to 3 threads: the same scores."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        inputs = score_inputs(40, 16, 64, 1100, Dv=64, padding="end", empty_rows=[0, 17], seed=5)
        score = assert_matches(*inputs)
    finally:
        torch.set_num_threads(saved)
    torch.set_num_threads(1)
    try:
        assert torch.equal(OP(*inputs), score)  # the order of each sum does not depend on the split
    finally:
        torch.set_num_threads(saved)


def test_opcheck(device="cpu"):
    for N in (5, 70):
        h, mask, W, v, w = score_inputs(3, N, 8, 40, Dv=16, device=device, empty_rows=[0])
        torch.library.opcheck(OP, (h, mask, W, v, w))
        torch.library.opcheck(OP, (h, mask, W, None, torch.randn(8, device=device)))


def test_refusals(device="cpu"):
    h, mask, W, v, w = score_inputs(2, 5, 8, 6, Dv=4, device=device)
    cases = [(w[:3], "w must be [Dv] with Dv = 4, got [3]"),
             (w.double(), "w must be float32 or h's dtype (float32), got float64"),
             (h[0, 0, :4].clone(), None)]  # a valid w: h's dtype
    for bad, message in cases:
        if message is None:
            OP(h, mask, W, v, bad)
            continue
        for fn in (OP, ops.label_attention_score, ops.label_attention_score_reference):
            with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")
                               .replace("[", r"\[").replace("]", r"\]")):
                fn(h, mask, W, v, bad)


def test_public_function_needs_no_context_and_keeps_gradients(monkeypatch):
    """Without gradients the public function calls the kernel; with one wanted, the two differentiable ops."""
    h, mask, W, v, w = score_inputs(3, 9, 8, 50, Dv=7)
    expected = OP(h, mask, W, v, w)
    with torch.no_grad():
        assert torch.equal(ops.label_attention_score(h, mask, W, v, w), expected)
    w.requires_grad_()
    score = ops.label_attention_score(h, mask, W, v, w)
    assert score.requires_grad
    score.sum().backward()
    close(w.grad, torch.relu(ops.label_attention_reference(h, mask, W, v)).sum((0, 1)), 1e-4, "grad_w")


@pytest.mark.cuda
def test_cuda_composes_the_two_ops():
    """On a GPU (no kernel of this op there): the two ops, under no_grad as in evaluation."""
    h, mask, W, v, w = score_inputs(5, 16, 32, 600, Dv=16, device="cuda", empty_rows=[1])
    with torch.no_grad():
        score = ops.label_attention_score(h, mask, W, v, w)
    c = lambda t: t.double().cpu()  # noqa: E731
    close(score, ops.label_attention_score_reference(c(h), mask.cpu(), c(W), c(v), c(w)), 4 * TOL[h.dtype], "cuda")


def test_head_in_eval_mode_uses_the_one_pass(monkeypatch):
    """AttentionHead out of training and without gradients: the one-pass scores, equal to its training-mode
    computation without dropout."""
    torch.manual_seed(0)
    head = AttentionHead(16, 300, [12], dropout=0.0)
    h, mask, *_ = make_inputs(6, 14, 16, 1, empty_rows=[3], seed=4)
    with torch.no_grad():
        two_ops = head(h, mask)  # training mode: label_attention, then relu_dropout_dot (p = 0)
        head.eval()
        calls = []
        real = ops.label_attention_score
        monkeypatch.setattr(ops, "label_attention_score", lambda *a: calls.append(1) or real(*a))
        one_pass = head(h, mask)
    assert calls == [1]
    close(one_pass, two_ops, 1e-5, "eval scores")
    out = head(h, mask)  # gradients wanted: still right, and differentiable
    assert out.requires_grad
    close(out, two_ops, 1e-5, "eval scores with gradients")


def test_cpu_portable_path():
    """CPU: the tests again with XMCNAS_CPU_ISA=generic (no packed path: tiles padded to 16 tokens, std::exp)."""
    passes_without_avx512(__file__, "short_rows or long_rows or any_thread or dtypes")
