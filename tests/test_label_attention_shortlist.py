"""label_attention_shortlist on every device against its reference, and the reference against label_attention's.

Written once and parametrized over the device (`cpu`; `cuda`, marked and skipped without a GPU) and the
values (None: the values are h; or v of width Dv), as tests/test_label_attention.py is. ctx[b,k] is the
dense op's context of label labels[b,k]: the cases hold padding ids (-1) at the end and in the middle of a
row, a label twice in a row, K = 1, K > L, rows without a real token, N = 1, views of h as values, and
on the CPU slot blocks (about 32K scores a task: K = 600 at 70 tokens is two) cut between threads, on
AVX-512 and, through XMCNAS_CPU_ISA=generic, on the portable path. Errors are bounded against the float64
reference as label_attention's are (TOL; gradients 5x): 16-bit inputs accumulate in float32.
"""
import pytest
import torch

from xmcnas_fast import ops

from _kernels import DEVICES, close, require_kernel, rerun_on_the_portable_path
from test_label_attention import TOL, make_inputs


OP = torch.ops.xmcnas_fast.label_attention_shortlist
OP_BACKWARD = torch.ops.xmcnas_fast.label_attention_shortlist_backward
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
# (B, N, D, L, K): slots a row below L; K > L; K = 1; N = 1; two slot blocks on the CPU, width 136
SHAPES = [(5, 37, 24, 50, 20), (3, 37, 100, 21, 40), (3, 5, 8, 3, 1), (2, 1, 64, 130, 7), (4, 70, 136, 45, 600)]


def make_labels(B, K, L, seed=0, padding=True, device="cpu"):
    """labels [B,K] int64: random ids in [0, L) with a duplicate in row 0 and, when padding, -1 at the end
    of row 0 and in the middle of the last row."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, L, (B, K), generator=g)
    if K > 1:
        labels[0, 1] = labels[0, 0]
    if padding and K > 1:
        labels[0, -1] = -1
        labels[-1, K // 2] = -1
    return labels.to(device)


def dense_gathered(fn, h, mask, W, labels, v):
    """The dense op fn (label_attention or its reference) over all L labels, then each row's labels picked."""
    ctx = fn(h, mask, W, v)                                                  # [B, L, Dv]
    picked = torch.gather(ctx, 1, labels.clamp(min=0).unsqueeze(-1).expand(-1, -1, ctx.shape[2]))
    return picked * (labels >= 0).unsqueeze(-1)


def run(fn, h, mask, W, labels, v, grad, **kw):
    """ctx and the gradients of h, W (and v) of fn(h, mask, W, labels, v) for the output gradient `grad`."""
    leaves = [t.detach().clone().requires_grad_() for t in (h, W) + (() if v is None else (v,))]
    out = fn(leaves[0], mask, leaves[1], labels, leaves[2] if v is not None else None, **kw)
    return (out.detach(), *torch.autograd.grad(out, leaves, grad))


def assert_matches_reference(h, mask, W, labels, v, tol=None, seed=1):
    """ctx and every gradient of ops.label_attention_shortlist against the float64 reference on the CPU."""
    tol = tol or TOL[h.dtype]
    Dv = h.shape[2] if v is None else v.shape[2]
    g = torch.Generator().manual_seed(seed)
    grad = torch.randn(*labels.shape, Dv, generator=g, dtype=torch.float64).to(h.dtype).to(h.device)
    ours = run(ops.label_attention_shortlist, h, mask, W, labels, v, grad)
    c = lambda t: None if t is None else t.detach().double().cpu()  # noqa: E731
    ref = run(ops.label_attention_shortlist_reference, c(h), mask.cpu(), c(W), labels.cpu(), c(v), c(grad))
    assert ours[0].shape == (*labels.shape, Dv) and all(t.dtype == h.dtype for t in ours)
    assert all(t.device == h.device for t in ours)
    for what, a, b, k in zip(("ctx", "grad_h", "grad_W", "grad_v"), ours, ref, (1, 5, 5, 5)):
        close(a, b, k * tol, what)
    return ours


@pytest.fixture(autouse=True)
def _kernel(request):
    """The compiled op must serve the test's device, but for the tests of the reference alone."""
    if not request.node.name.startswith("test_reference"):
        callspec = getattr(request.node, "callspec", None)
        require_kernel("label_attention_shortlist", callspec.params.get("device", "cpu") if callspec else "cpu")


# --------------------------------------------------------------------------------------------
# The reference (runs without the extension too)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("Dv", [None, 6])
def test_reference_is_the_dense_op_gathered(Dv):
    h, mask, W, v = make_inputs(4, 9, 8, 13, Dv=Dv, dtype=torch.float64, empty_rows=[2])
    labels = make_labels(4, 20, 13)                                          # K > L, duplicates, padding
    close(ops.label_attention_shortlist_reference(h, mask, W, labels, v),
          dense_gathered(ops.label_attention_reference, h, mask, W, labels, v), 1e-12, "ctx")


