"""Label centroids: the lexical stage's candidate model above a label count (docs/design.md, "Extreme
label spaces"), in place of napkinXC's tree.

Each label's centroid is the sum of the TF-IDF rows of its training documents (PIFA, the label
features that AttentionXML and XR-Transformer cluster), cut to its `keep` heaviest features and
L2-normalised; a document's candidates are the labels whose centroids are nearest to its own row by
cosine, from one sparse product per chunk of documents. It fits in one pass over the labels and answers
in milliseconds a document at hundreds of thousands of labels, where the tree's node classifiers took
71 minutes to fit and its search of 1,000 labels 0.28 s a document (benchmarks/RESULTS.md). A label no
training document has never comes up. Scores are cosines in [0, 1], used as the stage's probabilities.
"""
from __future__ import annotations

import os
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import numpy as np
import scipy.sparse as sp

#: labels whose centroids are summed and cut at a time (bounds the fit's memory), documents scored at a time
LABEL_CHUNK = 50_000
DOC_CHUNK = 1_000


def top_per_row(A: sp.csr_matrix, m: int) -> sp.csr_matrix:
    """The `m` largest entries of each row of A (ties: the lower column), the rest dropped."""
    A = A.tocsr()
    n = A.shape[0]
    rows = np.repeat(np.arange(n, dtype=np.int64), np.diff(A.indptr))
    order = np.lexsort((A.indices, -A.data, rows))
    rank = np.arange(len(order)) - A.indptr[rows[order]]
    keep = np.sort(order[rank < m])
    return sp.csr_matrix((A.data[keep], A.indices[keep], np.concatenate([[0], np.cumsum(
        np.bincount(rows[keep], minlength=n))])), shape=A.shape)


def row_topk(S: sp.csr_matrix, k: int) -> tuple:
    """(columns int64 [n, k], values float32 [n, k]) of each row's k largest entries, best first (those
    kept and tied: the lower column first), padded with -1 and 0."""
    n = S.shape[0]
    ids = np.full((n, k), -1, dtype=np.int64)
    vals = np.zeros((n, k), dtype=np.float32)
    for r in range(n):
        a, b = S.indptr[r], S.indptr[r + 1]
        if a == b:
            continue
        d, c = S.data[a:b], S.indices[a:b]
        if b - a > k:
            part = np.argpartition(-d, k - 1)[:k]
            d, c = d[part], c[part]
        order = np.lexsort((c, -d))
        ids[r, : len(order)] = c[order]
        vals[r, : len(order)] = d[order]
    return ids, vals


class LabelCentroids:
    """fit(X, Y) and topk(X, k) over a folder holding centroids.npz, as `LabelTree`."""

    FILE = "centroids.npz"

    def __init__(self, folder: str, keep: int = 32, threads: int = 0):
        if keep < 1:
            raise ValueError(f"label centroids keep {keep} features: expected at least 1")
        self.folder, self.keep, self.threads = folder, int(keep), threads
        self._ct: Optional[sp.csr_matrix] = None         # [features, labels] float32: the centroids, by feature

    def fit(self, X: sp.csr_matrix, Y: sp.csr_matrix) -> "LabelCentroids":
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"{X.shape[0]} feature rows for {Y.shape[0]} label rows")
        X = sp.csr_matrix(X, dtype=np.float32)
        YT = sp.csr_matrix(Y, dtype=np.float32).T.tocsr()
        parts = []
        for a in range(0, YT.shape[0], LABEL_CHUNK):
            C = top_per_row((YT[a:a + LABEL_CHUNK] @ X).tocsr(), self.keep)
            norm = np.sqrt(np.bincount(np.repeat(np.arange(C.shape[0]), np.diff(C.indptr)), weights=C.data.astype(
                np.float64) ** 2, minlength=C.shape[0]))
            C.data /= np.repeat(np.where(norm > 0, norm, 1.0), np.diff(C.indptr)).astype(np.float32)
            parts.append(C)
        C = sp.vstack(parts, format="csr") if parts else sp.csr_matrix((0, X.shape[1]), dtype=np.float32)
        self._ct = C.T.tocsr()
        self._ct.sort_indices()
        os.makedirs(self.folder, exist_ok=True)
        sp.save_npz(os.path.join(self.folder, self.FILE), self._ct, compressed=False)
        return self

    def load(self) -> "LabelCentroids":
        path = os.path.join(self.folder, self.FILE)
        if not os.path.isfile(path):
            raise ValueError(f"{path}: missing — the label centroids were never fitted")
        self._ct = sp.load_npz(path).tocsr()
        return self

    def topk(self, X: sp.csr_matrix, k: int) -> tuple:
        """(label ids int64 [n, k], cosines float32 [n, k]), best first; -1 and 0 pad a row with fewer
        than k labels of any feature in common."""
        if self._ct is None:
            self.load()
        X = sp.csr_matrix(X, dtype=np.float32)
        n = X.shape[0]
        if X.shape[1] != self._ct.shape[0]:
            raise ValueError(f"{X.shape[1]} features for label centroids over {self._ct.shape[0]}")
        ids = np.full((n, k), -1, dtype=np.int64)
        probs = np.zeros((n, k), dtype=np.float32)
        if n == 0 or k == 0:
            return ids, probs

        def chunk(s: int) -> None:
            ids[s:s + DOC_CHUNK], probs[s:s + DOC_CHUNK] = row_topk((X[s:s + DOC_CHUNK] @ self._ct).tocsr(), k)

        starts = range(0, n, DOC_CHUNK)
        workers = self.threads or os.cpu_count() or 1
        if workers > 1 and len(starts) > 1:
            with ThreadPoolExecutor(min(workers, len(starts))) as pool:
                list(pool.map(chunk, starts))
        else:
            for s in starts:
                chunk(s)
        return ids, probs
