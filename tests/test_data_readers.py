"""Tokenizer, vocabulary and the format readers, on small files written here, broken ones included."""
import gzip
import json
import lzma
from collections import Counter

import numpy as np
import pytest

from xmcnas_fast.data import (DataError, Vocab, read_attentionxml, read_csv, read_jsonl, read_xc_sparse,
                              tokenize)


def test_tokenize_lowercases_and_splits_on_non_word_characters():
    assert tokenize("GTK+-based C/C++ tool, v2.0") == ["gtk", "based", "c", "c", "tool", "v2", "0"]
    assert tokenize("Éditeur  de_texte\tÜBER\nλόγος") == ["éditeur", "de_texte", "über", "λόγος"]
    assert tokenize(" ... !!") == []


def test_vocab_build_orders_by_count_then_word_and_honours_limits():
    docs = [["b", "a", "c"], ["a", "b"], ["a", "d"]]
    v = Vocab.build(docs)
    assert v.itos == ["<pad>", "<unk>", "a", "b", "c", "d"]
    assert Vocab.build(docs, min_count=2).itos == ["<pad>", "<unk>", "a", "b"]
    assert Vocab.build(docs, max_size=3).itos == ["<pad>", "<unk>", "a"]
    ids = v.encode(["a", "zzz", "d"])
    assert ids.dtype == np.int32 and ids.tolist() == [2, 1, 5]
    assert v.encode([]).shape == (0,)


def test_vocab_save_load_round_trip(tmp_path):
    v = Vocab.build([["ünï", "b", "b"]])
    v.save(tmp_path / "v.json")
    assert Vocab.load(tmp_path / "v.json") == v
    (tmp_path / "bad.json").write_text('{"itos": ["a"]}')
    with pytest.raises(DataError, match="bad.json"):
        Vocab.load(tmp_path / "bad.json")


def _write(path, text, encoding="utf-8"):
    path.write_bytes(text.encode(encoding) if isinstance(text, str) else text)
    return path


def test_read_jsonl(tmp_path):
    p = _write(tmp_path / "d.jsonl", "\n".join([
        json.dumps({"text": "first doc", "labels": ["x", " y ", "x", ""], "id": 7}),
        "",
        json.dumps({"text": "second", "labels": ["z"], "split": "test"}),
    ]) + "\n")
    got = list(read_jsonl(p))
    assert got == [{"id": "7", "text": "first doc", "labels": ["x", "y"]},
                   {"id": None, "text": "second", "labels": ["z"], "split": "test"}]


def test_read_jsonl_compressed(tmp_path):
    line = json.dumps({"text": "t", "labels": ["a"]}) + "\n"
    with gzip.open(tmp_path / "a.jsonl.gz", "wt") as f:
        f.write(line)
    with lzma.open(tmp_path / "a.jsonl.xz", "wt") as f:
        f.write(line)
    assert list(read_jsonl(tmp_path / "a.jsonl.gz")) == list(read_jsonl(tmp_path / "a.jsonl.xz"))
    assert list(read_jsonl(tmp_path / "a.jsonl.gz"))[0]["labels"] == ["a"]


@pytest.mark.parametrize("bad, message", [
    ('{"text": "a", "labels": ["x"]', "invalid JSON"),
    ('["text", "labels"]', "expected a JSON object"),
    ('{"labels": ["x"]}', "no 'text' field"),
    ('{"text": "a"}', "no 'labels' field"),
    ('{"text": 3, "labels": ["x"]}', "must be a string"),
    ('{"text": "a", "labels": "x"}', "must be a list"),
    ('{"text": "a", "labels": [["x"]]}', "must hold strings"),
    ('{"text": "a", "labels": ["x"], "split": "dev"}', "'split' must be"),
])
def test_read_jsonl_errors_name_file_and_line(tmp_path, bad, message):
    good = json.dumps({"text": "ok", "labels": ["x"]})
    p = _write(tmp_path / "bad.jsonl", f"{good}\n{good}\n{bad}\n{good}\n")
    with pytest.raises(DataError, match=message) as e:
        list(read_jsonl(p))
    assert str(e.value).startswith(f"{p}:3:")


