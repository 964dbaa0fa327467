"""The lexical stage: its own vocabulary (texts are never cut for it), TF-IDF n-gram features and a
label tree, with, where the labels are few enough, a one-vs-rest linear model averaged with it;
trained once per dataset and settings and cached, with its top lists for the validation and test
splits.

A stage folder holds vocab.json, the feature tables, napkinXC's files under tree/ (and ovr/), the top lists of
the splits (`<split>.ids.npy`, `<split>.probs.npy`), with a shortlist size the shortlists of every
split (`<split>.shortlist.npy`, the training split's cross-fitted) and lexical.json last, which lists every other
file with its size and SHA-256: a folder whose files do not match is refused, naming the file,
before napkinXC reads anything. Folders are written to a temporary sibling and renamed into place.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from ..data.sources import file_digest
from .centroids import LabelCentroids
from .features import FeatureSettings, NgramTfidf
from .tree import LabelTree, TreeSettings, average_lists

STAGE_FORMAT = 1
SPLITS = ("valid", "test")
OVR_CHOICES = ("auto", "on", "off")
#: "auto" adds the one-vs-rest model up to this many labels (its cost grows with them: 17 s on debtags's
#: 566 labels and 2 threads, against 20 s for the tree; at 4,190 labels and 68K texts, about 6 minutes)
OVR_MAX_LABELS = 1000
MATCHER_CHOICES = ("auto", "tree", "centroids")
#: "auto" takes label centroids instead of the tree above this many labels, and the training split's
#: shortlists from the stage's own model instead of per-fold refits: at 646K labels the tree took 71
#: minutes to fit on 2 cores and 0.28 s a document to list 1,000 labels (benchmarks/RESULTS.md)
LARGE_LABELS = 100_000


@dataclass
class LexicalSettings:
    features: FeatureSettings = field(default_factory=FeatureSettings)
    tree: TreeSettings = field(default_factory=TreeSettings)
    top_k: int = 50                 # labels a document kept from the tree for fusion
    crossfit: int = 0               # folds of the training split's own top lists (0: none; a residual
                                    # network needs them: each from a tree that never saw the document)
    ovr: str = "auto"               # a one-vs-rest model averaged with the tree: "on", "off", or "auto":
                                    # on with at most OVR_MAX_LABELS labels
    shortlist: int = 0              # K: candidate labels a document kept for a shortlisted head, of every
                                    # split (the training split's cross-fitted, over 2 folds at least, up
                                    # to LARGE_LABELS labels; above, from the stage's own model); 0: none
    matcher: str = "auto"           # the candidate model: "tree" (napkinXC's PLT), "centroids" (label
                                    # centroids, lexical/centroids.py) or "auto": centroids above LARGE_LABELS
    centroid_features: int = 32     # features kept a label centroid

    def __post_init__(self):
        if self.ovr not in OVR_CHOICES:
            raise ValueError(f"lexical one-vs-rest {self.ovr!r}: expected one of {', '.join(OVR_CHOICES)}")
        if self.matcher not in MATCHER_CHOICES:
            raise ValueError(f"lexical matcher {self.matcher!r}: expected one of {', '.join(MATCHER_CHOICES)}")

    def matcher_for(self, num_labels: int) -> str:
        """"tree" or "centroids": the candidate model of a stage over `num_labels` labels."""
        if self.matcher != "auto":
            return self.matcher
        return "centroids" if num_labels > LARGE_LABELS else "tree"

    def train_folds(self, num_labels: int) -> int:
        """Folds of the training split's cross-fitted lists over `num_labels` labels: those asked for
        (crossfit), and 2 at least for a shortlist up to LARGE_LABELS labels; 0: the training split's
        lists (if a shortlist wants them) come from the stage's own model, which saw those documents."""
        if self.shortlist and num_labels <= LARGE_LABELS:
            return max(self.crossfit, 2)
        return self.crossfit

    def uses_ovr(self, num_labels: int) -> bool:
        return self.ovr == "on" or (self.ovr == "auto" and num_labels <= OVR_MAX_LABELS)

    @property
    def list_k(self) -> int:
        """Labels asked of the tree per document: the top lists are the first top_k of the shortlist."""
        return max(self.top_k, self.shortlist)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "LexicalSettings":
        d = d or {}
        return cls(features=FeatureSettings(**d.get("features", {})), tree=TreeSettings(**d.get("tree", {})),
                   top_k=int(d.get("top_k", 50)), crossfit=int(d.get("crossfit", 0)), ovr=d.get("ovr", "off"),
                   shortlist=int(d.get("shortlist", 0)), matcher=d.get("matcher", "tree"),
                   centroid_features=int(d.get("centroid_features", 32)))