@pytest.mark.parametrize("sparse_grad", [False, True])
def test_reference_gradient_of_W_only_in_rows_used(sparse_grad):
    h, mask, W, v = make_inputs(3, 7, 5, 40, dtype=torch.float64)
    labels = make_labels(3, 4, 40)
    W = W.requires_grad_()
    ops.label_attention_shortlist_reference(h, mask, W, labels, v, sparse_grad=sparse_grad).square().sum().backward()
    assert W.grad.layout == (torch.sparse_coo if sparse_grad else torch.strided)
    g = W.grad.to_dense()
    unused = torch.ones(40, dtype=torch.bool)
    unused[labels[labels >= 0]] = False
    assert (g[unused] == 0).all() and (g[~unused].abs().sum(1) > 0).all()


# --------------------------------------------------------------------------------------------
# The compiled op, on every device
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", FLOATS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("Dv", [None, 5, 24])
@pytest.mark.parametrize("device", DEVICES)
def test_values_and_gradients(device, Dv, shape, dtype):
    B, N, D, L, K = shape
    h, mask, W, v = make_inputs(B, N, D, L, Dv=Dv, dtype=dtype, device=device,
                                empty_rows=[1] if B > 2 else [])
    labels = make_labels(B, K, L, device=device)
    ctx, gh, _, *gv = assert_matches_reference(h, mask, W, labels, v)
    real = mask.cpu()
    assert (gh.cpu()[~real] == 0).all() and all((g.cpu()[~real] == 0).all() for g in gv), "padding: no gradient"
    assert (ctx.cpu()[labels.cpu() < 0] == 0).all(), "a padding slot gives zeros"
    assert (ctx.cpu()[~real.any(1)] == 0).all(), "a row with no real token gives zeros"


@pytest.mark.parametrize("Dv", [None, 24])
@pytest.mark.parametrize("device", DEVICES)
def test_equals_the_dense_kernel_gathered(device, Dv):
    h, mask, W, v = make_inputs(4, 30, 16, 300, Dv=Dv, device=device, empty_rows=[2])
    labels = make_labels(4, 50, 300, device=device)
    close(ops.label_attention_shortlist(h, mask, W, labels, v),
          dense_gathered(ops.label_attention, h, mask, W, labels, v), 2e-5, "ctx")


@pytest.mark.parametrize("Dv", [None, 6])
@pytest.mark.parametrize("device", DEVICES)
def test_log_sum_exp(device, Dv):
    h, mask, W, v = make_inputs(4, 12, 8, 20, Dv=Dv, device=device, empty_rows=[2])
    labels = make_labels(4, 9, 20, device=device)
    _, lse = OP(h, mask, W, labels, v)
    s = torch.einsum("ld,bnd->bln", W.double().cpu(), h.double().cpu())
    dense = torch.logsumexp(s.masked_fill(~mask.cpu().unsqueeze(1), -torch.inf), dim=-1)   # [B, L]
    want = torch.gather(dense, 1, labels.cpu().clamp(min=0))
    live = (labels.cpu() >= 0) & mask.cpu().any(1, keepdim=True)
    assert lse.dtype == torch.float32 and lse.shape == (4, 9)
    close(lse.cpu()[live], want[live], 1e-6, "lse")
    assert (lse.cpu()[~live] == torch.inf).all(), "+inf for a padding slot or a row with no real token"


@pytest.mark.parametrize("sparse_grad", [False, True])
@pytest.mark.parametrize("device", DEVICES)
def test_gradient_of_W_only_in_rows_used(device, sparse_grad):
    h, mask, W, v = make_inputs(3, 11, 8, 60, Dv=5, device=device, dtype=torch.float64)
    labels = make_labels(3, 10, 60, device=device)
    grad = torch.randn(3, 10, 5, dtype=torch.float64, device=device)
    W = W.requires_grad_()
    ops.label_attention_shortlist(h, mask, W, labels, v, sparse_grad=sparse_grad).backward(grad)
    assert W.grad.layout == (torch.sparse_coo if sparse_grad else torch.strided)
    if sparse_grad:  # as nn.Embedding(sparse=True): one entry a real slot, a duplicate twice, padding never
        assert W.grad._nnz() == int((labels >= 0).sum())
    got = W.grad.to_dense().cpu()
    want = run(ops.label_attention_shortlist_reference, h.cpu(), mask.cpu(), W.detach().cpu(), labels.cpu(),
               v.cpu(), grad.cpu())[2]
    close(got, want, 5e-6, "grad_W")
    unused = torch.ones(60, dtype=torch.bool)
    unused[labels.cpu()[labels.cpu() >= 0]] = False
    assert (got[unused] == 0).all()


