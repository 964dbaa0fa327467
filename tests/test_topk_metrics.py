"""topk_metrics on the CPU: the compiled kernel against the PyTorch reference,
against a direct numpy implementation of pyxclib's definitions, and against
hand-computed cases."""
import math

import numpy as np
import pytest
import torch

from xmcnas_fast import ops

op = torch.ops.xmcnas_fast.topk_metrics


def random_truth(R, n_labels, mean=5, seed=0, empty_every=0):
    """A CSR truth with about `mean` distinct labels a row, ids in [0, n_labels)."""
    g = np.random.default_rng(seed)
    rows = []
    for r in range(R):
        n = 0 if empty_every and r % empty_every == 0 else int(g.integers(1, 2 * mean))
        rows.append(np.sort(g.choice(n_labels, size=min(n, n_labels), replace=False)))
    indptr = np.zeros(R + 1, dtype=np.int64)
    indptr[1:] = np.cumsum([len(x) for x in rows])
    indices = np.concatenate(rows).astype(np.int64) if rows else np.zeros(0, np.int64)
    return torch.from_numpy(indptr), torch.from_numpy(indices)


def inv_propensity(n_labels, seed=0):
    return torch.from_numpy(np.random.default_rng(seed).uniform(1.0, 20.0, n_labels))


def numpy_metrics(scores, indptr, indices, k, inv_prop=None):
    """pyxclib's definitions, row by row: argsort, CSR lookups, ideal DCG over
    min(j, #true) ranks, PSP's ideal from the true labels sorted by inv_prop."""
    s = scores.double().numpy()
    indptr, indices = indptr.numpy(), indices.numpy()
    ip = None if inv_prop is None else inv_prop.double().numpy()
    R = s.shape[0]
    disc = 1.0 / np.log2(np.arange(k) + 2.0)
    sums = np.zeros((4, k))
    topk = np.zeros((R, k), dtype=np.int64)
    for r in range(R):
        top = np.argsort(-s[r], kind="stable")[:k]
        topk[r] = top
        truth = indices[indptr[r]:indptr[r + 1]]
        hit = np.isin(top, truth).astype(np.float64)
        sums[0] += np.cumsum(hit)
        if len(truth):
            idcg = np.cumsum(disc)[np.minimum(np.arange(k), len(truth) - 1)]
            sums[1] += np.cumsum(hit * disc) / idcg
        if ip is not None:
            sums[2] += np.cumsum(hit * ip[top])
            best = np.sort(ip[np.unique(truth)])[::-1][:k]
            sums[3] += np.cumsum(np.pad(best, (0, k - len(best))))
    return torch.from_numpy(sums), torch.from_numpy(topk)


def assert_metrics_equal(got, want, rtol=1e-12):
    sums, topk = got
    ref_sums, ref_topk = want
    assert sums.dtype == torch.float64 and topk.dtype == torch.int64
    assert torch.equal(topk, ref_topk)
    assert torch.equal(sums[0], ref_sums[0])  # hit counts: exact
    torch.testing.assert_close(sums, ref_sums, rtol=rtol, atol=1e-12)


def test_kernel_is_registered():
    assert ops.has_kernel("topk_metrics", "cpu"), ops.extension_status()


# Shapes cover the seeded start (k <= 16, L >= 256) and the plain one, and the heap (k > 32).
@pytest.mark.parametrize("R,L,k", [(64, 300, 5), (33, 1000, 1), (20, 97, 97), (17, 2000, 40), (50, 50, 3),
                                   (40, 700, 16), (40, 700, 17), (9, 255, 4)])
