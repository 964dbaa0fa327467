"""metrics.py against a direct numpy implementation of pyxclib's definitions and hand-computed cases."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmcnas_fast.metrics import MetricAccumulator, compute_metrics, inv_propensity


def numpy_metrics(scores, truth, inv_prop, k=5):
    """pyxclib: argsort, flags, precision = mean(cumsum/k), ndcg with min(k, #true), psp = ratio of precisions."""
    R, L = scores.shape
    dense = truth.toarray()[:, :]
    C = dense.shape[1]
    top = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    flags = np.take_along_axis(dense[:, :L], top, axis=1)
    out = {}
    disc = 1.0 / np.log2(np.arange(k) + 2)
    n_true = dense.sum(1).astype(int)
    ideal_cum = np.cumsum(1.0 / np.log2(np.arange(1, max(n_true.max(), k) + 1) + 1))
    dcg = np.cumsum(flags * disc, axis=1)
    ip = np.asarray(inv_prop, dtype=np.float64)
    ps_flags = flags * ip[top]
    best = -np.sort(-(dense * ip[:C]), axis=1)[:, :k]
    for kk in (1, 3, 5):
        out[f"P@{kk}"] = flags[:, :kk].sum() / (kk * R)
        norm = np.minimum(ideal_cum[np.maximum(n_true - 1, 0)], ideal_cum[kk - 1])
        nd = np.where(n_true > 0, dcg[:, kk - 1] / norm, 0.0)
        out[f"nDCG@{kk}"] = nd.mean()
        out[f"PSP@{kk}"] = ps_flags[:, :kk].sum() / best[:, :kk].sum()
    return out


def random_truth(R, C, rng, per_row=5):
    rows, cols = [], []
    for r in range(R):
        n = rng.integers(0, per_row + 1)
        c = rng.choice(C, size=n, replace=False)
        rows += [r] * n
        cols += list(c)
    return sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(R, C))


@pytest.mark.parametrize("R,L,extra", [(257, 40, 0), (300, 600, 7)])
def test_streaming_matches_numpy(R, L, extra):
    rng = np.random.default_rng(R)
    truth = random_truth(R, L + extra, rng)
    scores = rng.standard_normal((R, L)).astype(np.float32)
    counts = np.asarray(truth.sum(0)).ravel()
    ip = inv_propensity(counts, R)
    expected = numpy_metrics(scores, truth, ip)
    acc = MetricAccumulator(5, ip)
    for s in range(0, R, 64):  # uneven batches
        acc.update(torch.from_numpy(scores[s:s + 64]), truth[s:s + 64])
    got = acc.result()
    for name, v in expected.items():
        assert got[name] == pytest.approx(v, rel=1e-9, abs=1e-12), name
    assert compute_metrics(scores, truth, ip) == pytest.approx(got)


def test_hand_computed_case():
    # doc 0: true {0, 2}; ranking 2 > 1 > 0 > 3  -> hits at ranks 1 and 3
    # doc 1: true {3}, plus an unseen label 4;    ranking 3 first -> hit at rank 1
    scores = torch.tensor([[0.1, 0.5, 0.9, -1.0], [0.0, 0.1, 0.2, 0.8]])
    truth = sp.csr_matrix(np.array([[1, 0, 1, 0, 0], [0, 0, 0, 1, 1]], dtype=np.float32))
    ip = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
    m = MetricAccumulator(5, ip)
    m.update(scores, truth)
    r = m.result()
    assert r["P@1"] == pytest.approx(1.0)
    assert r["P@3"] == pytest.approx((2 + 1) / 6)
    d = 1 / np.log2(np.arange(2, 7))
    nd0 = (d[0] + d[2]) / (d[0] + d[1])
    nd1 = d[0] / (d[0] + d[1])        # two true labels (one unseen) in the ideal DCG
    assert r["nDCG@3"] == pytest.approx((nd0 + nd1) / 2)
    assert r["nDCG@1"] == pytest.approx(1.0)
    # PSP@1: doc0 hit label 2 (3.0), doc1 hit label 3 (4.0); best: doc0 3.0, doc1 5.0 (the unseen label)
    assert r["PSP@1"] == pytest.approx(7.0 / 8.0)
    # PSP@3: numerators 3+1, 4; best 3+1, 5+4
    assert r["PSP@3"] == pytest.approx(8.0 / 13.0)


def test_inv_propensity_matches_jain_formula():
    counts = np.array([0, 1, 10, 1000])
    N = 5000
    C = (np.log(N) - 1) * (1.5 + 1) ** 0.55
    assert inv_propensity(counts, N) == pytest.approx(1 + C * (counts + 1.5) ** -0.55)
    assert np.all(np.diff(inv_propensity(counts, N)) < 0)  # rarer labels weigh more


def test_unseen_labels_without_propensities_count_in_ndcg():
    scores = torch.tensor([[0.9, 0.1]])
    truth = sp.csr_matrix(np.array([[1, 0, 1]], dtype=np.float32))   # label 2 unseen in training
    m = MetricAccumulator(2)
    m.update(scores, truth)
    r = m.result()
    assert "PSP@1" not in r
    assert r["P@1"] == 1.0
    d = 1 / np.log2(np.arange(2, 4))
    assert r["nDCG@1"] == pytest.approx(1.0)
    m2 = MetricAccumulator(2, ks=(2,))
    m2.update(scores, truth)
    assert m2.result()["nDCG@2"] == pytest.approx(d[0] / (d[0] + d[1]))
