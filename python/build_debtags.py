#!/usr/bin/env python3
"""Builds the bundled ``debtags`` dataset from Debian's package lists.

One example per Debian package that carries debtags: the text is the package's short and long
English description, the labels are its debtags (``role::program``, ``implemented-in::c``,
``use::editing``, ...). Get the lists with

    apt-get update -o Acquire::Languages=en

(they land in /var/lib/apt/lists/: the ``*_Packages`` lists carry ``Tag:`` and
``Description-md5:``, the ``*_i18n_Translation-en`` lists the long descriptions, keyed by package
and description MD5), then, from the repository root,

    python python/build_debtags.py [--lists-dir /var/lib/apt/lists] [--out-dir xmcnas_fast/data/bundled]

It writes ``debtags.jsonl.xz`` (one JSON object a line: ``id`` = package name, ``text``,
``labels``, ``split`` = train/test) and ``debtags.meta.json`` (the releases the lists came from,
the lists' hashes, what was dropped, statistics), each atomically (temporary file + rename).

Rules:
- a package listed several times (several suites, architectures) counts once: its entry with the
  highest Debian version among those that have tags (ties: the first list in name order);
- the description: the ``Description-en`` of that entry's ``Description-md5`` in a Translation-en
  list; failing that, any English description of the package; failing that, the short
  description from the Packages list. Debian's markup is cleaned: the leading space of
  continuation lines goes, a line holding only "." separates paragraphs (text: short description,
  then one paragraph a line, the lines of a paragraph joined with spaces, runs of spaces collapsed);
- tags dropped: placeholders awaiting tagging (``*::TODO``, ``*:TODO``), the ``special::*`` facet
  and anything ``not-yet-tagged``; a package left with no tag is dropped;
- split: a package is in test when the BLAKE2b hash of its name falls in the lowest 20 %
  (``xmcnas_fast.data.is_test_key``), so the split is deterministic and stable as lists change.
"""
from __future__ import annotations

import argparse
import bz2
import gzip
import hashlib
import io
import json
import lzma
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
try:
    from xmcnas_fast.data import is_test_key, tokenize
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))
    from xmcnas_fast.data import is_test_key, tokenize

_STDLIB = {".gz": gzip.decompress, ".xz": lzma.decompress, ".lzma": lzma.decompress, ".bz2": bz2.decompress}
_EXTERNAL = {".lz4": ["lz4", "-dc"], ".zst": ["zstd", "-dc"]}


def read_list(path: Path) -> str:
    """A list file's text, decompressed (gz/xz/bz2 in Python; lz4/zst, as apt stores them with
    Acquire::GzipIndexes, through apt-helper or the lz4/zstd tools)."""
    data = path.read_bytes()
    suffix = path.suffix
    if suffix in _STDLIB:
        data = _STDLIB[suffix](data)
    elif suffix in _EXTERNAL:
        for cmd in (["/usr/lib/apt/apt-helper", "cat-file", str(path)], [*_EXTERNAL[suffix], str(path)]):
            if shutil.which(cmd[0]):
                data = subprocess.run(cmd, check=True, capture_output=True).stdout
                break
        else:
            sys.exit(f"{path}: cannot decompress {suffix} (needs apt-helper or {_EXTERNAL[suffix][0]}); "
                     "or run apt-get update with -o Acquire::GzipIndexes=false")
    return data.decode("utf-8")


def stanzas(text: str):
    """deb822 paragraphs as dicts; a continuation line is appended to the field with its newline."""
    for para in re.split(r"\n\s*\n", text):
        fields, key = {}, None
        for line in para.split("\n"):
            if not line:
                continue
            if line[0] in " \t":
                if key is not None:
                    fields[key] += "\n" + line
            else:
                key, _, value = line.partition(":")
                fields[key] = value.strip()
        if fields:
            yield fields


# -- Debian version comparison (dpkg's verrevcmp) ---------------------------------------------

def _order(c: str) -> int:
    if c == "~":
        return -1
    if c.isdigit():
        return 0
    if c.isalpha():
        return ord(c)
    return ord(c) + 256


