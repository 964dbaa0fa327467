"""Readers for the input formats. Each yields raw examples, dicts
``{"id": str | None, "text": str, "labels": list[str]}`` (plus ``"split"`` where a JSON-lines
record names one), and raises :class:`DataError` ``"path:line: ..."`` on bad input.

Common rules, whatever the format:

- Files are UTF-8 (a leading byte-order mark is ignored); ``.gz``, ``.xz``/``.lzma`` and ``.bz2``
  files are decompressed on the fly. A byte sequence that is not UTF-8 is an error naming the line.
- Labels are stripped of surrounding whitespace; empty label strings are dropped; a label repeated
  within one example is kept once (first occurrence).
- An example whose text is empty (only whitespace) or that has no labels is skipped and counted in
  ``skipped`` (a :class:`collections.Counter`, keys ``"empty_text"`` and ``"no_labels"``), or, with
  ``strict=True``, is an error naming the line.
"""
from __future__ import annotations

import ast
import bz2
import csv
import gzip
import json
import lzma
import zlib
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from .errors import DataError

_OPENERS = {".gz": gzip.open, ".xz": lzma.open, ".lzma": lzma.open, ".bz2": bz2.open}
_STREAM_ERRORS = (EOFError, lzma.LZMAError, zlib.error, gzip.BadGzipFile, OSError)


def open_binary(path):
    """The file's bytes, decompressed according to its suffix."""
    path = Path(path)
    opener = _OPENERS.get(path.suffix.lower(), open)
    try:
        return opener(path, "rb")
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except IsADirectoryError:
        raise DataError(f"{path}: is a directory, not a file") from None
    except OSError as e:
        raise DataError(f"{path}: cannot open ({e.strerror or e})") from None


def open_lines(path) -> Iterator[tuple[int, str]]:
    """``(line_number, line)`` for each line of a UTF-8 text file (line ends kept, numbers from 1)."""
    lineno = 0
    with open_binary(path) as f:
        try:
            for lineno, raw in enumerate(f, 1):
                try:
                    s = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataError(f"{path}:{lineno}: not valid UTF-8 (byte 0x{raw[e.start]:02x} "
                                    f"at byte {e.start + 1} of the line)") from None
                if lineno == 1 and s.startswith("\ufeff"):
                    s = s[1:]
                yield lineno, s
        except _STREAM_ERRORS as e:
            raise DataError(f"{path}:{lineno + 1}: cannot read the file past this point "
                            f"(truncated or corrupt: {e})") from None


def clean_labels(labels) -> list[str]:
    """Stripped, non-empty, first occurrence of each, in order."""
    seen: dict[str, None] = {}
    for lab in labels:
        lab = lab.strip()
        if lab:
            seen.setdefault(lab, None)
    return list(seen)


def make_example(path, line, ident, text: str, labels: list[str], *, strict: bool,
                 skipped: Counter | None) -> dict | None:
    """The raw example, or None (counted in ``skipped``) when its text is empty or it has no
    labels; with ``strict`` those are errors."""
    labels = clean_labels(labels)
    problem = "empty_text" if not text.strip() else "no_labels" if not labels else None
    if problem is None:
        return {"id": ident, "text": text, "labels": labels}
    if strict:
        what = "the text is empty" if problem == "empty_text" else "the example has no labels"
        raise DataError(f"{path}:{line}: {what} (strict=True; without it such examples are skipped and counted)")
    if skipped is not None:
        skipped[problem] += 1
    return None


def _label_list(path, line, value, what: str) -> list[str]:
    if not isinstance(value, (list, tuple)):
        raise DataError(f"{path}:{line}: {what} must be a list of strings, got {type(value).__name__}")
    out = []
    for v in value:
        if isinstance(v, bool) or not isinstance(v, (str, int)):
            raise DataError(f"{path}:{line}: {what} must hold strings, got {v!r}")
        out.append(str(v))
    return out