@pytest.mark.parametrize("device", DEVICES)
def test_sparse_gradient_trains_only_the_rows_used(device):
    """One SparseAdam step over the sparse gradient moves the shortlisted rows of W and no other."""
    h, mask, W, v = make_inputs(2, 9, 8, 50, Dv=4, device=device)
    labels = make_labels(2, 6, 50, device=device)
    W = torch.nn.Parameter(W)
    before = W.detach().clone()
    opt = torch.optim.SparseAdam([W], lr=0.1)
    ops.label_attention_shortlist(h, mask, W, labels, v, sparse_grad=True).square().sum().backward()
    opt.step()
    moved = (W.detach() != before).any(1).cpu()
    used = torch.zeros(50, dtype=torch.bool)
    used[labels.cpu()[labels.cpu() >= 0]] = True
    assert torch.equal(moved, used)


@pytest.mark.parametrize("Dv", [None, 3])
@pytest.mark.parametrize("device", DEVICES)
def test_gradcheck_float64(device, Dv):
    h, mask, W, v = make_inputs(3, 6, 4, 7, Dv=Dv, dtype=torch.float64, device=device, empty_rows=[1])
    labels = make_labels(3, 9, 7, device=device)
    leaves = [t.requires_grad_() for t in (h, W, v) if t is not None]
    assert torch.autograd.gradcheck(lambda h, W, *v: ops.label_attention_shortlist(h, mask, W, labels, *v), leaves)


# (Dv, whether the inputs require grad, dtype)
OPCHECK_CASES = [(None, False, torch.float32), (None, True, torch.float32), (16, True, torch.float32),
                 (16, False, torch.bfloat16), (None, True, torch.bfloat16)]


@pytest.mark.parametrize("Dv, requires_grad, dtype", OPCHECK_CASES, ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device, Dv, requires_grad, dtype):
    h, mask, W, v = make_inputs(3, 7, 8, 6, Dv=Dv, dtype=dtype, device=device, empty_rows=[0])
    labels = make_labels(3, 5, 6, device=device)
    for t in (h, W, v):
        if t is not None:
            t.requires_grad_(requires_grad)
    torch.library.opcheck(OP, (h, mask, W, labels, v, False))
    with torch.no_grad():  # the backward op's inputs: saved tensors, not differentiated through
        ctx, lse = OP(h, mask, W, labels, v)
    torch.library.opcheck(OP_BACKWARD, (torch.randn_like(ctx), h.detach(), mask, W.detach(), labels,
                                        None if v is None else v.detach(), ctx, lse))


@pytest.mark.parametrize("device", DEVICES)
def test_values_that_are_h_or_a_view_of_it(device):
    """v given as h itself, or as a view of h, is a separate input with its own gradient: the values
    are h only when v is None, and the gradients split between h and v as the reference's do."""
    h, mask, W, _ = make_inputs(3, 10, 12, 30, device=device, empty_rows=[1])
    labels = make_labels(3, 8, 30, device=device)
    grad = torch.randn(3, 8, 12, device=device)
    out, gh, gW = run(ops.label_attention_shortlist, h, mask, W, labels, None, grad)
    out_v, gh_v, gW_v, gv = run(ops.label_attention_shortlist, h, mask, W, labels, h, grad)
    close(out_v, out, 1e-6, "ctx")
    close(gh_v + gv, gh, 1e-5, "grad_h + grad_v")
    close(gW_v, gW, 1e-5, "grad_W")
    leaf = h.detach().clone().requires_grad_()
    for view in (leaf[..., 2:9], leaf.transpose(0, 1).contiguous().transpose(0, 1)):  # strided, permuted
        ours = ops.label_attention_shortlist(leaf, mask, W, labels, view)
        want = ops.label_attention_shortlist_reference(leaf, mask, W, labels, view)
        close(ours, want, 2e-5, "ctx")
        g = torch.randn_like(ours)
        close(torch.autograd.grad(ours, leaf, g)[0], torch.autograd.grad(want, leaf, g)[0], 1e-4, "grad h")