def test_a_line_cut_short_is_reported_at_the_column_where_it_ends(tmp_path):
    good = json.dumps({"text": "ok", "labels": ["x"]})
    cut = json.dumps({"text": "a description long enough to be cut", "labels": ["a", "b"]})[:63]
    p = _write(tmp_path / "broken.jsonl", f"{good}\n{cut}\n{good}\n")
    with pytest.raises(DataError) as e:
        list(read_jsonl(p))
    assert str(e.value).startswith(f"{p}:2: invalid JSON (") and str(e.value).endswith(": column 64)")


def test_csv_without_its_columns_names_the_options_that_choose_them(tmp_path):
    p = _write(tmp_path / "tags.csv", "text,tags\nan editor,editor\n")
    with pytest.raises(DataError, match=r"no column 'summaries' \(columns: 'text', 'tags'\); .*--text-column"):
        list(read_csv(p))
    assert list(read_csv(p, text_column="text", labels_column="tags"))[0]["labels"] == ["editor"]


def test_non_utf8_is_an_error_naming_the_line(tmp_path):
    p = _write(tmp_path / "latin.jsonl", b'{"text": "ok", "labels": ["x"]}\n{"text": "caf\xe9", "labels": ["x"]}\n')
    with pytest.raises(DataError, match=r"latin.jsonl:2: not valid UTF-8 \(byte 0xe9"):
        list(read_jsonl(p))


