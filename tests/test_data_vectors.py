"""load_word_vectors on small GloVe / word2vec text files."""
import gzip

import numpy as np
import pytest

from xmcnas_fast.data import DataError, Vocab, load_word_vectors

VOCAB = Vocab(["<pad>", "<unk>", "the", "cat", "sat", "zebra"])
LINES = ["the 0.1 0.2 0.3", "Cat 9 9 9", "cat 1 2 3", "sat -1 -2 -3.5", "dog 5 5 5"]


def _write(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


@pytest.mark.parametrize("variant", ["plain", "header", "gz"])
def test_reads_vectors_and_coverage(tmp_path, variant):
    if variant == "plain":
        p = _write(tmp_path / "v.txt", LINES)
    elif variant == "header":
        p = _write(tmp_path / "v.txt", ["5 3", *LINES])
    else:
        p = tmp_path / "v.txt.gz"
        with gzip.open(p, "wt", encoding="utf-8") as f:
            f.write("\n".join(LINES) + "\n")
    m, coverage = load_word_vectors(p, VOCAB)
    assert m.shape == (6, 3) and m.dtype == np.float32
    np.testing.assert_array_equal(m[0], 0)
    np.testing.assert_allclose(m[2], [0.1, 0.2, 0.3], rtol=1e-6)
    np.testing.assert_array_equal(m[3], [1, 2, 3])  # the exact lowercase form wins over "Cat"
    np.testing.assert_array_equal(m[4], [-1, -2, -3.5])
    assert coverage == pytest.approx(3 / 4)  # zebra missing; pad/unk not counted
    assert 0 < np.abs(m[5]).max() < 1 and 0 < np.abs(m[1]).max() < 1  # small random vectors


def test_random_rows_are_seeded(tmp_path):
    p = _write(tmp_path / "v.txt", LINES)
    a, _ = load_word_vectors(p, VOCAB, seed=1)
    b, _ = load_word_vectors(p, VOCAB, seed=1)
    c, _ = load_word_vectors(p, VOCAB, seed=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a[5], c[5])
    np.testing.assert_array_equal(a[2], c[2])


def test_cased_word_used_when_no_lowercase_form(tmp_path):
    p = _write(tmp_path / "v.txt", ["The 1 1", "Zebra 2 2"])
    m, coverage = load_word_vectors(p, VOCAB)
    np.testing.assert_array_equal(m[2], [1, 1])
    np.testing.assert_array_equal(m[5], [2, 2])
    assert coverage == pytest.approx(0.5)


def test_words_with_spaces_are_not_mistaken_for_wider_vectors(tmp_path):
    p = _write(tmp_path / "v.txt", ["the 1 2", ". . . 3 4", "cat 5 6"])
    m, coverage = load_word_vectors(p, VOCAB)
    np.testing.assert_array_equal(m[3], [5, 6])


@pytest.mark.parametrize("lines, dim, message", [
    (["the 1 2 3", "cat 1 2"], None, r"v.txt:2: 2 values, expected dimension 3"),
    (["the 1 2 3", "cat 1 2 3 4"], None, r"v.txt:2: 4 values, expected dimension 3"),
    (["the 1 2 3"], 4, r"v.txt:1: 3 values, expected dimension 4"),
    (["2 4", "the 1 2 3 4", "cat 1 2 3"], None, r"v.txt:3: 3 values, expected dimension 4"),
    (["2 3", "the 1 2 3"], 5, r"v.txt:1: the header says dimension 3, expected 5"),
    (["the 1 2 3", "cat 1 x 3"], None, r"v.txt:2: a value of 'cat' is not a number"),
    (["3 3", "the 1 2 3", "cat 1 2 3"], None, r"header says 3 vectors but the file has 2"),
    ([""], None, "no vectors"),
])
def test_bad_files_name_file_and_line(tmp_path, lines, dim, message):
    p = _write(tmp_path / "v.txt", lines)
    with pytest.raises(DataError, match=message):
        load_word_vectors(p, VOCAB, dim=dim)