def _verrevcmp(a: str, b: str) -> int:
    i = j = 0
    while i < len(a) or j < len(b):
        while (i < len(a) and not a[i].isdigit()) or (j < len(b) and not b[j].isdigit()):
            ac = _order(a[i]) if i < len(a) else 0
            bc = _order(b[j]) if j < len(b) else 0
            if ac != bc:
                return ac - bc
            i += 1
            j += 1
        while i < len(a) and a[i] == "0":
            i += 1
        while j < len(b) and b[j] == "0":
            j += 1
        first_diff = 0
        while i < len(a) and a[i].isdigit() and j < len(b) and b[j].isdigit():
            if not first_diff:
                first_diff = ord(a[i]) - ord(b[j])
            i += 1
            j += 1
        if i < len(a) and a[i].isdigit():
            return 1
        if j < len(b) and b[j].isdigit():
            return -1
        if first_diff:
            return first_diff
    return 0


def _split_version(v: str) -> tuple[int, str, str]:
    epoch, _, rest = v.rpartition(":") if ":" in v else ("0", "", v)
    upstream, _, revision = rest.rpartition("-") if "-" in rest else (rest, "", "")
    return int(epoch or 0), upstream, revision


def version_cmp(a: str, b: str) -> int:
    """<0, 0, >0 as Debian version ``a`` is older than, equal to, newer than ``b``."""
    ea, ua, ra = _split_version(a)
    eb, ub, rb = _split_version(b)
    if ea != eb:
        return ea - eb
    return _verrevcmp(ua, ub) or _verrevcmp(ra, rb)


# -- descriptions and tags --------------------------------------------------------------------

def clean_description(desc: str) -> str:
    """Debian description markup to plain text: short description, then one paragraph a line."""
    lines = desc.split("\n")
    paragraphs, current = [], []
    for line in lines[1:]:
        body = line[1:] if line.startswith(" ") else line
        if body.strip() == ".":
            if current:
                paragraphs.append(" ".join(current))
            current = []
        elif body.strip():
            current.append(" ".join(body.split()))
    if current:
        paragraphs.append(" ".join(current))
    return "\n".join([" ".join(lines[0].split()), *paragraphs]).strip()


def drop_reason(tag: str) -> str | None:
    """Why a tag is dropped, or None to keep it."""
    facet, _, value = tag.partition("::")
    if value == "TODO" or value.endswith(":TODO"):
        return "placeholder *::TODO"
    if facet == "special":
        return "special::*"
    if "not-yet-tagged" in tag:
        return "not-yet-tagged"
    return None


def parse_tags(field: str) -> list[str]:
    return [t.strip() for t in field.replace("\n", " ").split(",") if t.strip()]