@pytest.mark.parametrize("with_prop", [False, True])
def test_matches_reference(R, L, k, with_prop):
    scores = torch.randn(R, L)
    indptr, indices = random_truth(R, L, seed=R + L)
    ip = inv_propensity(L) if with_prop else None
    got = ops.topk_metrics(scores, indptr, indices, k, ip)
    assert_metrics_equal(got, ops.topk_metrics_reference(scores, indptr, indices, k, ip))
    if not with_prop:
        assert not got[0][2:].any()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_numpy_pyxclib(dtype):
    R, L, k = 120, 700, 5
    scores = torch.rand(R, L, dtype=dtype)
    indptr, indices = random_truth(R, L, seed=3, empty_every=7)
    ip = inv_propensity(L, seed=4)
    assert_metrics_equal(op(scores, indptr, indices, k, ip), numpy_metrics(scores, indptr, indices, k, ip))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_reduced_precision_scores(dtype):
    # Few distinct values: many ties, broken by label id as in the reference.
    R, L, k = 40, 513, 7
    scores = torch.randn(R, L).to(dtype)
    indptr, indices = random_truth(R, L, seed=5)
    ip = inv_propensity(L)
    got = op(scores, indptr, indices, k, ip)
    assert_metrics_equal(got, ops.topk_metrics_reference(scores, indptr, indices, k, ip))
    assert_metrics_equal(got, numpy_metrics(scores.float(), indptr, indices, k, ip))


def test_hand_computed_case():
    # Row 0: ranking 2, 0, 3, 1 (scores 0.9, 0.8, 0.5, 0.1); true labels {0, 1}.
    # Row 1: ranking 3, 1, 0, 2; true label {3}.  Row 2: no true label.
    scores = torch.tensor([[0.8, 0.1, 0.9, 0.5], [0.2, 0.6, 0.1, 0.7], [1.0, 2.0, 3.0, 4.0]])
    indptr = torch.tensor([0, 2, 3, 3])
    indices = torch.tensor([0, 1, 3])
    ip = torch.tensor([2.0, 4.0, 1.0, 3.0])
    sums, topk = op(scores, indptr, indices, 3, ip)
    assert topk.tolist() == [[2, 0, 3], [3, 1, 0], [3, 2, 1]]
    d2, d3 = 1 / math.log2(3), 1 / math.log2(4)
    # hits in top j: row 0 -> 0, 1, 1; row 1 -> 1, 1, 1
    assert sums[0].tolist() == [1.0, 2.0, 2.0]
    precision = sums[0] / (torch.arange(1, 4) * 3)
    torch.testing.assert_close(precision, torch.tensor([1 / 3, 1 / 3, 2 / 9], dtype=torch.float64))
    # nDCG@j: row 0 -> 0, d2/(1+d2), d2/(1+d2); row 1 -> 1, 1, 1; row 2 -> 0
    ndcg0 = d2 / (1 + d2)
    torch.testing.assert_close(sums[1], torch.tensor([1.0, 1 + ndcg0, 1 + ndcg0], dtype=torch.float64))
    # PSP: found ip 2 (row 0, rank 2) and 3 (row 1, rank 1);
    # best: row 0 -> 4, 4+2, 4+2; row 1 -> 3, 3, 3
    torch.testing.assert_close(sums[2], torch.tensor([3.0, 5.0, 5.0], dtype=torch.float64))
    torch.testing.assert_close(sums[3], torch.tensor([7.0, 9.0, 9.0], dtype=torch.float64))
    assert d3 > 0  # rank 3 never hit here: its discount does not enter


