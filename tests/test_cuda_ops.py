"""topk_metrics' CUDA kernel against the plain-PyTorch reference, in float64 on the CPU.

Every test here needs a GPU (marker `cuda`; tests/conftest.py skips them, with
the reason, where none is present). The cases reach its warp-selection kernel
(k <= 8 and 9 <= k <= 32) and its sort path (k > 32). label_attention and
layer_sum are tested on every device, CUDA included, in their own files
(tests/test_label_attention.py, tests/test_layer_sum.py, tests/test_op_contract.py).
"""
import math

import pytest
import torch

from xmcnas_fast import ops

pytestmark = pytest.mark.cuda

from _kernels import require_kernel

XOPS = torch.ops.xmcnas_fast
DEV = "cuda"


@pytest.fixture(autouse=True)
def _cuda_kernels():
    require_kernel("topk_metrics", DEV)


# --------------------------------------------------------------------------------------------
# topk_metrics
# --------------------------------------------------------------------------------------------

def truth_csr(R, L, seed, n_total=None, empty_every=7, max_true=9):
    """A CSR truth with empty rows, ids up to n_total - 1 (>= L: unseen labels) and a duplicate."""
    g = torch.Generator().manual_seed(seed)
    n_total = n_total or L
    counts = torch.randint(0, max_true + 1, (R,), generator=g)
    counts[::empty_every] = 0
    indices = torch.cat([torch.randperm(n_total, generator=g)[: int(c)] for c in counts]) if R else \
        torch.zeros(0, dtype=torch.long)
    indptr = torch.zeros(R + 1, dtype=torch.long)
    indptr[1:] = counts.cumsum(0)
    return indptr, indices


def check_topk(scores, indptr, indices, k, inv_prop=None):
    sums, topk = XOPS.topk_metrics(scores, indptr, indices, k, inv_prop)
    ref_sums, ref_topk = ops.topk_metrics_reference(scores.cpu(), indptr, indices, k,
                                                    None if inv_prop is None else inv_prop.cpu())
    assert sums.device == scores.device and topk.device == scores.device
    assert sums.dtype == torch.float64 and topk.dtype == torch.int64 and sums.shape == (4, k)
    assert torch.equal(topk.cpu(), ref_topk.cpu()), "top-k labels, ties by lower label id"
    torch.testing.assert_close(sums.cpu(), ref_sums, rtol=1e-12, atol=1e-9)
    return sums


@pytest.mark.parametrize("k", [1, 5, 8, 9, 32, 33, 77])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16], ids=str)
def test_topk_metrics_matches_reference(k, dtype):
    R, L = 53, 1007
    g = torch.Generator().manual_seed(k)
    scores = torch.randn(R, L, generator=g).to(dtype)   # bfloat16/float16 round to many ties
    scores[3] = 0.5                                     # a row of ties
    scores[4, ::3] = -math.inf
    indptr, indices = truth_csr(R, L, seed=k)
    inv_prop = torch.rand(L, generator=g) * 3 + 1
    check_topk(scores.to(DEV), indptr, indices, k)
    check_topk(scores.to(DEV), indptr, indices, k, inv_prop.to(DEV))


def test_topk_metrics_ties_rank_lower_label_first():
    scores = torch.tensor([[1.0, 3.0, 3.0, 2.0, 3.0, 0.0], [0.0] * 6], device=DEV)
    indptr = torch.tensor([0, 2, 3])
    indices = torch.tensor([2, 4, 5])
    sums, topk = XOPS.topk_metrics(scores, indptr, indices, 3)
    assert topk.cpu().tolist() == [[1, 2, 4], [0, 1, 2]]
    assert sums[0].cpu().tolist() == [0.0, 1.0, 2.0]
    check_topk(scores, indptr, indices, 3)


@pytest.mark.parametrize("L", [1, 5, 32, 33])
def test_topk_metrics_k_equals_L(L):
    R = 9
    scores = torch.randn(R, L, generator=torch.Generator().manual_seed(L), device="cpu").to(DEV)
    indptr, indices = truth_csr(R, L, seed=L, max_true=min(L, 4))
    check_topk(scores, indptr, indices, L, torch.rand(L).to(DEV) + 1)


def test_topk_metrics_unseen_labels_duplicates_and_host_truth():
    """Ids >= L (unseen) count as true, never hit; a duplicated id counts twice in #true (as the reference)."""
    R, L, n_total = 40, 300, 360
    scores = torch.randn(R, L, generator=torch.Generator().manual_seed(7)).to(DEV)
    indptr, indices = truth_csr(R, L, seed=7, n_total=n_total)
    assert indptr[2] > indptr[1], "row 1 has labels"
    first = int(indptr[1])
    indices = torch.cat([indices[: first + 1], indices[first:]])  # row 1's first label, twice
    indptr[2:] += 1
    dup = int(indices[first])
    if dup < L:
        scores[1, dup] = 10.0                           # ranked first: one hit, counted once
    inv_prop = torch.rand(n_total) * 2 + 1
    check_topk(scores, indptr, indices.int(), 5, inv_prop)      # int32 indices, truth on the host
    check_topk(scores, indptr.to(DEV), indices.to(DEV), 40, inv_prop.to(DEV))


def test_topk_metrics_many_rows_and_long_rows():
    R, L = 1203, 13330
    g = torch.Generator().manual_seed(11)
    scores = torch.randn(R, L, generator=g).to(DEV)
    indptr, indices = truth_csr(R, L, seed=11)
    check_topk(scores, indptr, indices, 5, torch.rand(L, generator=g) + 1)


def test_topk_metrics_empty_batch():
    sums, topk = XOPS.topk_metrics(torch.zeros(0, 10, device=DEV), torch.zeros(1, dtype=torch.long),
                                   torch.zeros(0, dtype=torch.long), 3)
    assert topk.shape == (0, 3) and (sums.cpu() == 0).all()


def test_topk_metrics_opcheck():
    scores = torch.randn(6, 50, device=DEV)
    indptr, indices = truth_csr(6, 50, seed=3)
    torch.library.opcheck(torch.ops.xmcnas_fast.topk_metrics.default,
                          (scores, indptr.to(DEV), indices.to(DEV), 5, torch.rand(50, device=DEV)))


@pytest.mark.parametrize("change, message", [
    (lambda s, p, i: (s, p, i, 0), "k must be in"),
    (lambda s, p, i: (s, p[:-1], i, 2), "indptr must have R\\+1"),
    (lambda s, p, i: (s, p + 1, i, 2), "indptr must start at 0"),
    (lambda s, p, i: (s, torch.tensor([0, 3, 1, 4]), i, 2), "non-decreasing"),
    (lambda s, p, i: (s, p, i - 5, 2), "must be >= 0"),
    (lambda s, p, i: (s, p, i + 10, 2), "is >= the number of labels \\(40\\)"),
    (lambda s, p, i: (s.index_fill(1, torch.tensor([4], device=DEV), math.nan), p, i, 2), "NaN"),
    (lambda s, p, i: (s.index_fill(1, torch.tensor([4], device=DEV), math.nan), p, i, 35), "NaN"),  # sort path
    (lambda s, p, i: (s, p, i, 41), "k must be in"),
])
def test_topk_metrics_bad_inputs(change, message):
    scores = torch.randn(3, 40, device=DEV)
    indptr, indices = torch.tensor([0, 2, 2, 4]), torch.tensor([1, 3, 0, 39])
    with pytest.raises(ValueError, match=r"^topk_metrics: .*" + message):
        XOPS.topk_metrics(*change(scores, indptr, indices))