class LexicalStage:
    """A fitted stage: vocab + features + tree (+ one-vs-rest model). `topk(texts)` for raw texts,
    `topk_tokens` for token ids."""

    def __init__(self, folder: str, vocab, features: NgramTfidf, tree: LabelTree, settings: LexicalSettings,
                 num_labels: int, ovr: Optional[LabelTree] = None):
        self.folder, self.vocab, self.features, self.tree, self.ovr = folder, vocab, features, tree, ovr
        self.settings, self.num_labels = settings, num_labels

    def topk_tokens(self, token_ids, offsets, k: Optional[int] = None):
        X = self.features.transform(token_ids, offsets)
        return models_topk(self.tree, self.ovr, X, k or self.settings.top_k, depth=self.settings.list_k)

    def topk(self, texts: Sequence[str], k: Optional[int] = None):
        from ..data import tokenize

        ids = [self.vocab.encode(tokenize(t)) for t in texts]
        offsets = np.zeros(len(ids) + 1, dtype=np.int64)
        np.cumsum([len(a) for a in ids], out=offsets[1:])
        flat = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
        return self.topk_tokens(flat, offsets, k)

    def split_topk(self, split: str):
        """The cached top lists (ids, probs) of the validation or test split of the data it was fit on."""
        return tuple(np.load(os.path.join(self.folder, f"{split}.{a}.npy"), allow_pickle=False)
                     for a in ("ids", "probs"))

    def split_shortlist(self, split: str) -> np.ndarray:
        """The cached shortlist (label ids int32 [n, K], best first, -1 padding; mapped from disk) of a
        split of the data it was fit on; ValueError when the stage keeps none."""
        if not self.settings.shortlist:
            raise ValueError(f"{self.folder}: the lexical stage keeps no shortlist (fitted with shortlist 0)")
        return np.load(os.path.join(self.folder, f"{split}.shortlist.npy"), mmap_mode="r", allow_pickle=False)

    @classmethod
    def load(cls, folder: str, threads: int = 0) -> "LexicalStage":
        """Load a stage folder; ValueError naming the file when a part is missing or corrupt."""
        from ..data import Vocab

        meta = verify(folder)
        settings = LexicalSettings.from_dict(meta["settings"])
        tree = candidate_model(folder, settings, meta["num_labels"], threads)
        ovr = LabelTree(os.path.join(folder, "ovr"), settings.tree, threads=threads, engine="br") \
            if settings.uses_ovr(meta["num_labels"]) else None
        return cls(folder, Vocab.load(os.path.join(folder, "vocab.json")), NgramTfidf.load(folder), tree,
                   settings, meta["num_labels"], ovr)


def candidate_model(folder: str, settings: LexicalSettings, num_labels: int, threads: int = 0):
    """The stage's candidate model in `folder` (unfitted): napkinXC's tree under tree/, or label centroids
    under centroids/, as settings.matcher_for(num_labels) says."""
    if settings.matcher_for(num_labels) == "centroids":
        return LabelCentroids(os.path.join(folder, "centroids"), settings.centroid_features, threads=threads)
    return LabelTree(os.path.join(folder, "tree"), settings.tree, threads=threads)


