"""Word vectors from the training texts (PPMI + truncated SVD): counts, PMI, and the vectors of the
bundled debtags texts."""
import numpy as np
import pytest
import scipy.sparse as sp

from xmcnas_fast.data import corpus_vectors as cv


def corpus(*docs):
    offsets = np.cumsum([0] + [len(d) for d in docs])
    return np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]), offsets


def test_cooccurrence_counts_pairs_within_the_window_and_the_text():
    ids, off = corpus([2, 3, 4], [4, 2, 0, 3])           # 0 is padding: never counted
    c1 = cv.cooccurrence(ids, off, 5, window=1).toarray()
    expect = np.zeros((5, 5))
    for a, b in [(2, 3), (3, 4), (4, 2)]:               # neighbours; (4, 4) across the texts is not one
        expect[a, b] += 1
        expect[b, a] += 1
    np.testing.assert_array_equal(c1, expect)
    c2 = cv.cooccurrence(ids, off, 5, window=2).toarray()
    expect[2, 4] += 1
    expect[4, 2] += 1                                    # 2 _ 4 in the first text
    expect[2, 3] += 1
    expect[3, 2] += 1                                    # 2 (pad) 3 in the second
    np.testing.assert_array_equal(c2, expect)


def test_cooccurrence_is_the_same_a_chunk_at_a_time(monkeypatch):
    rng = np.random.default_rng(0)
    docs = [rng.integers(1, 30, size=rng.integers(1, 12)) for _ in range(60)]
    ids, off = corpus(*docs)
    whole = cv.cooccurrence(ids, off, 30, window=3)
    monkeypatch.setattr(cv, "PAIR_CHUNK_TOKENS", 7)
    assert (cv.cooccurrence(ids, off, 30, window=3) != whole).nnz == 0


def test_ppmi_against_its_definition():
    counts = sp.csr_matrix(np.array([[0, 4, 1], [4, 0, 2], [1, 2, 6]], dtype=np.float64))
    got = cv.ppmi(counts, smoothing=0.75).toarray()
    c = counts.toarray()
    ctx = c.sum(0) ** 0.75
    with np.errstate(divide="ignore"):                 # log 0 where a pair is never seen: no PMI there
        pmi = np.log((c / c.sum()) / np.outer(c.sum(1) / c.sum(), ctx / ctx.sum()))
    np.testing.assert_allclose(got, np.where(c > 0, np.maximum(pmi, 0), 0))
    assert cv.ppmi(sp.csr_matrix((3, 3))).nnz == 0


def test_words_in_the_same_contexts_get_near_vectors():
    rng = np.random.default_rng(1)
    # 2 and 3 are seen among 6, 7; 4 and 5 among 8, 9: two meanings
    docs = [[rng.choice([6, 7]), w, rng.choice([6, 7])] for w in rng.choice([2, 3], 200)] + \
           [[rng.choice([8, 9]), w, rng.choice([8, 9])] for w in rng.choice([4, 5], 200)]
    v, learned = cv.corpus_vectors(*corpus(*docs), 12, 4, window=1)
    cos = lambda a, b: v[a] @ v[b] / np.linalg.norm(v[a]) / np.linalg.norm(v[b])  # noqa: E731
    assert cos(2, 3) > 0.9 and cos(4, 5) > 0.9 and abs(cos(2, 4)) < 0.3
    assert v.shape == (12, 4) and v.dtype == np.float32
    np.testing.assert_array_equal(v[0], 0)
    assert 0 < np.abs(v[10]).max() < 1                    # never in the corpus: a small random vector
    assert learned.tolist() == [False, False] + [True] * 8 + [False, False]


@pytest.fixture(scope="module")
def debtags_train():
    from xmcnas_fast.data import load

    data = load("debtags")
    return data, data.train


def test_the_vectors_of_debtags_are_seeded_scaled_and_follow_the_texts(debtags_train):
    data, train = debtags_train
    V = len(data.vocab.itos)
    v, _ = cv.corpus_vectors(train.token_ids, train.offsets, V, 32, seed=3)
    np.testing.assert_array_equal(v, cv.corpus_vectors(train.token_ids, train.offsets, V, 32, seed=3)[0])
    assert v.shape == (V, 32) and v.std() == pytest.approx(cv.VECTOR_STD, rel=0.1)
    # the strongest pairs of the corpus (highest PPMI among words seen 50 times or more) lie closer than
    # random pairs of such words
    counts = cv.cooccurrence(train.token_ids, train.offsets, V, window=4)
    common = np.flatnonzero(np.asarray(counts.sum(1)).ravel() >= 50)
    m = cv.ppmi(counts)[common][:, common].tocoo()
    top = np.argsort(-m.data)[:500]
    n = v / np.maximum(np.linalg.norm(v, axis=1, keepdims=True), 1e-12)
    strong = np.mean(np.sum(n[common[m.row[top]]] * n[common[m.col[top]]], axis=1))
    rng = np.random.default_rng(0)
    a, b = rng.choice(common, 2000), rng.choice(common, 2000)
    random_pairs = np.mean(np.sum(n[a] * n[b], axis=1))
    assert strong > random_pairs + 0.3
