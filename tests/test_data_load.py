"""load(): sources, splits, label space, encoding, and the on-disk cache."""
import json
import os

import numpy as np
import pytest

import xmcnas_fast.data.dataset as dataset_mod
from xmcnas_fast.data import DataError, XMCData, dataset_stats, is_test_key, load, render_stats, tokenize

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()


def _examples(n, seed=0, labels=("a", "b", "c", "d", "e")):
    rng = np.random.default_rng(seed)
    out = []
    for i in range(n):
        text = " ".join(map(str, rng.choice(WORDS, size=rng.integers(3, 12))))
        labs = sorted(set(map(str, rng.choice(labels, size=rng.integers(1, 3)))))
        out.append({"id": f"doc{i}", "text": text, "labels": labs})
    return out


def _jsonl(path, examples):
    path.write_text("".join(json.dumps(e) + "\n" for e in examples), encoding="utf-8")
    return path


@pytest.fixture
def pair_dir(tmp_path):
    d = tmp_path / "toy"
    d.mkdir()
    _jsonl(d / "train.jsonl", _examples(60))
    test = _examples(20, seed=1)
    test[0]["labels"] = ["a", "never-trained"]
    test[1]["labels"] = ["only-in-test"]
    _jsonl(d / "test.jsonl", test)
    return d


def test_round_trip_raw_to_xmcdata(pair_dir, tmp_path):
    data = load(str(pair_dir), valid=10, cache_dir=False)
    raw_train = {e["id"]: e for e in map(json.loads, (pair_dir / "train.jsonl").read_text().splitlines())}
    assert len(data.train) == 50 and len(data.valid) == 10 and len(data.test) == 20
    assert set(data.train.ids) | set(data.valid.ids) == set(raw_train)
    assert not set(data.train.ids) & set(data.valid.ids)
    for split in (data.train, data.valid):
        for i in range(len(split)):
            raw = raw_train[split.ids[i]]
            assert [data.vocab.itos[t] for t in split.tokens(i)] == tokenize(raw["text"])
            cols = split.labels[i].indices
            assert sorted(data.label_names[c] for c in cols) == raw["labels"]
    assert data.train.token_ids.dtype == np.int32 and data.train.offsets.dtype == np.int64
    assert data.train.labels.dtype == np.float32 and set(data.train.labels.data) == {1.0}
    assert data.num_labels == len(data.label_names) == 5
    # labels ordered by decreasing frequency over train + valid
    counts = data.label_counts()
    assert list(counts) == sorted(counts, reverse=True)


def test_vocab_is_built_on_train_only(pair_dir):
    d = pair_dir
    ex = _examples(60)
    ex[5]["text"] += " uniqueword"
    _jsonl(d / "train.jsonl", ex)
    data = load(str(d), valid=0.5, seed=3, cache_dir=False)
    in_train = "doc5" in data.train.ids
    assert ("uniqueword" in data.vocab) == in_train
    if not in_train:
        i = data.valid.ids.index("doc5")
        assert data.valid.tokens(i)[-1] == 1  # <unk>


def test_unseen_test_labels_map_to_columns_beyond_num_labels(pair_dir):
    data = load(str(pair_dir), cache_dir=False)
    assert data.num_labels == 5
    assert data.train.labels.shape[1] == data.valid.labels.shape[1] == 5
    assert data.test.labels.shape[1] == 7
    assert data.unseen_label_names == ["never-trained", "only-in-test"]
    assert sorted(data.test.labels[0].indices) == [data.label_names.index("a"), 5]
    assert list(data.test.labels[1].indices) == [6]
    stats = dataset_stats(data)
    assert stats["unseen_test_labels"] == 2 and stats["unseen_test_label_occurrences"] == 2


def test_valid_split_is_deterministic_per_seed(pair_dir):
    a = load(str(pair_dir), valid=15, seed=1, cache_dir=False)
    b = load(str(pair_dir), valid=15, seed=1, cache_dir=False)
    c = load(str(pair_dir), valid=15, seed=2, cache_dir=False)
    assert a.valid.ids == b.valid.ids and a.train.ids == b.train.ids
    assert set(a.valid.ids) != set(c.valid.ids)
    assert len(a.valid) == 15
    assert len(load(str(pair_dir), valid=0.25, cache_dir=False).valid) == 15
    with pytest.raises(DataError, match="valid=60"):
        load(str(pair_dir), valid=60, cache_dir=False)