def release_info(lists_dir: Path) -> list[dict]:
    out = []
    for p in sorted(lists_dir.glob("*Release")):
        fields = next(stanzas(p.read_text(encoding="utf-8", errors="replace").split("-----BEGIN PGP SIGNATURE")[0]
                              .split("\n\n", 1)[-1] if p.name.endswith("InRelease") else p.read_text()), {})
        out.append({"file": p.name, **{k: fields[k] for k in ("Origin", "Suite", "Codename", "Version", "Date")
                                       if k in fields}})
    return out


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build(lists_dir: Path) -> tuple[list[dict], dict]:
    package_lists = sorted(p for p in lists_dir.glob("*_Packages*") if not p.name.endswith(".diff"))
    translation_lists = sorted(lists_dir.glob("*_i18n_Translation-en*"))
    if not package_lists:
        sys.exit(f"{lists_dir}: no *_Packages lists (run: apt-get update -o Acquire::Languages=en)")
    if not translation_lists:
        sys.exit(f"{lists_dir}: no *_i18n_Translation-en lists (run: apt-get update -o Acquire::Languages=en)")

    best: dict[str, dict] = {}
    lists_meta = []
    for p in package_lists:
        n_tagged = 0
        for st in stanzas(read_list(p)):
            if "Tag" not in st or "Package" not in st:
                continue
            n_tagged += 1
            old = best.get(st["Package"])
            if old is None or version_cmp(st.get("Version", "0"), old.get("Version", "0")) > 0:
                best[st["Package"]] = st
        lists_meta.append({"file": p.name, "sha256": _sha256(p), "tagged_entries": n_tagged})

    by_md5: dict[tuple[str, str], str] = {}
    by_package: dict[str, str] = {}
    for p in translation_lists:
        n = 0
        for st in stanzas(read_list(p)):
            if "Description-en" in st and "Package" in st:
                n += 1
                by_md5[(st["Package"], st.get("Description-md5", ""))] = st["Description-en"]
                by_package.setdefault(st["Package"], st["Description-en"])
        lists_meta.append({"file": p.name, "sha256": _sha256(p), "descriptions": n})

    dropped, description_from = Counter(), Counter()
    dropped_packages = 0
    records = []
    for name in sorted(best):
        st = best[name]
        labels, seen = [], set()
        for tag in parse_tags(st["Tag"]):
            reason = drop_reason(tag)
            if reason:
                dropped[reason] += 1
            elif tag not in seen:
                seen.add(tag)
                labels.append(tag)
        if not labels:
            dropped_packages += 1
            continue
        desc = by_md5.get((name, st.get("Description-md5", "")))
        how = "translation (matching md5)"
        if desc is None and "\n" in st.get("Description", ""):
            desc, how = st["Description"], "Packages list (full)"
        if desc is None and name in by_package:
            desc, how = by_package[name], "translation (other md5)"
        if desc is None:
            desc, how = st.get("Description", ""), "short description only"
        description_from[how] += 1
        text = clean_description(desc)
        if not text:
            dropped_packages += 1
            continue
        records.append({"id": name, "text": text, "labels": labels,
                        "split": "test" if is_test_key(name) else "train"})

    label_counts = Counter(lab for r in records for lab in r["labels"])
    words = sorted(len(tokenize(r["text"])) for r in records)
    meta = {
        "name": "debtags",
        "what": "Debian package descriptions (short + long English description) labelled with their debtags",
        "licence": "Each description comes from its Debian package and is under that package's own free "
                   "licence (see /usr/share/doc/<package>/copyright or the Debian archive); the debtags come "
                   "from the Debian archive's package lists.",
        "builder": "python/build_debtags.py",
        "releases": release_info(lists_dir),
        "lists": lists_meta,
        "dedupe": "one entry per package: the highest Debian version among its tagged entries",
        "dropped_tags": dict(dropped),
        "dropped_packages_without_tags_or_text": dropped_packages,
        "description_from": dict(description_from),
        "split": {"rule": "test when BLAKE2b-64(package name) / 2^64 < 0.2", "test_fraction": 0.2},
        "stats": {
            "examples": len(records),
            "train": sum(r["split"] == "train" for r in records),
            "test": sum(r["split"] == "test" for r in records),
            "labels": len(label_counts),
            "labels_per_example": round(sum(map(len, (r["labels"] for r in records))) / len(records), 3),
            "examples_per_label_median": sorted(label_counts.values())[len(label_counts) // 2],
            "words_per_text_mean": round(sum(words) / len(words), 2),
            "words_per_text_median": words[len(words) // 2],
            "words_per_text_max": words[-1],
        },
    }
    return records, meta


def write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lists-dir", type=Path, default=Path("/var/lib/apt/lists"),
                    help="apt's lists directory (default: /var/lib/apt/lists)")
    ap.add_argument("--out-dir", type=Path, default=ROOT / "xmcnas_fast" / "data" / "bundled",
                    help="where debtags.jsonl.xz and debtags.meta.json go (default: the package's bundled/)")
    args = ap.parse_args(argv)
    records, meta = build(args.lists_dir)
    buf = io.BytesIO()
    with lzma.open(buf, "wb", preset=9 | lzma.PRESET_EXTREME) as f:
        for r in records:
            f.write((json.dumps(r, ensure_ascii=False, separators=(",", ":")) + "\n").encode("utf-8"))
    data = buf.getvalue()
    meta["data_sha256"] = hashlib.sha256(data).hexdigest()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out_dir / "debtags.jsonl.xz", data)
    write_atomic(args.out_dir / "debtags.meta.json", (json.dumps(meta, indent=1, ensure_ascii=False) + "\n").encode())
    s = meta["stats"]
    print(f"{s['examples']} packages ({s['train']} train, {s['test']} test), {s['labels']} labels, "
          f"{s['labels_per_example']} labels each, {s['words_per_text_mean']} words per text; "
          f"{len(data) / 1e6:.2f} MB -> {args.out_dir}")


if __name__ == "__main__":
    main()