def json_objects(path, lines=None) -> Iterator[tuple[int, dict]]:
    """``(line_number, object)`` for each non-blank line of a JSON-lines file (or of ``lines``,
    ``(number, text)`` pairs read from elsewhere, e.g. stdin, reported as ``path``). A line that is
    not a JSON object is an error naming the line and the column where parsing stopped."""
    for lineno, s in (open_lines(path) if lines is None else lines):
        s = s.rstrip("\r\n")  # a line cut short fails at its end, not at column 1 of a next line
        if not s.strip():
            continue
        try:
            obj = json.loads(s)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}:{lineno}: invalid JSON ({e.msg}: column {e.pos + 1})") from None
        if not isinstance(obj, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {type(obj).__name__}")
        yield lineno, obj


def read_jsonl(path, *, strict: bool = False, skipped: Counter | None = None,
               text_field: str = "text", labels_field: str = "labels") -> Iterator[dict]:
    """JSON lines: one object a line, ``{"text": str, "labels": [str, ...]}``, optional ``"id"``
    (string or integer) and ``"split"`` (``"train"`` or ``"test"``). Blank lines are ignored."""
    for lineno, obj in json_objects(path):
        for field in (text_field, labels_field):
            if field not in obj:
                raise DataError(f"{path}:{lineno}: no {field!r} field (fields: {', '.join(obj) or 'none'})")
        text = obj[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{lineno}: {text_field!r} must be a string, got {type(text).__name__}")
        labels = _label_list(path, lineno, obj[labels_field], repr(labels_field))
        ident = obj.get("id")
        if ident is not None:
            if isinstance(ident, bool) or not isinstance(ident, (str, int)):
                raise DataError(f"{path}:{lineno}: 'id' must be a string or an integer, got {ident!r}")
            ident = str(ident)
        ex = make_example(path, lineno, ident, text, labels, strict=strict, skipped=skipped)
        if ex is None:
            continue
        if "split" in obj:
            if obj["split"] not in ("train", "test"):
                raise DataError(f"{path}:{lineno}: 'split' must be \"train\" or \"test\", got {obj['split']!r}")
            ex["split"] = obj["split"]
        yield ex


def parse_label_cell(path, line, cell: str) -> list[str]:
    """A CSV label cell: a Python/JSON-style list literal (``"['cs.LG', 'cs.AI']"``, read with
    :func:`ast.literal_eval`, never ``eval``), or else labels separated by whitespace."""
    s = cell.strip()
    if not s.startswith(("[", "(")):
        return s.split()
    try:
        value = ast.literal_eval(s)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        raise DataError(f"{path}:{line}: the label cell is not a list literal: {_clip(s)}") from None
    return _label_list(path, line, value, "the label cell")


def _clip(s: str, n: int = 60) -> str:
    return repr(s if len(s) <= n else s[:n] + "...")


def read_csv(path, *, text_column: str | Sequence[str] = "summaries", labels_column: str = "terms",
             id_column: str | None = None, strict: bool = False, skipped: Counter | None = None,
             delimiter: str = ",") -> Iterator[dict]:
    """CSV with a header row, a text column and a label-list column (the arXiv abstracts CSV:
    ``titles``, ``summaries``, ``terms``). ``text_column`` may name several columns, joined with
    a newline (e.g. ``("titles", "summaries")``). Line numbers are those of a record's first
    physical line (a quoted field may span lines)."""
    text_columns = [text_column] if isinstance(text_column, str) else list(text_column)
    lines = (s for _, s in open_lines(path))
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
    old_limit = csv.field_size_limit()
    csv.field_size_limit(2**31 - 1)
    try:
        header, start = None, 1
        while header is None:
            try:
                row = next(reader)
            except StopIteration:
                raise DataError(f"{path}:1: empty CSV file (expected a header row)") from None
            except csv.Error as e:
                raise DataError(f"{path}:{start}: {e}") from None
            if row:
                header = [h.strip() for h in row]
            else:
                start = reader.line_num + 1
        col = {}
        for name in [*text_columns, labels_column, *([id_column] if id_column else [])]:
            if name not in header:
                raise DataError(f"{path}:{start}: no column {name!r} (columns: {', '.join(map(repr, header))}); "
                                "name the text and label columns with text_column= and labels_column= "
                                "(on the command line: --text-column, --labels-column)")
            col[name] = header.index(name)
        while True:
            start = reader.line_num + 1
            try:
                row = next(reader)
            except StopIteration:
                return
            except csv.Error as e:
                raise DataError(f"{path}:{start}: {e}") from None
            if not row:
                continue
            if len(row) != len(header):
                raise DataError(f"{path}:{start}: {len(row)} fields, but the header has {len(header)}")
            text = "\n".join(row[col[c]] for c in text_columns)
            labels = parse_label_cell(path, start, row[col[labels_column]])
            ident = row[col[id_column]] if id_column else None
            ex = make_example(path, start, ident, text, labels, strict=strict, skipped=skipped)
            if ex is not None:
                yield ex
    finally:
        csv.field_size_limit(old_limit)


def read_attentionxml(texts_path, labels_path, *, strict: bool = False,
                      skipped: Counter | None = None) -> Iterator[dict]:
    """AttentionXML's raw text: ``*_texts.txt`` and ``*_labels.txt``, one example a line, line for
    line; labels separated by spaces. Files of different lengths are an error naming both."""
    texts, labels = open_lines(texts_path), open_lines(labels_path)
    n = 0
    while True:
        t, lab = next(texts, None), next(labels, None)
        if t is None or lab is None:
            break
        n, text = t
        ex = make_example(texts_path if not text.strip() else labels_path, n, None,
                          text.rstrip("\r\n"), lab[1].split(), strict=strict, skipped=skipped)
        if ex is not None:
            yield ex
    extra_texts = (t is not None) + sum(1 for _ in texts)
    extra_labels = (lab is not None) + sum(1 for _ in labels)
    if extra_texts or extra_labels:
        raise DataError(f"{texts_path} has {n + extra_texts} lines but {labels_path} has {n + extra_labels}: "
                        "texts and labels must match line for line")


@dataclass
class BowDataset:
    """A bag-of-words split from the Extreme Classification Repository's sparse format."""
    features: sp.csr_matrix  # [N, F] float32
    labels: sp.csr_matrix    # [N, L] float32 of 1.0
    path: str = ""

    def __len__(self) -> int:
        return self.features.shape[0]

    @property
    def num_features(self) -> int:
        return self.features.shape[1]

    @property
    def num_labels(self) -> int:
        return self.labels.shape[1]


def parse_xc_header(line: str) -> tuple[int, int, int] | None:
    """``(N, F, L)`` when the line is an XC sparse-format header, else None."""
    parts = line.split()
    if len(parts) == 3 and all(p.isdigit() for p in parts):
        return int(parts[0]), int(parts[1]), int(parts[2])
    return None


def read_xc_sparse(path) -> BowDataset:
    """The Extreme Classification Repository's sparse bag-of-words format: a header ``N F L``,
    then one example a line, ``l1,l2,... f:v f:v ...`` (an example with no labels starts with the
    features). Indices are 0-based and must be below F and L."""
    lines = open_lines(path)
    first = next(lines, None)
    header = parse_xc_header(first[1]) if first else None
    if header is None:
        raise DataError(f"{path}:1: expected the header 'N F L' (three integers) of the sparse format, "
                        f"got {_clip(first[1].strip()) if first else 'an empty file'}")
    n, nf, nl = header
    feat_ptr, feat_idx, feat_val = [0], [], []
    lab_ptr, lab_idx = [0], []
    rows = 0
    for lineno, s in lines:
        if not s.strip():
            continue
        rows += 1
        parts = s.split()
        if parts and ":" not in parts[0]:
            try:
                labs = sorted({int(x) for x in parts[0].split(",") if x})
            except ValueError:
                raise DataError(f"{path}:{lineno}: bad label list {_clip(parts[0])}") from None
            if labs and not (0 <= labs[0] and labs[-1] < nl):
                raise DataError(f"{path}:{lineno}: label index out of range [0, {nl})")
            lab_idx.extend(labs)
            parts = parts[1:]
        lab_ptr.append(len(lab_idx))
        for p in parts:
            f, sep, v = p.partition(":")
            try:
                fi, fv = int(f), float(v)
            except ValueError:
                fi = -1
            if not sep or fi < 0 or fi >= nf:
                raise DataError(f"{path}:{lineno}: bad feature {_clip(p)} (expected index:value, index in [0, {nf}))")
            feat_idx.append(fi)
            feat_val.append(fv)
        feat_ptr.append(len(feat_idx))
    if rows != n:
        raise DataError(f"{path}: the header says {n} examples but the file has {rows}")
    features = sp.csr_matrix((np.asarray(feat_val, np.float32), np.asarray(feat_idx, np.int32),
                              np.asarray(feat_ptr, np.int64)), shape=(n, nf))
    features.sum_duplicates()
    labels = sp.csr_matrix((np.ones(len(lab_idx), np.float32), np.asarray(lab_idx, np.int32),
                            np.asarray(lab_ptr, np.int64)), shape=(n, nl))
    return BowDataset(features=features, labels=labels, path=str(path))
