"""Word vectors learned from the training texts themselves, for data with no pretrained vectors at hand.

Levy and Goldberg's count-based embedding (TACL 2015): the words' co-occurrence counts within a
window, positive pointwise mutual information with the context distribution smoothed (counts to the
power 0.75, as word2vec's negative sampling), a truncated SVD of that matrix, and the word vectors
U * sqrt(S). Seconds on a corpus of tens of thousands of texts (a sparse matrix and one truncated
SVD), deterministic for a seed; the network's embedding starts from them instead of noise.
"""
from __future__ import annotations

import numpy as np
import scipy.sparse as sp

from .text import PAD

#: tokens counted per pass when the co-occurrence pairs are gathered (bounds the pairs in memory)
PAIR_CHUNK_TOKENS = 1_000_000
#: the standard deviation of the vectors' components (the scale of the random vectors they replace)
VECTOR_STD = 0.1


def cooccurrence(token_ids: np.ndarray, offsets: np.ndarray, vocab_size: int, window: int) -> sp.csr_matrix:
    """Symmetric counts [V, V] of word pairs at most `window` tokens apart within a text (padding
    ignored), gathered a chunk of texts at a time."""
    ids = np.asarray(token_ids, dtype=np.int64)
    offsets = np.asarray(offsets, dtype=np.int64)
    total = sp.csr_matrix((vocab_size, vocab_size), dtype=np.float64)
    start = 0
    while start < len(offsets) - 1:
        stop = int(np.searchsorted(offsets, offsets[start] + PAIR_CHUNK_TOKENS, side="right")) - 1
        stop = max(stop, start + 1)
        lo, hi = int(offsets[start]), int(offsets[stop])
        tok = ids[lo:hi]
        doc = np.repeat(np.arange(stop - start), np.diff(offsets[start:stop + 1]))
        rows, cols = [], []
        for d in range(1, window + 1):
            same = (doc[d:] == doc[:-d]) & (tok[d:] != PAD) & (tok[:-d] != PAD)
            rows += [tok[:-d][same], tok[d:][same]]
            cols += [tok[d:][same], tok[:-d][same]]
        r, c = np.concatenate(rows), np.concatenate(cols)
        total = total + sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(vocab_size, vocab_size))
        start = stop
    total.sum_duplicates()
    return total


def ppmi(counts: sp.csr_matrix, smoothing: float = 0.75) -> sp.csr_matrix:
    """Positive PMI of a co-occurrence matrix, the context counts raised to `smoothing` first."""
    total = counts.sum()
    if total == 0:
        return sp.csr_matrix(counts.shape)
    words = np.asarray(counts.sum(1)).ravel()
    contexts = np.asarray(counts.sum(0)).ravel() ** smoothing
    contexts /= contexts.sum()
    c = counts.tocoo()
    pmi = np.log(c.data / total) - np.log(words[c.row] / total) - np.log(contexts[c.col])
    keep = pmi > 0
    return sp.csr_matrix((pmi[keep], (c.row[keep], c.col[keep])), shape=counts.shape)


def corpus_vectors(token_ids, offsets, vocab_size: int, dim: int, *, window: int = 4, smoothing: float = 0.75,
                   seed: int = 0) -> tuple:
    """(vectors float32 [vocab_size, dim], learned bool [vocab_size]) for the words of a tokenised corpus
    (CSR-style `token_ids` and `offsets`), scaled to VECTOR_STD a component; the padding row is zero.
    Words the corpus never puts beside another (learned False) get N(0, VECTOR_STD^2) vectors drawn
    with `seed`."""
    if dim < 1:
        raise ValueError(f"corpus vectors of dimension {dim}: expected at least 1")
    rng = np.random.default_rng(seed)
    M = ppmi(cooccurrence(token_ids, offsets, vocab_size, window), smoothing)
    k = min(dim, max(1, min(M.shape) - 1))
    out = np.zeros((vocab_size, dim), dtype=np.float64)
    if M.nnz:
        if k < min(M.shape) - 1 and M.shape[0] > 200:
            from scipy.sparse.linalg import svds

            U, S, _ = svds(M, k=k, v0=rng.standard_normal(min(M.shape)))
        else:
            U, S, _ = np.linalg.svd(M.toarray())
            U, S = U[:, :k], S[:k]
        out[:, :k] = U * np.sqrt(S)
    seen = np.asarray(M.getnnz(axis=1)).ravel() > 0 if M.nnz else np.zeros(vocab_size, dtype=bool)
    std = out[seen].std() if seen.any() else 0.0
    if std > 0:
        out[seen] *= VECTOR_STD / std
    unseen = ~seen
    out[unseen] = rng.normal(0.0, VECTOR_STD, size=(int(unseen.sum()), dim))
    out[PAD] = 0.0
    return out.astype(np.float32), seen


#: the values of --vectors (data.vectors) that ask for vectors learned from the training texts, and for none
CORPUS, NONE = "corpus", "none"


def wants_vectors(source) -> bool:
    """Whether a data.vectors setting asks for vectors: a file or "corpus", not None, "" or "none"."""
    return bool(source) and source != NONE


def word_vectors(source: str, data, dim: int, seed: int = 0) -> tuple:
    """The embedding matrix float32 [len(vocab), d] for `data`'s vocabulary, its coverage (the share of
    the vocabulary's words, padding and <unk> aside, that got a vector of the source, not a random
    one), and a line
    saying where it came from: "corpus" learns `dim`-dimensional vectors from `data`'s training
    split (corpus_vectors); any other value is a GloVe / word2vec text file (load_word_vectors, whose
    dimension wins over `dim`)."""
    from .vectors import load_word_vectors

    if source != CORPUS:
        matrix, coverage = load_word_vectors(source, data.vocab, seed=seed)
        return matrix, coverage, f"word vectors {source}"
    train = data.train
    matrix, learned = corpus_vectors(train.token_ids, train.offsets, len(data.vocab), dim, seed=seed)
    coverage = float(learned[2:].mean()) if len(data.vocab) > 2 else 0.0
    return matrix, coverage, f"word vectors learned from the {len(train):,} training texts (PPMI + SVD)"