def test_ties_rank_lower_label_first():
    scores = torch.tensor([[1.0, 2.0, 2.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    indptr = torch.tensor([0, 1, 2])
    indices = torch.tensor([4, 2])
    sums, topk = op(scores, indptr, indices, 3)
    assert topk.tolist() == [[1, 2, 4], [0, 1, 2]]
    assert sums[0].tolist() == [0.0, 0.0, 2.0]
    # Wide rows of few distinct values: ties everywhere, in the buffer and at its threshold.
    wide = torch.randint(0, 4, (30, 3000)).float()
    indptr, indices = random_truth(30, 3000)
    assert_metrics_equal(op(wide, indptr, indices, 9), numpy_metrics(wide, indptr, indices, 9))
    assert_metrics_equal(op(wide, indptr, indices, 60), numpy_metrics(wide, indptr, indices, 60))


@pytest.mark.parametrize("L", [40, 600])
def test_infinite_scores(L):
    scores = torch.full((4, L), -math.inf)
    scores[1, 7] = 1.0
    scores[2, 30] = math.inf
    scores[2, 3] = math.inf
    scores[3] = torch.randn(L)
    scores[3, 20:] = -math.inf
    indptr = torch.tensor([0, 1, 2, 3, 3])
    indices = torch.tensor([0, 7, 30])
    sums, topk = op(scores, indptr, indices, 3)
    assert topk[:3].tolist() == [[0, 1, 2], [7, 0, 1], [3, 30, 0]]
    assert_metrics_equal((sums, topk), ops.topk_metrics_reference(scores, indptr, indices, 3))


def test_k_equals_one_and_l():
    scores = torch.randn(25, 60)
    indptr, indices = random_truth(25, 60, seed=8)
    ip = inv_propensity(60)
    for k in (1, 60):
        assert_metrics_equal(op(scores, indptr, indices, k, ip), numpy_metrics(scores, indptr, indices, k, ip))


def test_tiny_shapes():
    one = torch.tensor([[0.5]])
    sums, topk = op(one, torch.tensor([0, 1]), torch.tensor([0]), 1, torch.tensor([3.0]))
    assert topk.tolist() == [[0]] and sums[:, 0].tolist() == [1.0, 1.0, 3.0, 3.0]
    row = torch.randn(1, 10)
    indptr, indices = torch.tensor([0, 2]), torch.tensor([int(row.argmax()), int(row.argmin())])
    assert_metrics_equal(op(row, indptr, indices, 10), numpy_metrics(row, indptr, indices, 10))
    empty = torch.zeros(0, 5)
    sums, topk = op(empty, torch.tensor([0]), torch.zeros(0, dtype=torch.long), 2)
    assert topk.shape == (0, 2) and not sums.any()


def test_empty_truth_rows_count_zero():
    scores = torch.randn(6, 30)
    indptr = torch.tensor([0, 0, 0, 0, 0, 0, 0])
    indices = torch.zeros(0, dtype=torch.long)
    sums, topk = op(scores, indptr, indices, 4, inv_propensity(30))
    assert not sums.any()
    assert torch.equal(topk, torch.sort(scores, dim=1, descending=True, stable=True).indices[:, :4])


def test_unseen_labels_count_in_the_ideal_only():
    L, n_total = 20, 26
    scores = torch.randn(2, L)
    best = int(scores[0].argmax())
    # Row 0: its best label plus two labels the scores cannot rank.
    indptr = torch.tensor([0, 3, 4])
    indices = torch.tensor([best, 21, 25, 22])
    ip = inv_propensity(n_total)
    sums, topk = op(scores, indptr, indices, 3, ip)
    assert_metrics_equal((sums, topk), ops.topk_metrics_reference(scores, indptr, indices, 3, ip))
    assert_metrics_equal((sums, topk), numpy_metrics(scores, indptr, indices, 3, ip))
    # row 0: one hit at rank 1 of three true labels; row 1: none of its one (unseen) label
    assert sums[0].tolist() == [1.0, 1.0, 1.0]
    ideal = np.cumsum(1 / np.log2(np.arange(3) + 2))
    torch.testing.assert_close(sums[1], torch.tensor(1.0 / ideal, dtype=torch.float64))
    ranked = sorted([float(ip[best]), float(ip[21]), float(ip[25])], reverse=True)
    want_den = np.cumsum(ranked) + float(ip[22])
    torch.testing.assert_close(sums[3], torch.tensor(want_den, dtype=torch.float64))


def test_duplicate_truth_ids_match_reference():
    scores = torch.randn(4, 50)
    indptr = torch.tensor([0, 3, 3, 5, 6])
    top0 = int(scores[0].argmax())
    indices = torch.tensor([top0, top0, 7, 9, 9, 1])
    ip = inv_propensity(50)
    assert_metrics_equal(op(scores, indptr, indices, 5, ip),
                         ops.topk_metrics_reference(scores, indptr, indices, 5, ip))


def test_non_contiguous_scores():
    base = torch.randn(300, 90)
    indptr, indices = random_truth(90, 150, seed=11)
    ip = inv_propensity(150)
    transposed = base.t()[:, :150]               # column-major rows
    sliced = torch.randn(90, 400)[:, 100:250]    # unit stride, row stride 400
    for scores in (transposed, sliced):
        assert not scores.is_contiguous()
        assert_metrics_equal(op(scores, indptr, indices, 6, ip),
                             op(scores.contiguous(), indptr, indices, 6, ip), rtol=0)


def test_int32_csr_accepted():
    scores = torch.randn(10, 40)
    indptr, indices = random_truth(10, 40, seed=2)
    assert_metrics_equal(op(scores, indptr.int(), indices.int(), 5), op(scores, indptr, indices, 5), rtol=0)


def test_independent_of_thread_count():
    scores = torch.randn(500, 800)
    indptr, indices = random_truth(500, 800, seed=9)
    ip = inv_propensity(800)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(scores, indptr, indices, 5, ip)
    finally:
        torch.set_num_threads(threads)
    two = op(scores, indptr, indices, 5, ip)
    assert torch.equal(two[0], one[0]) and torch.equal(two[1], one[1])  # bit for bit


@pytest.mark.parametrize("where", [0, 3, 37, 999])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_nan_raises(where, dtype):
    scores = torch.randn(8, 1000).to(dtype)
    scores[5, where] = math.nan
    indptr, indices = random_truth(8, 1000)
    with pytest.raises(ValueError, match="^topk_metrics: scores contain NaN"):
        op(scores, indptr, indices, 4)


def bad_inputs():
    s = torch.randn(3, 10)
    ip = torch.tensor([0, 2, 3, 4])
    ix = torch.tensor([1, 2, 3, 4])
    return [
        ("k must be in", (s, ip, ix, 0)),
        ("k must be in", (s, ip, ix, 11)),
        ("indptr must have R\\+1", (s, ip[:-1], ix, 2)),
        ("indptr must start at 0 and end", (s, ip + 1, torch.tensor([1, 2, 3, 4, 5]), 2)),
        ("indptr must start at 0 and end", (s, ip, ix[:3], 2)),
        ("indptr must be non-decreasing", (s, torch.tensor([0, 3, 2, 4]), ix, 2)),
        ("label indices must be >= 0", (s, ip, torch.tensor([1, -2, 3, 4]), 2)),
        ("a label index is >= the number of labels \\(10\\)", (s, ip, torch.tensor([1, 2, 10, 4]), 2)),
        ("a label index is >= the number of labels \\(12\\)",
         (s, ip, torch.tensor([1, 2, 12, 4]), 2, torch.ones(12))),
        ("inv_prop must have at least L", (s, ip, ix, 2, torch.ones(9))),
        ("scores must be \\[R, L\\]", (torch.randn(30), ip, ix, 2)),
        ("scores must be float", (torch.ones(3, 10, dtype=torch.long), ip, ix, 2)),
        ("indices must be int64 or int32", (s, ip, ix.float(), 2)),
    ]


@pytest.mark.parametrize("message,args", bad_inputs(), ids=[m for m, _ in bad_inputs()])
def test_bad_inputs_raise_value_error(message, args):
    with pytest.raises(ValueError, match="^topk_metrics: " + message):
        op(*args)


def test_public_function_uses_the_kernel_and_checks_shape():
    scores = torch.randn(4, 12)
    indptr, indices = random_truth(4, 12)
    assert_metrics_equal(ops.topk_metrics(scores, indptr, indices, 3), op(scores, indptr, indices, 3), rtol=0)
    with pytest.raises(ValueError, match="^topk_metrics"):
        ops.topk_metrics(torch.randn(12), indptr, indices, 3)


@pytest.mark.parametrize("with_prop", [False, True])
def test_opcheck(with_prop):
    scores = torch.randn(9, 40)
    indptr, indices = random_truth(9, 40)
    args = (scores, indptr, indices, 5, inv_propensity(40) if with_prop else None)
    torch.library.opcheck(op.default, args)