def test_single_file_hash_split_is_deterministic_and_about_80_20(tmp_path):
    p = _jsonl(tmp_path / "all.jsonl", _examples(500))
    data = load(str(p), valid=0, cache_dir=False)
    test_ids = set(data.test.ids)
    assert test_ids == {f"doc{i}" for i in range(500) if is_test_key(f"doc{i}")}
    assert 0.14 < len(test_ids) / 500 < 0.26
    assert len(data.valid) == 0 and len(data.train) + len(data.test) == 500
    # without ids, the position decides; a "split" field overrides the hash
    ex = _examples(50)
    for e in ex:
        del e["id"]
    ex[0]["split"] = "test"
    data = load(str(_jsonl(tmp_path / "noid.jsonl", ex)), valid=0, cache_dir=False)
    assert data.test.ids is None
    expected_test = 1 + sum(is_test_key(str(i)) for i in range(1, 50))
    assert len(data.test) == expected_test


def test_csv_and_attentionxml_directories(tmp_path):
    d = tmp_path / "arxiv"
    d.mkdir()
    for split, n in (("train", 30), ("test", 8)):
        rows = ["titles,summaries,terms"] + [
            f'T{i},"{e["text"]}","{e["labels"]!r}"' for i, e in enumerate(_examples(n, seed=n))]
        (d / f"{split}.csv").write_text("\n".join(rows) + "\n")
    data = load(str(d), valid=5, cache_dir=False)
    assert (len(data.train), len(data.valid), len(data.test)) == (25, 5, 8)
    assert data.source["kind"] == "train/test files"

    a = tmp_path / "axml"
    a.mkdir()
    for split, n in (("train", 30), ("test", 8)):
        ex = _examples(n, seed=n)
        (a / f"{split}_texts.txt").write_text("".join(e["text"] + "\n" for e in ex))
        (a / f"{split}_labels.txt").write_text("".join(" ".join(e["labels"]) + "\n" for e in ex))
    axml = load(str(a), valid=5, cache_dir=False)
    assert axml.source["kind"] == "attentionxml"
    np.testing.assert_array_equal(axml.train.token_ids, data.train.token_ids)
    assert (axml.train.labels != data.train.labels).nnz == 0


def test_skipped_examples_are_reported_and_strict_raises(tmp_path):
    ex = _examples(40)
    ex[3]["labels"] = []
    ex[7]["text"] = " "
    p = _jsonl(tmp_path / "s.jsonl", ex)
    data = load(str(p), valid=0, cache_dir=False)
    assert data.source["skipped"] == {"empty_text": 1, "no_labels": 1}
    assert len(data.train) + len(data.test) == 38
    with pytest.raises(DataError, match=r"s.jsonl:4: the example has no labels"):
        load(str(p), strict=True, cache_dir=False)


def test_xc_sparse_file_is_refused_with_a_clear_message(tmp_path):
    d = tmp_path / "eurlex"
    d.mkdir()
    (d / "train.txt").write_text("1 3 2\n0 1:1\n")
    with pytest.raises(DataError, match="sparse bag-of-words format.*read_xc_sparse"):
        load(str(d / "train.txt"), cache_dir=False)
    with pytest.raises(DataError, match="sparse bag-of-words format"):
        load(str(d), cache_dir=False)


