"""Encoded datasets (:class:`TextDataset`, :class:`XMCData`) and :func:`load`, with its on-disk cache."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import warnings
from collections import Counter
from dataclasses import dataclass, field
from itertools import chain
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import DataError
from .sources import BUNDLED, TEST_FRACTION, file_digest, hash_unit, is_test_key, locate, read_source
from .text import TOKENIZER_VERSION, Vocab, tokenize

__all__ = ["BUNDLED", "FORMAT_VERSION", "TEST_FRACTION", "TextDataset", "XMCData", "build", "default_cache_dir",
           "gather_segments", "hash_unit", "is_test_key", "load"]

#: bump when the cache layout or anything that shapes the encoded data changes
FORMAT_VERSION = 1


def gather_segments(values: np.ndarray, offsets: np.ndarray, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The segments ``values[offsets[i]:offsets[i+1]]`` for i in ``idx``, concatenated, and their
    offsets; vectorised (no loop over segments)."""
    idx = np.asarray(idx, dtype=np.int64)
    starts = np.asarray(offsets[idx], dtype=np.int64)
    lens = np.asarray(offsets[idx + 1], dtype=np.int64) - starts
    new_offsets = np.zeros(len(idx) + 1, dtype=np.int64)
    np.cumsum(lens, out=new_offsets[1:])
    pos = np.repeat(starts - new_offsets[:-1], lens) + np.arange(new_offsets[-1], dtype=np.int64)
    return values[pos], new_offsets


@dataclass(eq=False)
class TextDataset:
    """One split: token ids of all documents concatenated, offsets [n+1], labels CSR [n, C]
    (float32 ones; columns >= the data's ``num_labels`` are labels never seen in training)."""
    token_ids: np.ndarray
    offsets: np.ndarray
    labels: sp.csr_matrix
    ids: list[str] | None = None

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, i: int) -> np.ndarray:
        return self.token_ids[self.offsets[i]:self.offsets[i + 1]]

    @property
    def lengths(self) -> np.ndarray:
        """Tokens per document (int64), after truncation."""
        return np.diff(np.asarray(self.offsets, dtype=np.int64))

    def subset(self, idx) -> "TextDataset":
        idx = np.asarray(idx, dtype=np.int64)
        if idx.size and (idx.min() < -len(self) or idx.max() >= len(self)):
            raise IndexError(f"subset index out of range for {len(self)} documents")
        idx = np.where(idx < 0, idx + len(self), idx)
        token_ids, offsets = gather_segments(self.token_ids, self.offsets, idx)
        return TextDataset(token_ids=token_ids, offsets=offsets, labels=self.labels[idx].tocsr(),
                           ids=None if self.ids is None else [self.ids[i] for i in idx])

    def __repr__(self) -> str:
        return f"TextDataset({len(self)} documents, {len(self.token_ids)} tokens, {self.labels.shape[1]} label columns)"


_SPLITS = ("train", "valid", "test")


