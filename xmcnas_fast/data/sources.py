"""Where a dataset comes from: the bundled sets, a file or a directory of train/test files; which
reader reads each file; the deterministic train/test split of a single file."""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

from .errors import DataError
from .readers import open_lines, parse_xc_header, read_attentionxml, read_csv, read_jsonl

BUNDLED_DIR = Path(__file__).resolve().parent / "bundled"
BUNDLED = {"debtags": BUNDLED_DIR / "debtags.jsonl.xz"}

#: the share of a single-file dataset that goes to test
TEST_FRACTION = 0.2


def hash_unit(key: str) -> float:
    """A number in [0, 1) that depends only on ``key`` (BLAKE2b), the same on every machine."""
    return int.from_bytes(hashlib.blake2b(key.encode("utf-8"), digest_size=8).digest(), "big") / 2.0**64


def is_test_key(key: str, test_fraction: float = TEST_FRACTION) -> bool:
    """Whether the example with this id goes to test in a deterministic hash split."""
    return hash_unit(key) < test_fraction


_JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
_COMPRESSED = ("", ".gz", ".xz", ".bz2")


def _find(directory: Path, stem: str, suffixes) -> Path | None:
    for suffix in suffixes:
        for comp in _COMPRESSED:
            p = directory / f"{stem}{suffix}{comp}"
            if p.is_file():
                return p
    return None


def _is_xc_sparse(path: Path) -> bool:
    try:
        first = next(open_lines(path), None)
    except DataError:
        return False
    return first is not None and parse_xc_header(first[1]) is not None


def _xc_error(path: Path) -> DataError:
    return DataError(f"{path}: this is the Extreme Classification Repository's sparse bag-of-words format "
                     "(header 'N F L', then 'labels f:v ...'); it holds no text, so it cannot be loaded as a "
                     "sequence dataset. Use xmcnas_fast.data.read_xc_sparse() for bag-of-words baselines, or "
                     "give the raw texts (JSON lines, CSV or AttentionXML's *_texts.txt + *_labels.txt).")


def _strip_suffixes(path: Path) -> str:
    name = path.name
    for comp in _COMPRESSED[1:]:
        name = name.removesuffix(comp)
    return name.rsplit(".", 1)[0] if "." in name else name


def _reader(path: Path, opts: dict):
    """The reader for one file, by its extension."""
    name = path.name.lower()
    for comp in _COMPRESSED[1:]:
        name = name.removesuffix(comp)
    if name.endswith(_JSONL_SUFFIXES):
        return read_jsonl(path, strict=opts["strict"], skipped=opts["skipped"])
    if name.endswith((".csv", ".tsv")):
        return read_csv(path, text_column=opts["text_column"], labels_column=opts["labels_column"],
                        strict=opts["strict"], skipped=opts["skipped"], delimiter="\t" if name.endswith(".tsv") else ",")
    if _is_xc_sparse(path):
        raise _xc_error(path)
    raise DataError(f"{path}: unknown format (expected .jsonl, .csv, or a directory with train/test files)")


def locate(name_or_path: str) -> tuple[str, str, list[Path]]:
    """(name, kind, files) of a source, found without parsing it. Kinds: "bundled", "file",
    "pair" (train + test files of one format) and "attentionxml"."""
    if name_or_path in BUNDLED:
        path = BUNDLED[name_or_path]
        if not path.is_file():
            raise DataError(f"{path}: the bundled {name_or_path!r} dataset is missing from this installation; "
                            f"rebuild it with python/build_{name_or_path}.py")
        return name_or_path, "bundled", [path]
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _strip_suffixes(path), "file", [path]
    if not path.is_dir():
        raise DataError(f"{path}: no such file or directory (and not a bundled dataset: {', '.join(BUNDLED)})")
    name = path.resolve().name
    for suffixes in (_JSONL_SUFFIXES, (".csv",), (".tsv",)):
        tr, te = _find(path, "train", suffixes), _find(path, "test", suffixes)
        if tr and te:
            return name, "pair", [tr, te]
    axml = [path / f"{s}_{w}.txt" for s in ("train", "test") for w in ("texts", "labels")]
    if all(p.is_file() for p in axml):
        return name, "attentionxml", axml
    for p in sorted(path.glob("*.txt")):
        if _is_xc_sparse(p):
            raise _xc_error(p)
    present = ", ".join(sorted(p.name for p in path.iterdir())[:12]) or "nothing"
    raise DataError(f"{path}: no dataset recognised here (looked for train.jsonl + test.jsonl, train.csv + "
                    f"test.csv, or train_texts.txt + train_labels.txt + test_texts.txt + test_labels.txt; "
                    f"found: {present})")


def read_source(kind: str, files: list[Path], opts: dict) -> tuple[list[dict], list[dict], dict]:
    """(train pool, test, extra source info)."""
    if kind == "bundled":
        path = files[0]
        extra = {"kind": "bundled"}
        meta_path = path.with_name(path.name.split(".")[0] + ".meta.json")
        if meta_path.is_file():
            extra["bundled"] = json.loads(meta_path.read_text(encoding="utf-8"))
        return (*_split_single(list(read_jsonl(path, strict=opts["strict"], skipped=opts["skipped"]))), extra)
    if kind == "file":
        return (*_split_single(list(_reader(files[0], opts))), {"kind": "file"})
    if kind == "pair":
        return list(_reader(files[0], opts)), list(_reader(files[1], opts)), {"kind": "train/test files"}
    kw = {"strict": opts["strict"], "skipped": opts["skipped"]}
    train = list(read_attentionxml(files[0], files[1], **kw))
    test = list(read_attentionxml(files[2], files[3], **kw))
    return train, test, {"kind": "attentionxml"}


def _split_single(examples: list[dict]) -> tuple[list[dict], list[dict]]:
    """A single file's examples into train and test: by their "split" field where they have one,
    else by a hash of their id (or, without ids, their position): 80/20, deterministic."""
    train, test = [], []
    for pos, ex in enumerate(examples):
        split = ex.pop("split", None)
        if split is None:
            split = "test" if is_test_key(ex["id"] if ex["id"] is not None else str(pos)) else "train"
        (test if split == "test" else train).append(ex)
    return train, test


def file_digest(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()