def models_topk(tree: LabelTree, ovr: Optional[LabelTree], X, k: int, depth: int = 0) -> tuple:
    """The top k labels of the tree, or of the tree and the one-vs-rest model averaged. The average is
    taken over each model's top max(k, depth) labels (a label missing from one list counts 0 there), so
    with the stage's list depth every k gives the head of the same ranking, probabilities included."""
    if ovr is None:
        return tree.topk(X, k)
    d = max(k, depth)
    return average_lists(tree.topk(X, d), ovr.topk(X, d), k)


def verify(folder: str) -> dict:
    """lexical.json of a stage folder, once every file it lists has its recorded size and SHA-256."""
    meta_path = os.path.join(folder, "lexical.json")
    try:
        with open(meta_path, encoding="utf-8") as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"{meta_path}: missing — the lexical part is incomplete") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_path}:{e.lineno}: invalid JSON ({e.msg})") from None
    if not isinstance(meta, dict) or meta.get("format") != STAGE_FORMAT or not isinstance(meta.get("files"), dict):
        raise ValueError(f"{meta_path}: not a lexical stage of format {STAGE_FORMAT}")
    for name, (size, digest) in meta["files"].items():
        p = os.path.join(folder, name)
        if not os.path.isfile(p):
            raise ValueError(f"{p}: missing — the lexical part is incomplete")
        if os.path.getsize(p) != size or file_digest(p) != digest:
            raise ValueError(f"{p}: corrupt (its size or SHA-256 differs from {meta_path})")
    return meta


def _manifest(folder: str) -> dict:
    files = {}
    for root, _, names in os.walk(folder):
        for n in sorted(names):
            p = os.path.join(root, n)
            rel = os.path.relpath(p, folder)
            if rel != "lexical.json":
                files[rel] = [os.path.getsize(p), file_digest(p)]
    return files