@dataclass(eq=False)
class XMCData:
    """A dataset ready for training: three splits, the vocabulary and the label space."""
    train: TextDataset
    valid: TextDataset
    test: TextDataset
    vocab: Vocab
    label_names: list[str]
    num_labels: int
    name: str = ""
    source: dict = field(default_factory=dict)
    max_len: int | None = 500
    #: names of the test columns >= num_labels (labels seen only in test)
    unseen_label_names: list[str] = field(default_factory=list)
    #: the cache directory this data was loaded from or written to (None when not cached)
    cache_path: Path | None = None

    def label_counts(self) -> np.ndarray:
        """Examples per trained label over train + valid (int64 [num_labels])."""
        cols = np.concatenate([self.train.labels.indices, self.valid.labels.indices])
        return np.bincount(cols, minlength=self.num_labels)[: self.num_labels].astype(np.int64)

    def inv_propensity(self, a: float = 0.55, b: float = 1.5) -> np.ndarray:
        """Jain et al. (2016) inverse propensities 1 + C (N_l + B)^-A, C = (ln N - 1)(B + 1)^A,
        N_l and N counted over train + valid (float64 [num_labels])."""
        n = len(self.train) + len(self.valid)
        c = (np.log(n) - 1.0) * (b + 1.0) ** a
        return 1.0 + c * (self.label_counts().astype(np.float64) + b) ** (-a)

    def encode_texts(self, texts: list[str]) -> TextDataset:
        """Raw texts encoded as the training data was (same tokenizer, vocabulary, max_len), with
        an empty label matrix [n, num_labels] — for prediction."""
        if isinstance(texts, str):
            raise TypeError("encode_texts takes a list of texts, not one string")
        token_lists = [_truncate(tokenize(t), self.max_len) for t in texts]
        token_ids, offsets = _encode(token_lists, self.vocab)
        labels = sp.csr_matrix((len(texts), self.num_labels), dtype=np.float32)
        return TextDataset(token_ids=token_ids, offsets=offsets, labels=labels, ids=None)

    def __repr__(self) -> str:
        return (f"XMCData({self.name!r}: train {len(self.train)}, valid {len(self.valid)}, test {len(self.test)}, "
                f"{self.num_labels} labels, vocab {len(self.vocab)})")

    # -- cache ------------------------------------------------------------------------------
    def save_cache(self, path) -> None:
        """Writes this data to the directory ``path`` atomically (all files in a temporary
        directory beside it, then one rename), so a crash never leaves a cache that loads."""
        final = Path(path)
        final.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{final.name}-", dir=final.parent))
        try:
            files = {}
            for split in _SPLITS:
                ds: TextDataset = getattr(self, split)
                lab = ds.labels.tocsr()
                arrays = {"token_ids": ds.token_ids, "offsets": ds.offsets, "labels_data": lab.data,
                          "labels_indices": lab.indices, "labels_indptr": lab.indptr}
                for key, arr in arrays.items():
                    fname = f"{split}.{key}.npy"
                    np.save(tmp / fname, np.ascontiguousarray(arr))
                    files[fname] = (tmp / fname).stat().st_size
                if ds.ids is not None:
                    _write_json(tmp / f"{split}.ids.json", ds.ids)
                    files[f"{split}.ids.json"] = (tmp / f"{split}.ids.json").stat().st_size
            self.vocab.save(tmp / "vocab.json")
            files["vocab.json"] = (tmp / "vocab.json").stat().st_size
            meta = {"format": "xmcnas-data-cache", "format_version": FORMAT_VERSION, "name": self.name,
                    "num_labels": self.num_labels, "label_names": self.label_names,
                    "unseen_label_names": self.unseen_label_names, "max_len": self.max_len,
                    "label_columns": {s: getattr(self, s).labels.shape[1] for s in _SPLITS},
                    "source": self.source, "files": files}
            _write_json(tmp / "meta.json", meta)  # last: a directory without it is never loaded
            _fsync_dir(tmp)
            _install_dir(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    @classmethod
    def from_cache(cls, path, mmap: bool = True) -> "XMCData":
        """Loads a cache directory written by :meth:`save_cache` (by :func:`load`). With ``mmap``
        the arrays are memory-mapped read-only (``np.load(mmap_mode="r")``), so worker processes
        share the pages instead of each holding a copy."""
        path = Path(path)
        meta = _valid_cache_meta(path)
        if meta is None:
            raise DataError(f"{path}: not a complete xmcnas data cache (format version {FORMAT_VERSION})")
        mode = "r" if mmap else None
        splits = {}
        for split in _SPLITS:
            arr = {key: np.load(path / f"{split}.{key}.npy", mmap_mode=mode, allow_pickle=False)
                   for key in ("token_ids", "offsets", "labels_data", "labels_indices", "labels_indptr")}
            labels = sp.csr_matrix((arr["labels_data"], arr["labels_indices"], arr["labels_indptr"]),
                                   shape=(len(arr["offsets"]) - 1, meta["label_columns"][split]), copy=False)
            ids_path = path / f"{split}.ids.json"
            ids = json.loads(ids_path.read_text(encoding="utf-8")) if ids_path.exists() else None
            splits[split] = TextDataset(token_ids=arr["token_ids"], offsets=arr["offsets"], labels=labels, ids=ids)
        return cls(**splits, vocab=Vocab.load(path / "vocab.json"), label_names=meta["label_names"],
                   num_labels=meta["num_labels"], name=meta["name"], source=meta["source"],
                   max_len=meta["max_len"], unseen_label_names=meta["unseen_label_names"], cache_path=path)


def _write_json(path: Path, obj) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, ensure_ascii=False)
        f.flush()
        os.fsync(f.fileno())


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _install_dir(tmp: Path, final: Path) -> None:
    """Renames the finished ``tmp`` to ``final``. A stale or broken ``final`` is moved aside and
    removed first; if another process installed a valid one meanwhile, ours is dropped."""
    for _ in range(3):
        try:
            os.rename(tmp, final)
            return
        except OSError:
            if not final.exists():
                raise
            if _valid_cache_meta(final) is not None:
                shutil.rmtree(tmp, ignore_errors=True)
                return
            aside = final.with_name(f".stale-{final.name}-{os.getpid()}")
            try:
                os.rename(final, aside)
            except OSError:
                continue
            shutil.rmtree(aside, ignore_errors=True)
    raise OSError(f"could not install the cache directory {final}")


