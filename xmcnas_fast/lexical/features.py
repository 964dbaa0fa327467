"""TF-IDF unigram + bigram features of tokenized texts, as a float64 CSR matrix (what napkinXC's PLT
takes: given float32 it trains tens of times slower).

A feature is a word id or a pair of consecutive word ids of the stage's own vocabulary. `fit` keeps
the n-grams seen in at least `min_df` training documents (the `max_features` most frequent, when
set); the weights are sublinear tf (1 + log count) times sklearn's smooth idf, each row L2-normalised.
Everything runs on whole arrays: no loop over documents.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp


@dataclass
class FeatureSettings:
    min_df: int = 2
    max_features: Optional[int] = None
    bigrams: bool = True
    sublinear_tf: bool = True


def ngram_keys(token_ids: np.ndarray, offsets: np.ndarray, vocab_size: int, bigrams: bool = True):
    """(row, key) of every n-gram occurrence: a unigram's key is its word id, a bigram's
    vocab_size + a * vocab_size + b (words a then b, in the same document)."""
    tok = np.asarray(token_ids, dtype=np.int64)
    off = np.asarray(offsets, dtype=np.int64)
    rows = np.repeat(np.arange(len(off) - 1, dtype=np.int64), np.diff(off))
    if not bigrams or len(tok) < 2:
        return rows, tok
    same = rows[1:] == rows[:-1]
    pair = vocab_size + tok[:-1][same] * vocab_size + tok[1:][same]
    return np.concatenate([rows, rows[1:][same]]), np.concatenate([tok, pair])


class NgramTfidf:
    """fit(tokens) on the training split, then transform(tokens) of any split or text."""

    FILES = ("features.keys.npy", "features.idf.npy", "features.json")

    def __init__(self, vocab_size: int, settings: Optional[FeatureSettings] = None):
        self.vocab_size = int(vocab_size)
        self.settings = settings or FeatureSettings()
        self.keys = np.zeros(0, dtype=np.int64)     # sorted n-gram keys: the feature ids are their positions
        self.idf = np.zeros(0, dtype=np.float64)

    @property
    def num_features(self) -> int:
        return len(self.keys)

    def fit(self, token_ids: np.ndarray, offsets: np.ndarray) -> "NgramTfidf":
        s, V = self.settings, self.vocab_size
        rows, keys = ngram_keys(token_ids, offsets, V, s.bigrams)
        n_docs = len(offsets) - 1
        span = V + V * V
        once = np.unique(rows * span + keys) % span           # each n-gram once per document
        k, df = np.unique(once, return_counts=True)
        keep = (df >= s.min_df) & ((k >= V) | (k >= 2))       # never <pad> (0) or <unk> (1) alone
        k, df = k[keep], df[keep]
        if s.max_features and len(k) > s.max_features:
            top = np.sort(np.argsort(-df, kind="stable")[: s.max_features])
            k, df = k[top], df[top]
        self.keys = k
        self.idf = np.log((1.0 + n_docs) / (1.0 + df)) + 1.0
        return self

    def transform(self, token_ids: np.ndarray, offsets: np.ndarray) -> sp.csr_matrix:
        n = len(offsets) - 1
        rows, keys = ngram_keys(token_ids, offsets, self.vocab_size, self.settings.bigrams)
        if not len(self.keys):
            return sp.csr_matrix((n, 0), dtype=np.float64)
        pos = np.searchsorted(self.keys, keys).clip(max=len(self.keys) - 1)
        hit = self.keys[pos] == keys
        m = sp.csr_matrix((np.ones(int(hit.sum())), (rows[hit], pos[hit])), shape=(n, len(self.keys)))
        m.sum_duplicates()
        if self.settings.sublinear_tf:
            np.log(m.data, out=m.data)
            m.data += 1.0
        m.data *= self.idf[m.indices]
        per_row = np.diff(m.indptr)
        norm = np.sqrt(np.bincount(np.repeat(np.arange(n), per_row), weights=m.data ** 2, minlength=n))
        m.data /= np.repeat(norm, per_row)
        m.sort_indices()
        return m

    def save(self, folder: str) -> None:
        np.save(os.path.join(folder, "features.keys.npy"), self.keys)
        np.save(os.path.join(folder, "features.idf.npy"), self.idf)
        with open(os.path.join(folder, "features.json"), "w", encoding="utf-8") as f:
            json.dump({"vocab_size": self.vocab_size, **asdict(self.settings)}, f)

    @classmethod
    def load(cls, folder: str) -> "NgramTfidf":
        with open(os.path.join(folder, "features.json"), encoding="utf-8") as f:
            meta = json.load(f)
        out = cls(meta.pop("vocab_size"), FeatureSettings(**meta))
        out.keys = np.load(os.path.join(folder, "features.keys.npy"), allow_pickle=False)
        out.idf = np.load(os.path.join(folder, "features.idf.npy"), allow_pickle=False)
        return out
