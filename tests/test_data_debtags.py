"""The bundled debtags dataset, and python/build_debtags.py on a small fake apt lists directory."""
import gzip
import importlib.util
import json
import lzma
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from xmcnas_fast.data import dataset_stats, is_test_key, load
from xmcnas_fast.data.dataset import BUNDLED

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="session")
def debtags(tmp_path_factory):
    return load("debtags", cache_dir=tmp_path_factory.mktemp("debtags-cache"))


def test_bundled_debtags_loads_with_expected_statistics(debtags):
    s = dataset_stats(debtags)
    assert 20_000 < s["train"] + s["valid"] + s["test"] < 60_000
    assert 0.15 < s["test"] / (s["train"] + s["valid"] + s["test"]) < 0.25
    assert s["valid"] == round(0.1 * (s["train"] + s["valid"]))
    assert 300 < s["labels"] < 1000
    assert 2.5 < s["labels_per_example"] < 5
    assert 30 < s["words_per_text_mean"] < 120
    assert s["vocab"] > 10_000
    assert s["unseen_test_labels"] < 20
    names = set(debtags.label_names)
    assert {"role::program", "implemented-in::c", "use::editing"} <= names
    assert not any(n.endswith("TODO") or n.startswith("special::") for n in names)
    assert debtags.source["kind"] == "bundled" and debtags.source["bundled"]["releases"]


def test_bundled_split_follows_the_package_name_hash(debtags):
    assert all(is_test_key(p) for p in debtags.test.ids[:500])
    assert not any(is_test_key(p) for p in debtags.train.ids[:500])


def test_bundled_texts_look_like_descriptions(debtags):
    i = debtags.train.ids.index("0ad") if "0ad" in debtags.train.ids else 0
    words = [debtags.vocab.itos[t] for t in debtags.train.tokens(i)]
    assert "strategy" in words and "game" in words
    assert "game::strategy" in [debtags.label_names[c] for c in debtags.train.labels[i].indices]


def test_bundled_meta_matches_data():
    meta = json.loads(BUNDLED["debtags"].with_name("debtags.meta.json").read_text())
    import hashlib
    assert hashlib.sha256(BUNDLED["debtags"].read_bytes()).hexdigest() == meta["data_sha256"]
    assert meta["stats"]["labels"] >= 300


# -- the builder --------------------------------------------------------------------------------

def _builder():
    spec = importlib.util.spec_from_file_location("build_debtags", ROOT / "python" / "build_debtags.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("a, b, sign", [
    ("1.0", "1.0", 0), ("1.0~rc1", "1.0", -1), ("1:0.1", "2.0", 1), ("1.0-1", "1.0-1+deb12u1", -1),
    ("2.10", "2.9", 1), ("1.0a", "1.0", 1), ("1.0", "1.0+", -1), ("1.0~", "1.0~~", 1), ("0.9-2", "0.9-10", -1),
    ("1.2.3-0", "1.2.3", 0), ("7.88.1-10+deb12u8", "7.88.1-10+deb12u12", -1),
])
def test_version_cmp(a, b, sign):
    assert np.sign(_builder().version_cmp(a, b)) == sign
    if shutil.which("dpkg"):
        op = {-1: "lt", 0: "eq", 1: "gt"}[sign]
        assert subprocess.run(["dpkg", "--compare-versions", a, op, b]).returncode == 0


def test_clean_description():
    desc = ("Short one  here\n first line of the\n paragraph.\n .\n  * a verbatim item\n"
            "  * another\n .\n last   paragraph")
    assert _builder().clean_description(desc) == (
        "Short one here\nfirst line of the paragraph.\n* a verbatim item * another\nlast paragraph")


PACKAGES_A = """Package: editor
Version: 1.0-1
Description: a text editor
Description-md5: aaa
Tag: role::program, use::editing,
 implemented-in::c, suite::TODO

Package: notags
Version: 1
Description: nothing
Description-md5: bbb

Package: onlytodo
Version: 1
Description: todo
Description-md5: ccc
Tag: role::TODO, special::not-yet-tagged
"""

PACKAGES_B = """Package: editor
Version: 1.0-1+deb12u1
Description: a text editor (fixed)
Description-md5: ddd
Tag: role::program, use::editing

Package: shortonly
Version: 2
Description: just a short one
Description-md5: eee
Tag: role::documentation
"""

TRANSLATIONS = """Package: editor
Description-md5: aaa
Description-en: a text editor
 old long text.

Package: editor
Description-md5: ddd
Description-en: a text editor (fixed)
 It edits
 text.
 .
 Second paragraph.
"""

RELEASE = """Origin: Debian
Label: Debian
Suite: stable
Codename: testcode
Version: 99.1
Date: Sat, 01 Jan 2000 00:00:00 UTC
"""


def test_builder_end_to_end_on_small_lists(tmp_path):
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "x_dists_a_main_binary-amd64_Packages").write_text(PACKAGES_A)
    (lists / "x_dists_b_main_binary-amd64_Packages.gz").write_bytes(gzip.compress(PACKAGES_B.encode()))
    (lists / "x_dists_a_main_i18n_Translation-en.xz").write_bytes(lzma.compress(TRANSLATIONS.encode()))
    (lists / "x_dists_a_Release").write_text(RELEASE)
    out = tmp_path / "out"
    _builder().main(["--lists-dir", str(lists), "--out-dir", str(out)])
    with lzma.open(out / "debtags.jsonl.xz", "rt") as f:
        records = [json.loads(line) for line in f]
    assert [r["id"] for r in records] == ["editor", "shortonly"]
    editor, short = records
    # the newer version's tags and description win
    assert editor["labels"] == ["role::program", "use::editing"]
    assert editor["text"] == "a text editor (fixed)\nIt edits text.\nSecond paragraph."
    assert short["text"] == "just a short one" and short["labels"] == ["role::documentation"]
    assert all(r["split"] == ("test" if is_test_key(r["id"]) else "train") for r in records)
    meta = json.loads((out / "debtags.meta.json").read_text())
    assert meta["releases"][0]["Codename"] == "testcode" and meta["releases"][0]["Version"] == "99.1"
    assert meta["dropped_tags"] == {"placeholder *::TODO": 1, "special::*": 1}  # of the entries kept
    assert meta["dropped_packages_without_tags_or_text"] == 1
    assert meta["description_from"] == {"translation (matching md5)": 1, "short description only": 1}
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary files left
    # what it wrote loads as a dataset
    data = load(str(out / "debtags.jsonl.xz"), valid=0, cache_dir=False)
    assert len(data.train) + len(data.test) == 2
