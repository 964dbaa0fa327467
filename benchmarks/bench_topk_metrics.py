"""topk_metrics on the CPU beside its peers and beside one read of the scores.

    python -m pytest benchmarks/bench_topk_metrics.py --benchmark-enable

k = 5 with inverse propensities (P@k, nDCG@k and PSP@k at ranks 1..5), random
float32 scores, about 5 true labels a row, 2 threads, at 3809 x 3993
(EURLex-4K's test set) and 6616 x 30938 (Wiki10-31K's). Side by side:
  ours         ops.topk_metrics;
  numpy        np.argpartition for the top k, a sort of those k (score, then
               label id), CSR lookups by searchsorted on row*L'+label keys,
               the PSP ideal by one lexsort of all true labels; vectorised over
               chunks of 1024 rows (whole-matrix temporaries would be 8 bytes
               an entry);
  torch.topk   torch.topk, then the metrics by gathering from a dense boolean
               truth matrix (built once, outside the timing), the PSP ideal as
               for numpy;
  read once    scores.sum(): the time to read the scores once (the floor of
               any method that looks at every score).
The set-up checks that the three methods agree (up to the labels of tied
scores at the k-th place, which the peers do not rank by label id).
"""
import numpy as np
import pytest
import torch

from xmcnas_fast import ops

THREADS = 2
torch.set_num_threads(THREADS)

K = 5
SHAPES = {"eurlex-4k": (3809, 3993), "wiki10-31k": (6616, 30938)}
CHUNK = 1024


def make_case(R, L, seed=0):
    g = np.random.default_rng(seed)
    scores = torch.from_numpy(g.random((R, L), dtype=np.float32))
    counts = g.integers(1, 10, size=R)  # 1..9 true labels, 5 on average
    indices = np.concatenate([g.choice(L, size=c, replace=False) for c in counts]).astype(np.int64)
    indptr = np.zeros(R + 1, dtype=np.int64)
    indptr[1:] = np.cumsum(counts)
    inv_prop = 1.0 + g.exponential(2.0, size=L)
    return scores, indptr, indices, inv_prop


def psp_ideal(indptr, indices, inv_prop, k):
    """Sum over rows of the best propensity-scored hits in j = 1..k."""
    rows = np.repeat(np.arange(len(indptr) - 1), np.diff(indptr))
    ip = inv_prop[indices]
    order = np.lexsort((-ip, rows))
    rank = np.arange(len(indices)) - indptr[rows[order]]
    keep = rank < k
    return np.cumsum(np.bincount(rank[keep], weights=ip[order][keep], minlength=k))


def numpy_topk_metrics(scores, indptr, indices, inv_prop, k=K):
    R, L = scores.shape
    n_total = len(inv_prop)
    n_true = np.diff(indptr)
    keys = np.sort(np.repeat(np.arange(R), n_true) * n_total + indices)
    disc = 1.0 / np.log2(np.arange(k) + 2.0)
    ideal = np.cumsum(disc)
    sums = np.zeros((4, k))
    topk = np.empty((R, k), dtype=np.int64)
    for s in range(0, R, CHUNK):
        x = scores[s:s + CHUNK]
        part = np.argpartition(-x, k - 1, axis=1)[:, :k]
        order = np.lexsort((part, -np.take_along_axis(x, part, 1)), axis=1)
        top = np.take_along_axis(part, order, 1)
        topk[s:s + CHUNK] = top
        q = (np.arange(s, s + len(x))[:, None] * n_total + top).ravel()
        pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
        hit = (keys[pos] == q).reshape(len(x), k).astype(np.float64)
        nt = n_true[s:s + CHUNK, None]
        sums[0] += hit.cumsum(1).sum(0)
        dcg = (hit * disc).cumsum(1)
        sums[1] += np.where(nt > 0, dcg / ideal[np.clip(np.minimum(np.arange(k), nt - 1), 0, None)], 0).sum(0)
        sums[2] += (hit * inv_prop[top]).cumsum(1).sum(0)
    sums[3] = psp_ideal(indptr, indices, inv_prop, k)
    return sums, topk


def torch_topk_metrics(scores, truth, n_true, inv_prop, indptr, indices, k=K):
    top = torch.topk(scores, k, dim=1).indices
    hit = truth.gather(1, top).double()
    disc = 1.0 / torch.log2(torch.arange(k, dtype=torch.float64) + 2.0)
    ideal = disc.cumsum(0)[torch.minimum(torch.arange(k), n_true[:, None] - 1).clamp(min=0)]
    sums = torch.zeros(4, k, dtype=torch.float64)
    sums[0] = hit.cumsum(1).sum(0)
    sums[1] = torch.where(n_true[:, None] > 0, (hit * disc).cumsum(1) / ideal, 0.0).sum(0)
    sums[2] = (hit * inv_prop[top]).cumsum(1).sum(0)
    sums[3] = torch.from_numpy(psp_ideal(indptr, indices, inv_prop.numpy(), k))
    return sums, top


@pytest.fixture(scope="module", params=list(SHAPES), ids=list(SHAPES))
def case(request):
    R, L = SHAPES[request.param]
    scores, indptr, indices, inv_prop = make_case(R, L)
    t_indptr, t_indices, t_ip = map(torch.from_numpy, (indptr, indices, inv_prop))
    truth = torch.zeros(R, L, dtype=torch.bool)
    truth[torch.repeat_interleave(torch.arange(R), torch.from_numpy(np.diff(indptr))), t_indices] = True
    n_true = t_indptr[1:] - t_indptr[:-1]
    runs = {
        "ours": lambda: ops.topk_metrics(scores, t_indptr, t_indices, K, t_ip),
        "numpy argpartition": lambda: numpy_topk_metrics(scores.numpy(), indptr, indices, inv_prop),
        "torch.topk+gather": lambda: torch_topk_metrics(scores, truth, n_true, t_ip, indptr, indices),
        "read once (scores.sum())": lambda: scores.sum(),
    }
    ours, top = runs["ours"]()
    np_sums, np_top = runs["numpy argpartition"]()
    t_sums, t_top = runs["torch.topk+gather"]()
    # The same scores ranked; the labels may differ where the k-th score is tied
    # (argpartition and torch.topk do not rank ties by label id), and with
    # them, rarely, a hit.
    for other_top, other_sums in ((torch.from_numpy(np_top), torch.from_numpy(np_sums)), (t_top, t_sums)):
        assert torch.equal(scores.gather(1, top), scores.gather(1, other_top))
        assert (top != other_top).any(1).sum() <= R // 100
        torch.testing.assert_close(ours, other_sums, rtol=1e-3, atol=0)
    return request.param, R, L, runs


@pytest.mark.parametrize("which", ["read once (scores.sum())", "ours", "torch.topk+gather", "numpy argpartition"])
def test_topk_metrics(benchmark, case, which):
    name, R, L, runs = case
    benchmark.group = f"topk_metrics k={K} {R}x{L} float32 ({name})"
    role = {"ours": "ours", "read once (scores.sum())": "floor"}.get(which, "peer")
    benchmark.extra_info["role"] = role
    if role == "floor":
        benchmark.extra_info["what"] = f"one read of the {R * L * 4 / 1e6:.0f} MB of scores"
    benchmark(runs[which])
