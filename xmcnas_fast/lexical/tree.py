"""The linear models of the lexical stage, on napkinXC: its probabilistic label tree (PLT) and, where
the labels are few enough, its one-vs-rest model (binary relevance, "br").

The tree: a balanced hierarchical k-means tree over the labels, a linear classifier at each node
(liblinear, squared hinge loss, C = 1: the setting of omikuji's Parabel, which measured 0.7 P@1 above
napkinXC's own defaults on debtags), pruned weights. One-vs-rest: one such classifier per label (as
DiSMEC), its cost in proportion to the labels. napkinXC keeps a model in its own files in a folder;
nothing is pickled.
"""
from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import scipy.sparse as sp


#: (document, label) pairs asked of napkinXC at a time by `LabelTree.topk`
TOPK_CHUNK = 2_000_000


@dataclass
class TreeSettings:
    arity: int = 2
    max_leaves: int = 100
    loss: str = "l2"             # napkinXC's "l2": squared hinge; "log": logistic
    c: float = 1.0               # liblinear's inverse regularisation strength
    ensemble: int = 1            # trees; their probabilities are averaged
    weights_threshold: float = 0.1
    seed: int = 0


ENGINES = ("plt", "br")


def _napkinxc(engine: str = "plt"):
    try:
        from napkinxc.models import BR, PLT
    except ImportError as e:          # pragma: no cover - napkinxc is a dependency
        raise RuntimeError(f"the lexical stage needs napkinXC (pip install napkinxc): {e}") from None
    return {"plt": PLT, "br": BR}[engine]


def label_lists(Y: sp.csr_matrix) -> list:
    """Each row's label ids, sorted (napkinXC crashes on unsorted ids)."""
    Y = Y.tocsr()
    Y.sort_indices()
    return [Y.indices[a:b].tolist() for a, b in zip(Y.indptr[:-1], Y.indptr[1:])]


class LabelTree:
    """fit(X, Y) and topk(X, k) over a folder that holds napkinXC's files; `engine` "br": the same
    node classifier for every label, one-vs-rest, instead of the tree (arity, max_leaves and ensemble
    unused). With `structure` (another tree's tree.txt), fit keeps that tree's label hierarchy and
    trains only its classifiers: the hierarchical k-means over the labels is most of a tree's fitting
    time at hundreds of thousands of labels."""

    def __init__(self, folder: str, settings: Optional[TreeSettings] = None, threads: int = 0, engine: str = "plt",
                 structure: Optional[str] = None):
        if engine not in ENGINES:
            raise ValueError(f"lexical engine {engine!r}: expected one of {', '.join(ENGINES)}")
        self.folder, self.settings, self.threads, self.engine = folder, settings or TreeSettings(), threads, engine
        self.structure = structure
        self._plt = None

    def _model(self):
        s = self.settings
        common = dict(loss=s.loss, liblinear_c=s.c, weights_threshold=s.weights_threshold, seed=s.seed,
                      threads=self.threads, verbose=0)
        if self.engine == "br":
            return _napkinxc("br")(self.folder, **common)
        extra = {"tree_structure": self.structure} if self.structure else {}
        return _napkinxc()(self.folder, arity=s.arity, max_leaves=s.max_leaves, ensemble=s.ensemble, **common, **extra)

    def fit(self, X: sp.csr_matrix, Y: sp.csr_matrix) -> "LabelTree":
        if X.shape[0] != Y.shape[0]:
            raise ValueError(f"{X.shape[0]} feature rows for {Y.shape[0]} label rows")
        os.makedirs(self.folder, exist_ok=True)
        self._plt = self._model()
        self._plt.fit(_float64_csr(X), label_lists(Y))
        return self

    def load(self) -> "LabelTree":
        self._plt = self._model()
        self._plt.load()
        return self

    def topk(self, X: sp.csr_matrix, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(label ids int64 [n, k], probabilities float32 [n, k]), best first; -1 and 0 pad a row
        with fewer than k labels."""
        if self._plt is None:
            self.load()
        n = X.shape[0]
        ids = np.full((n, k), -1, dtype=np.int64)
        probs = np.zeros((n, k), dtype=np.float32)
        if n == 0 or k == 0:
            return ids, probs
        X = _float64_csr(X)
        step = max(1, TOPK_CHUNK // k)       # napkinXC answers in Python tuples: a few million at a time
        for s in range(0, n, step):
            for i, row in enumerate(self._plt.predict_proba(X[s:s + step], top_k=k), start=s):
                if row:
                    lab, p = zip(*row)
                    ids[i, : len(lab)] = lab
                    probs[i, : len(p)] = p
        return ids, probs

    def settings_dict(self) -> dict:
        return asdict(self.settings)


def average_lists(a: tuple, b: tuple, k: int) -> tuple:
    """The top k of two models' top lists (ids, probs) averaged label by label, a label missing from one
    list counting 0 there; padded with -1 and 0 as `LabelTree.topk`."""
    ids_a, ids_b = np.asarray(a[0]), np.asarray(b[0])
    n = ids_a.shape[0]
    ids = np.concatenate([ids_a, ids_b], axis=1)
    probs = 0.5 * np.concatenate([a[1], b[1]], axis=1).astype(np.float64)
    probs[ids < 0] = 0.0
    out_ids = np.full((n, k), -1, dtype=np.int64)
    out_probs = np.zeros((n, k), dtype=np.float32)
    for i in range(n):
        keep = ids[i] >= 0
        lab, inv = np.unique(ids[i][keep], return_inverse=True)
        p = np.bincount(inv, weights=probs[i][keep], minlength=len(lab))
        order = np.argsort(-p, kind="stable")[:k]
        out_ids[i, : len(order)] = lab[order]
        out_probs[i, : len(order)] = p[order]
    return out_ids, out_probs


def _float64_csr(X) -> sp.csr_matrix:
    X = sp.csr_matrix(X, dtype=np.float64)
    X.sort_indices()
    return X