def _remove_stale(final: Path, age_s: float = 3600.0) -> None:
    """Removes what writers of ``final`` killed mid-write left behind (older than ``age_s``)."""
    now = time.time()
    for p in final.parent.glob(f".*-{final.name}-*"):
        try:
            if now - p.stat().st_mtime > age_s:
                shutil.rmtree(p, ignore_errors=True)
        except OSError:
            pass


def _valid_cache_meta(path: Path) -> dict | None:
    """The cache's meta.json when the directory is a complete cache of this format, else None."""
    try:
        meta = json.loads((path / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("format") != "xmcnas-data-cache" \
            or meta.get("format_version") != FORMAT_VERSION or not isinstance(meta.get("files"), dict):
        return None
    for fname, size in meta["files"].items():
        try:
            if (path / fname).stat().st_size != size:
                return None
        except OSError:
            return None
    return meta


def default_cache_dir() -> Path:
    env = os.environ.get("XMCNAS_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "xmcnas-fast"


# -- building ---------------------------------------------------------------------------------

def _truncate(tokens: list[str], max_len: int | None) -> list[str]:
    return tokens if max_len is None else tokens[:max_len]


def _encode(token_lists: list[list[str]], vocab: Vocab) -> tuple[np.ndarray, np.ndarray]:
    offsets = np.zeros(len(token_lists) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, token_lists), dtype=np.int64, count=len(token_lists)), out=offsets[1:])
    return vocab.encode(list(chain.from_iterable(token_lists))), offsets


def _label_matrix(label_lists: list[list[str]], index: dict[str, int], num_columns: int) -> sp.csr_matrix:
    indptr = np.zeros(len(label_lists) + 1, dtype=np.int64)
    np.cumsum(np.fromiter(map(len, label_lists), dtype=np.int64, count=len(label_lists)), out=indptr[1:])
    cols = np.fromiter((index[lab] for labs in label_lists for lab in labs), dtype=np.int64, count=indptr[-1])
    m = sp.csr_matrix((np.ones(len(cols), np.float32), cols, indptr), shape=(len(label_lists), num_columns))
    m.sort_indices()
    return m


def _ranked(counts: Counter) -> list[str]:
    """Names by decreasing count, ties by name."""
    return sorted(counts, key=lambda k: (-counts[k], k))


def _n_valid(valid, n: int) -> int:
    if isinstance(valid, bool) or not isinstance(valid, (int, float, np.integer, np.floating)):
        raise DataError(f"valid={valid!r}: give a count (int) or a fraction of train (float in [0, 1))")
    if isinstance(valid, (float, np.floating)):
        if not 0.0 <= valid < 1.0:
            raise DataError(f"valid={valid}: a fraction of train must be in [0, 1)")
        k = int(round(valid * n))
        return max(k, 1) if valid > 0 and n >= 2 else k
    if not 0 <= valid < n:
        raise DataError(f"valid={valid}: must be a count in [0, {n}) (the training file has {n} usable examples)")
    return int(valid)


def build(train_pool: list[dict], test: list[dict], *, name: str, max_len: int | None, min_count: int,
          max_vocab: int | None, valid, seed: int, source: dict) -> XMCData:
    """XMCData from raw examples: the label space of the whole training pool, ``valid`` drawn
    from it with ``seed``, the vocabulary of what remains (train only)."""
    if not train_pool:
        raise DataError(f"{name}: no usable training examples")
    label_counts = Counter(lab for ex in train_pool for lab in ex["labels"])
    label_names = _ranked(label_counts)
    index = {lab: i for i, lab in enumerate(label_names)}
    unseen = _ranked(Counter(lab for ex in test for lab in ex["labels"] if lab not in index))
    test_index = {**index, **{lab: len(label_names) + j for j, lab in enumerate(unseen)}}

    n = len(train_pool)
    k = _n_valid(valid, n)
    perm = np.random.default_rng(seed).permutation(n)
    valid_rows, train_rows = np.sort(perm[:k]), np.sort(perm[k:])
    parts = {"train": [train_pool[i] for i in train_rows], "valid": [train_pool[i] for i in valid_rows], "test": test}

    tokens, truncated = {}, {}
    for split, exs in parts.items():
        full = [tokenize(ex["text"]) for ex in exs]
        truncated[split] = 0 if max_len is None else sum(len(t) > max_len for t in full)
        tokens[split] = [_truncate(t, max_len) for t in full]
    vocab = Vocab.build(tokens["train"], min_count=min_count, max_size=max_vocab)

    splits = {}
    for split, exs in parts.items():
        token_ids, offsets = _encode(tokens[split], vocab)
        ncols = len(label_names) + (len(unseen) if split == "test" else 0)
        labels = _label_matrix([ex["labels"] for ex in exs], test_index if split == "test" else index, ncols)
        ids = [ex["id"] for ex in exs]
        splits[split] = TextDataset(token_ids=token_ids, offsets=offsets, labels=labels,
                                    ids=ids if all(i is not None for i in ids) else None)
    source = {**source, "truncated_texts": truncated}
    return XMCData(**splits, vocab=vocab, label_names=label_names, num_labels=len(label_names), name=name,
                   source=source, max_len=max_len, unseen_label_names=unseen)


def load(name_or_path: str = "debtags", *, max_len: int | None = 500, min_count: int = 1,
         max_vocab: int | None = None, valid: int | float = 0.1, seed: int = 0, strict: bool = False,
         text_column: str = "summaries", labels_column: str = "terms", cache_dir=None,
         mmap: bool = False) -> XMCData:
    """Loads a dataset: ``"debtags"`` (bundled) or a file or directory (see the package docs).

    ``valid`` is a count or a fraction of the training file, drawn with ``seed``. The label
    space is the training file's labels (valid included); test labels unseen there get columns
    >= ``num_labels``. The vocabulary is built on the train split only. The result is cached
    under ``cache_dir`` (default ``$XMCNAS_CACHE`` or ``~/.cache/xmcnas-fast``; ``False``: no cache),
    keyed by the source files' contents and every setting here."""
    if max_len is not None and max_len < 1:
        raise DataError(f"max_len={max_len}: must be at least 1 (or None for no truncation)")
    settings = {"max_len": max_len, "min_count": min_count, "max_vocab": max_vocab,
                "valid": valid, "seed": seed, "strict": strict, "text_column": text_column,
                "labels_column": labels_column, "tokenizer_version": TOKENIZER_VERSION,
                "format_version": FORMAT_VERSION}
    name, kind, files = locate(name_or_path)
    location = name_or_path if kind == "bundled" else str(Path(name_or_path).expanduser().resolve())
    digests = [{"path": str(p), "sha256": file_digest(p), "bytes": p.stat().st_size} for p in files]
    final = None
    if cache_dir is not False:
        key = hashlib.sha256(json.dumps({"settings": settings, "kind": kind, "files": [d["sha256"] for d in digests]},
                                        sort_keys=True).encode()).hexdigest()
        root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
        stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        final = root / f"{stem}-{key[:24]}"
        if _valid_cache_meta(final) is not None:
            data = XMCData.from_cache(final, mmap=mmap)
            data.source["cache"] = "hit"
            data.source["location"] = location   # this load's: the cache is keyed by content, not by path
            return data

    skipped: Counter = Counter()
    opts = {"strict": strict, "skipped": skipped, "text_column": text_column, "labels_column": labels_column}
    train_pool, test, extra = read_source(kind, files, opts)
    source = {**extra, "location": location, "files": digests, "settings": settings,
              "skipped": {"empty_text": skipped["empty_text"], "no_labels": skipped["no_labels"]}}
    data = build(train_pool, test, name=name, max_len=max_len, min_count=min_count, max_vocab=max_vocab,
                 valid=valid, seed=seed, source=source)
    if final is not None:
        try:
            data.save_cache(final)
            data.cache_path = final
        except OSError as e:
            warnings.warn(f"could not write the data cache {final}: {e}; continuing without it", stacklevel=2)
    data.source["cache"] = "miss" if data.cache_path else "off"
    return data