def test_unknown_sources(tmp_path):
    with pytest.raises(DataError, match="no such file or directory"):
        load(str(tmp_path / "missing"), cache_dir=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no dataset recognised"):
        load(str(tmp_path / "empty"), cache_dir=False)


def test_truncation_and_encode_texts(pair_dir):
    data = load(str(pair_dir), max_len=4, cache_dir=False)
    assert data.train.lengths.max() == 4
    assert sum(data.source["truncated_texts"].values()) > 0
    enc = data.encode_texts(["Alpha BETA unknownword gamma delta", ""])
    assert len(enc) == 2 and enc.labels.shape == (2, data.num_labels) and enc.labels.nnz == 0
    s = data.vocab.stoi
    assert enc.tokens(0).tolist() == [s["alpha"], s["beta"], 1, s["gamma"]]
    assert enc.lengths.tolist() == [4, 0]


def test_subset(pair_dir):
    data = load(str(pair_dir), cache_dir=False)
    idx = [5, 0, 5, len(data.train) - 1]
    sub = data.train.subset(idx)
    assert sub.ids == [data.train.ids[i] for i in idx]
    for j, i in enumerate(idx):
        np.testing.assert_array_equal(sub.tokens(j), data.train.tokens(i))
    assert (sub.labels != data.train.labels[idx]).nnz == 0


def test_inv_propensity_matches_jain_et_al(pair_dir):
    data = load(str(pair_dir), cache_dir=False)
    n = len(data.train) + len(data.valid)
    counts = np.asarray((data.train.labels.sum(0) + data.valid.labels.sum(0))).ravel()
    c = (np.log(n) - 1) * (1.5 + 1) ** 0.55
    np.testing.assert_allclose(data.inv_propensity(), 1 + c / (counts + 1.5) ** 0.55)
    # rarer labels get larger inverse propensities
    ip = data.inv_propensity()
    assert ip[np.argmin(counts)] > ip[np.argmax(counts)]


def test_stats_render(pair_dir):
    from rich.console import Console
    data = load(str(pair_dir), cache_dir=False)
    stats = dataset_stats(data, vectors_coverage=0.5)
    assert stats["train"] + stats["valid"] == 60 and stats["labels"] == 5
    assert stats["words_per_text_mean"] == pytest.approx(
        np.mean(np.concatenate([data.train.lengths, data.valid.lengths, data.test.lengths])))
    console = Console(record=True, width=120)
    console.print(render_stats(stats))
    out = console.export_text()
    assert "word vector coverage" in out and "50.0%" in out


# -- cache --------------------------------------------------------------------------------------

def test_cache_hit_and_identical_data(pair_dir, tmp_path):
    cache = tmp_path / "cache"
    first = load(str(pair_dir), cache_dir=cache)
    assert first.source["cache"] == "miss" and first.cache_path.parent == cache
    second = load(str(pair_dir), cache_dir=cache)
    assert second.source["cache"] == "hit" and second.cache_path == first.cache_path
    for split in ("train", "valid", "test"):
        a, b = getattr(first, split), getattr(second, split)
        np.testing.assert_array_equal(a.token_ids, b.token_ids)
        np.testing.assert_array_equal(a.offsets, b.offsets)
        assert (a.labels != b.labels).nnz == 0 and a.labels.shape == b.labels.shape
        assert a.ids == b.ids
    assert first.vocab == second.vocab and first.label_names == second.label_names
    assert second.unseen_label_names == first.unseen_label_names
    # other settings, other entry
    assert load(str(pair_dir), cache_dir=cache, seed=5).source["cache"] == "miss"
    assert len([p for p in cache.iterdir() if not p.name.startswith(".")]) == 2


def test_cache_env_variable(pair_dir, tmp_path, monkeypatch):
    monkeypatch.setenv("XMCNAS_CACHE", str(tmp_path / "envcache"))
    data = load(str(pair_dir))
    assert data.cache_path.parent == tmp_path / "envcache"


def test_changed_source_invalidates_cache(pair_dir, tmp_path):
    cache = tmp_path / "cache"
    load(str(pair_dir), cache_dir=cache)
    ex = _examples(60)
    ex[0]["labels"] = ["brand-new"]
    _jsonl(pair_dir / "train.jsonl", ex)
    data = load(str(pair_dir), cache_dir=cache)
    assert data.source["cache"] == "miss" and "brand-new" in data.label_names


def test_from_cache_memory_maps(pair_dir, tmp_path):
    data = load(str(pair_dir), cache_dir=tmp_path / "cache")
    mm = XMCData.from_cache(data.cache_path, mmap=True)
    assert isinstance(mm.train.token_ids, np.memmap)
    assert not mm.train.labels.indices.flags.owndata  # a view of the mapped file, not a copy
    np.testing.assert_array_equal(mm.train.token_ids, data.train.token_ids)
    assert (mm.test.labels != data.test.labels).nnz == 0
    assert mm.num_labels == data.num_labels and mm.inv_propensity().shape == (data.num_labels,)


def test_crash_mid_write_leaves_no_cache_that_loads(pair_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    real_save, calls = np.save, []

    def crashing_save(path, arr, *a, **k):
        calls.append(path)
        if len(calls) == 4:
            raise OSError("disk full (simulated)")
        return real_save(path, arr, *a, **k)

    monkeypatch.setattr(dataset_mod.np, "save", crashing_save)
    with pytest.warns(UserWarning, match="could not write the data cache"):
        data = load(str(pair_dir), cache_dir=cache)
    assert data.cache_path is None and len(data.train) > 0
    assert list(cache.iterdir()) == []  # the temporary directory went too
    monkeypatch.setattr(dataset_mod.np, "save", real_save)
    assert load(str(pair_dir), cache_dir=cache).source["cache"] == "miss"
    assert load(str(pair_dir), cache_dir=cache).source["cache"] == "hit"


def test_incomplete_cache_directory_is_never_loaded(pair_dir, tmp_path):
    cache = tmp_path / "cache"
    path = load(str(pair_dir), cache_dir=cache).cache_path
    # a hard kill: simulate a directory at the final place with a file cut short, then one without meta.json
    victim = path / "train.token_ids.npy"
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(DataError, match="not a complete"):
        XMCData.from_cache(path)
    again = load(str(pair_dir), cache_dir=cache)
    assert again.source["cache"] == "miss" and again.cache_path == path
    assert load(str(pair_dir), cache_dir=cache).source["cache"] == "hit"
    os.remove(path / "meta.json")
    assert load(str(pair_dir), cache_dir=cache).source["cache"] == "miss"