@pytest.mark.parametrize("B, N, K", [(0, 6, 5), (2, 0, 5), (2, 6, 0)])
@pytest.mark.parametrize("device", DEVICES)
def test_empty_sizes(device, B, N, K):
    h = torch.randn(B, N, 16, device=device, requires_grad=True)
    mask = torch.ones(B, N, dtype=torch.bool, device=device)
    W = torch.randn(9, 16, device=device, requires_grad=True)
    labels = torch.randint(0, 9, (B, K), device=device)
    out = ops.label_attention_shortlist(h, mask, W, labels)
    assert out.shape == (B, K, 16) and (out == 0).all()
    out.sum().backward()
    assert (h.grad == 0).all() and (W.grad == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_backward_is_deterministic(device, dtype):
    h, mask, W, v = make_inputs(4, 40, 32, 100, Dv=16, dtype=dtype, device=device)
    labels = make_labels(4, 300, 100, device=device)
    grad = torch.randn(4, 300, 16, device=device).to(dtype)
    first = run(ops.label_attention_shortlist, h, mask, W, labels, v, grad)
    again = run(ops.label_attention_shortlist, h, mask, W, labels, v, grad)
    assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.parametrize("device", DEVICES)
def test_public_function_runs_the_compiled_kernel(device, monkeypatch):
    h, mask, W, v = make_inputs(3, 9, 8, 5, Dv=7, device=device)
    labels = make_labels(3, 4, 5, device=device)
    expected = OP(h, mask, W, labels, v)[0]

    def reference_must_not_run(*args, **kwargs):
        raise AssertionError("ops.label_attention_shortlist fell back to the reference")

    monkeypatch.setattr(ops, "label_attention_shortlist_reference", reference_must_not_run)
    assert torch.equal(ops.label_attention_shortlist(h, mask, W, labels, v), expected)
    assert torch.equal(ops.label_attention_shortlist(h, mask.to(torch.uint8), W, labels, v), expected)


@pytest.mark.parametrize("threads", [1, 3, 5])
@pytest.mark.parametrize("Dv", [None, 40])
def test_cpu_any_thread_count(Dv, threads):
    """CPU: more threads than rows cut rows between threads: their grad_h (and grad_v) partial sums."""
    saved = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        h, mask, W, v = make_inputs(2, 70, 16, 900, Dv=Dv, padding="end")
        assert_matches_reference(h, mask, W, make_labels(2, 1500, 900), v)
    finally:
        torch.set_num_threads(saved)


def test_cpu_portable_path():
    """CPU: the kernel tests again with XMCNAS_CPU_ISA=generic, the loops a CPU without AVX-512 runs."""
    rerun_on_the_portable_path(__file__, "(values_and_gradients and cpu and float32) or cpu_any_thread or equals_the_dense")


# --------------------------------------------------------------------------------------------
# The contract: what is refused, alike by the kernels, the reference and the backward
# --------------------------------------------------------------------------------------------


def shortlist_inputs(device):
    h = torch.randn(2, 5, 4, device=device)
    mask = torch.tensor([[1, 1, 0, 1, 0], [0, 1, 1, 1, 1]], dtype=torch.bool, device=device)
    labels = torch.tensor([[0, 2, -1], [1, 1, 2]], device=device)
    return h, mask, torch.randn(3, 4, device=device), labels, torch.randn(2, 5, 6, device=device)


# (case, the start of its message): h, mask, W, labels, v -> the op's arguments
REFUSALS = [
    (lambda h, m, W, lab, v: (h, m, W[:, :-1], lab, None), "W must be [L, D=4], got [3, 3]"),
    (lambda h, m, W, lab, v: (h, m, W, lab, v.double()), "v must have h's dtype (float32), got float64"),
    (lambda h, m, W, lab, v: (h, m, W, lab[0], None), "labels must be [B,K] with B = 2, got [3]"),
    (lambda h, m, W, lab, v: (h, m, W, lab[:1], None), "labels must be [B,K] with B = 2, got [1, 3]"),
    (lambda h, m, W, lab, v: (h, m, W, lab.int(), None), "labels must be int64, got int32"),
    (lambda h, m, W, lab, v: (h, m, W, lab - 1, None), "labels must be in [-1, L=3) (-1: padding)"),
    (lambda h, m, W, lab, v: (h, m, W, lab + 1, None), "labels must be in [-1, L=3) (-1: padding)"),
]


@pytest.mark.parametrize("case, message", REFUSALS, ids=[m for _, m in REFUSALS])
@pytest.mark.parametrize("device", DEVICES)
def test_refusals(device, case, message):
    h, mask, W, labels, v = shortlist_inputs(device)
    args = case(h, mask, W, labels, v)

    def refusal(fn, *a):
        with pytest.raises(ValueError) as info:
            fn(*a)
        return str(info.value).splitlines()[0]

    compiled = refusal(OP, *args)
    assert compiled.startswith("label_attention_shortlist: " + message), compiled
    assert refusal(ops.label_attention_shortlist_reference, *args) == compiled
    ctx, lse = OP(h, mask, W, labels, None if args[4] is None else v)
    assert refusal(OP_BACKWARD, torch.ones_like(ctx), *args[:4], args[4], ctx, lse) == compiled, \
        "the backward checks the forward's inputs first, the same way"