def fit_stage(data, folder: str, settings: Optional[LexicalSettings] = None, *, threads: int = 0,
              splits: Sequence[str] = SPLITS, log=None) -> LexicalStage:
    """Fit a stage on `data` (an XMCData, texts not cut: max_len None) into `folder`, atomically, with the
    top lists of `splits`. `log(str)` hears what it does and how long each part took."""
    settings = settings or LexicalSettings()
    settings = replace(settings, matcher=settings.matcher_for(data.num_labels))   # saved as resolved
    say = log or (lambda s: None)
    folder = os.path.abspath(folder)
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".tmp-lexical-", dir=os.path.dirname(folder))
    try:
        t0 = time.monotonic()
        feats = NgramTfidf(len(data.vocab), settings.features).fit(data.train.token_ids, data.train.offsets)
        X = feats.transform(data.train.token_ids, data.train.offsets)
        say(f"lexical features: {feats.num_features:,} uni+bigrams ({time.monotonic() - t0:.0f} s)")
        t0 = time.monotonic()
        tree = candidate_model(tmp, settings, data.num_labels, threads).fit(X, data.train.labels)
        say(f"{'label tree' if isinstance(tree, LabelTree) else 'label centroids'}: {data.num_labels:,} labels, "
            f"{X.shape[0]:,} documents ({time.monotonic() - t0:.0f} s)")
        ovr = None
        if settings.uses_ovr(data.num_labels):
            t0 = time.monotonic()
            ovr = LabelTree(os.path.join(tmp, "ovr"), settings.tree, threads=threads, engine="br").fit(X, data.train.labels)
            say(f"one-vs-rest linear model: {data.num_labels:,} labels ({time.monotonic() - t0:.0f} s)")
        data.vocab.save(os.path.join(tmp, "vocab.json"))
        feats.save(tmp)
        stage = LexicalStage(tmp, data.vocab, feats, tree, settings, data.num_labels, ovr)
        t0 = time.monotonic()
        lists = {split: stage.topk_tokens(getattr(data, split).token_ids, getattr(data, split).offsets,
                                          settings.list_k) for split in splits}
        if settings.shortlist:
            say(f"shortlists of {settings.shortlist} labels: {', '.join(splits)} ({time.monotonic() - t0:.0f} s)")
        folds = settings.train_folds(data.num_labels)
        if folds:
            t0 = time.monotonic()
            lists["train"] = crossfit_lists(X, data.train.labels, settings, tmp, threads, folds)
            say(f"cross-fitted top lists of the training split: {folds} folds ({time.monotonic() - t0:.0f} s)")
        elif settings.shortlist:
            t0 = time.monotonic()
            lists["train"] = models_topk(tree, ovr, X, settings.list_k)
            say(f"shortlists of the training split from the stage's own model ({time.monotonic() - t0:.0f} s)")
        for split, (ids, probs) in lists.items():
            np.save(os.path.join(tmp, f"{split}.ids.npy"), ids[:, : settings.top_k])
            np.save(os.path.join(tmp, f"{split}.probs.npy"), probs[:, : settings.top_k])
            if settings.shortlist:
                np.save(os.path.join(tmp, f"{split}.shortlist.npy"), ids[:, : settings.shortlist].astype(np.int32))
        del lists
        for model in (tree, ovr):                             # napkinXC reads its files again from the final folder
            if isinstance(model, LabelTree):
                model._plt = None
        meta = {"format": STAGE_FORMAT, "settings": settings.to_dict(), "num_labels": data.num_labels,
                "label_names": list(data.label_names), "splits": {s: len(getattr(data, s)) for s in splits},
                "files": _manifest(tmp)}
        with open(os.path.join(tmp, "lexical.json"), "w", encoding="utf-8") as f:
            json.dump(meta, f)
            f.flush()
            os.fsync(f.fileno())
        _install(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return LexicalStage.load(folder, threads=threads)


def crossfit_lists(X, Y, settings: LexicalSettings, tmp: str, threads: int, folds: int) -> tuple:
    """Top lists (of the shortlist's length, when longer) of the training documents, each from a tree
    fitted on the other folds (a document's fold is its position modulo the number of folds), over the
    label hierarchy of the stage's own tree (fitted first, in `tmp`/tree: the folds train only their
    classifiers). An ensemble's folds cluster their labels anew (each tree of it has its own); label
    centroids are fitted again on the other folds."""
    n, k = X.shape[0], settings.list_k
    ids, probs = np.full((n, k), -1, dtype=np.int64), np.zeros((n, k), dtype=np.float32)
    fold = np.arange(n) % folds
    for f in range(folds):
        inside, rest = np.flatnonzero(fold == f), np.flatnonzero(fold != f)
        folder = os.path.join(tmp, f".fold-{f}")
        structure = os.path.join(tmp, "tree", "tree.txt")
        if settings.matcher_for(Y.shape[1]) == "centroids":
            tree = candidate_model(folder, settings, Y.shape[1], threads)
        else:
            tree = LabelTree(os.path.join(folder, "tree"), settings.tree, threads=threads,
                             structure=structure if settings.tree.ensemble == 1 and os.path.isfile(structure) else None)
        tree.fit(X[rest], Y[rest])
        ovr = LabelTree(os.path.join(folder, "ovr"), settings.tree, threads=threads, engine="br").fit(X[rest], Y[rest]) \
            if settings.uses_ovr(Y.shape[1]) else None
        ids[inside], probs[inside] = models_topk(tree, ovr, X[inside], k)
        shutil.rmtree(folder)
    return ids, probs


def _install(tmp: str, folder: str) -> None:
    if os.path.exists(folder):
        aside = f"{folder}.old-{os.getpid()}"
        os.replace(folder, aside)
        os.replace(tmp, folder)
        shutil.rmtree(aside, ignore_errors=True)
    else:
        os.replace(tmp, folder)


def _reload(data, **changes):
    """`data`'s source loaded again with its settings but `changes` (its own cache entry)."""
    from ..data import load

    settings = dict(data.source.get("settings") or {})
    kw = {k: settings[k] for k in ("min_count", "max_vocab", "valid", "seed", "strict", "text_column",
                                   "labels_column") if k in settings}
    return load(data.source["location"], **{**kw, **changes})


def _check_lined_up(data, other, splits, why: str) -> None:
    if list(other.label_names) != list(data.label_names):
        raise RuntimeError(f"{why} of {data.name} has another label space")
    for split in splits:
        a, b = getattr(data, split).labels, getattr(other, split).labels
        if a.shape != b.shape or (a != b).nnz:
            raise RuntimeError(f"{why} of {data.name} does not line up with its {split} split")


def stage_data(data):
    """The data the stage fits on: `data` itself when its texts are not cut, else the same source and split
    loaded again with max_len None (its own cache entry); the rows are the same documents."""
    if data.max_len is None:
        return data
    full = _reload(data, max_len=None)
    _check_lined_up(data, full, ("train", "valid", "test"), "the uncut texts")
    return full


def serving_data(data):
    """The data the serving stage fits on: the same source, texts uncut, with no validation split, so
    that every training document (the validation ones too) trains it; its label space and test
    documents are `data`'s."""
    full = _reload(data, max_len=None, valid=0)
    _check_lined_up(data, full, ("test",), "the whole training file")
    if len(full.train) != len(data.train) + len(data.valid):
        raise RuntimeError(f"the whole training file of {data.name} has {len(full.train)} documents, "
                           f"its splits {len(data.train)} + {len(data.valid)}")
    return full


def _key_settings(settings: LexicalSettings, num_labels: int) -> dict:
    """The stage's settings as its cache key takes them: without a shortlist, a matcher or centroid settings
    where they change nothing of a stage fitted before there were any (no shortlist; the tree), so that
    those keep their keys; with the matcher that "auto" resolves to, and "train_lists" "own" where the
    training split's shortlists come from the stage's own model."""
    d = settings.to_dict()
    if not d["shortlist"]:
        del d["shortlist"]
    d["matcher"] = settings.matcher_for(num_labels)
    if d["matcher"] == "tree":
        del d["matcher"], d["centroid_features"]
    if settings.shortlist and not settings.train_folds(num_labels):
        d["train_lists"] = "own"
    return d


def cache_key(data, settings: LexicalSettings) -> str:
    src = data.source
    payload = {"files": [f["sha256"] for f in src.get("files", [])],
               "data": {k: v for k, v in (src.get("settings") or {}).items() if k != "max_len"},
               "lexical": _key_settings(settings, data.num_labels), "format": STAGE_FORMAT}

    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def cached_stage(data, settings: Optional[LexicalSettings] = None, *, cache_dir=None, threads: int = 0,
                 log=None, serving: bool = False) -> LexicalStage:
    """The stage of `data` and `settings` from the cache (keyed by the data's source files and settings
    and the stage's settings), fitted and stored there first when missing or broken. With `serving`, the
    serving stage instead: fitted on every training document (`serving_data`), with the test split's
    lists alone (no validation split, no training lists: nothing is chosen with it)."""
    from ..data import default_cache_dir

    settings = settings or LexicalSettings()
    if serving:
        if settings.crossfit or settings.shortlist:
            raise ValueError("a serving stage keeps no training lists: fit it without crossfit and shortlist")
        data = serving_data(data)
    root = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in data.name)
    folder = str(root / f"lexical-{stem}-{cache_key(data, settings)}")
    try:
        stage = LexicalStage.load(folder, threads=threads)
        if log:
            log(f"lexical stage: cached ({folder})")
        return stage
    except ValueError:
        pass
    return fit_stage(stage_data(data), folder, settings, threads=threads, log=log,
                     splits=("test",) if serving else SPLITS)


def lexical_split_metrics(stage: LexicalStage, data, splits: Sequence[str] = SPLITS) -> dict:
    """{split: metrics} of the stage alone on the data it was fitted on (`data`: those splits line up)."""
    from ..train import label_inv_propensity
    from .fusion import lists_metrics

    inv_prop = label_inv_propensity(data)
    return {split: lists_metrics(stage.split_topk(split), getattr(data, split).labels, data.num_labels, inv_prop)
            for split in splits}