def test_truncated_compressed_file_is_an_error(tmp_path):
    data = gzip.compress(("\n".join(json.dumps({"text": f"t{i}", "labels": ["a"]}) for i in range(2000))).encode())
    p = _write(tmp_path / "cut.jsonl.gz", data[: len(data) // 2])
    with pytest.raises(DataError, match="cut.jsonl.gz:.*truncated or corrupt"):
        list(read_jsonl(p))


def test_empty_text_and_missing_labels_are_skipped_and_counted_or_strict_errors(tmp_path):
    p = _write(tmp_path / "d.jsonl", "\n".join(json.dumps(o) for o in [
        {"text": "a", "labels": ["x"]}, {"text": "   ", "labels": ["x"]}, {"text": "b", "labels": []},
        {"text": "c", "labels": [" "]}, {"text": "d", "labels": ["y"]}]))
    skipped = Counter()
    assert [e["text"] for e in read_jsonl(p, skipped=skipped)] == ["a", "d"]
    assert skipped == {"empty_text": 1, "no_labels": 2}
    with pytest.raises(DataError, match=r"d.jsonl:2: the text is empty"):
        list(read_jsonl(p, strict=True))


ARXIV = '''titles,summaries,terms
Deep nets,"We study deep nets.
They work.","['cs.LG', 'cs.AI']"
Graphs,Graphs are nice,"['math.CO', 'cs.LG', 'cs.LG']"
'''


def test_read_csv_arxiv_layout(tmp_path):
    p = _write(tmp_path / "arxiv.csv", ARXIV)
    got = list(read_csv(p))
    assert got[0] == {"id": None, "text": "We study deep nets.\nThey work.", "labels": ["cs.LG", "cs.AI"]}
    assert got[1]["labels"] == ["math.CO", "cs.LG"]
    both = list(read_csv(p, text_column=("titles", "summaries"), id_column="titles"))
    assert both[1] == {"id": "Graphs", "text": "Graphs\nGraphs are nice", "labels": ["math.CO", "cs.LG"]}


def test_read_csv_plain_label_cells_split_on_whitespace(tmp_path):
    p = _write(tmp_path / "p.csv", "body,tags\nhello,a b  c\n")
    assert list(read_csv(p, text_column="body", labels_column="tags"))[0]["labels"] == ["a", "b", "c"]


def test_read_csv_never_evaluates_code(tmp_path):
    p = _write(tmp_path / "evil.csv", 'summaries,terms\nx,"[__import__(\'os\').getcwd()]"\n')
    with pytest.raises(DataError, match=r"evil.csv:2: the label cell is not a list literal"):
        list(read_csv(p))


def test_read_csv_errors_name_the_records_first_line(tmp_path):
    # header: line 1; records: lines 2-3 (a quoted newline), 4, then 5-6, whose label cell is bad
    p = _write(tmp_path / "b.csv", ARXIV + 'X,"multi\nline","[\'a\', 3.5]"\n')
    with pytest.raises(DataError, match=r"b.csv:5: the label cell must hold strings"):
        list(read_csv(p))
    p = _write(tmp_path / "c.csv", ARXIV + "X,too,many,fields\n")
    with pytest.raises(DataError, match=r"c.csv:5: 4 fields, but the header has 3"):
        list(read_csv(p))
    with pytest.raises(DataError, match=r"arxiv.csv:1: no column 'abstract'"):
        list(read_csv(_write(tmp_path / "arxiv.csv", ARXIV), text_column="abstract"))


def test_read_attentionxml(tmp_path):
    t = _write(tmp_path / "train_texts.txt", "first text here\nsecond one\n")
    lab = _write(tmp_path / "train_labels.txt", "l1 l2 l1\nl3\n")
    assert list(read_attentionxml(t, lab)) == [
        {"id": None, "text": "first text here", "labels": ["l1", "l2"]},
        {"id": None, "text": "second one", "labels": ["l3"]}]


def test_read_attentionxml_line_count_mismatch_names_both_files(tmp_path):
    t = _write(tmp_path / "train_texts.txt", "a\nb\nc\n")
    lab = _write(tmp_path / "train_labels.txt", "x\ny\n")
    with pytest.raises(DataError) as e:
        list(read_attentionxml(t, lab))
    assert f"{t} has 3 lines but {lab} has 2" in str(e.value)


def test_read_attentionxml_strict_names_the_right_file(tmp_path):
    t = _write(tmp_path / "train_texts.txt", "a\nb\n")
    lab = _write(tmp_path / "train_labels.txt", "x\n\n")
    with pytest.raises(DataError, match=f"{lab}:2: the example has no labels"):
        list(read_attentionxml(t, lab, strict=True))


def test_read_xc_sparse(tmp_path):
    p = _write(tmp_path / "train.txt", "3 5 4\n0,2 0:1.5 3:2\n 1:0.5\n3 4:1 4:1\n")
    bow = read_xc_sparse(p)
    assert len(bow) == 3 and bow.num_features == 5 and bow.num_labels == 4
    np.testing.assert_array_equal(bow.features.toarray(),
                                  [[1.5, 0, 0, 2, 0], [0, 0.5, 0, 0, 0], [0, 0, 0, 0, 2]])
    np.testing.assert_array_equal(bow.labels.toarray(), [[1, 0, 1, 0], [0, 0, 0, 0], [0, 0, 0, 1]])


@pytest.mark.parametrize("body, message", [
    ("2 5 4\n0 0:1\n", "header says 2 examples but the file has 1"),
    ("1 5 4\n0 9:1\n", ":2: bad feature '9:1'"),
    ("1 5 4\n7 1:1\n", ":2: label index out of range"),
    ("1 5 4\n0 1-1\n", ":2: bad feature"),
    ("hello\n", ":1: expected the header"),
])
def test_read_xc_sparse_errors(tmp_path, body, message):
    with pytest.raises(DataError, match=message):
        read_xc_sparse(_write(tmp_path / "x.txt", body))


def test_missing_file_is_a_data_error(tmp_path):
    with pytest.raises(DataError, match="no such file"):
        list(read_jsonl(tmp_path / "nope.jsonl"))
