"""Pretrained word vectors in GloVe / word2vec text format."""
from __future__ import annotations

import numpy as np

from .errors import DataError
from .readers import open_lines
from .text import PAD, Vocab

#: standard deviation of the random vectors given to words the file does not have
MISSING_STD = 0.1


def _is_number(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


def load_word_vectors(path, vocab: Vocab, *, dim: int | None = None, seed: int = 0) -> tuple[np.ndarray, float]:
    """The embedding matrix (float32 [len(vocab), d]) for ``vocab`` from a GloVe / word2vec text
    file (``.txt`` or ``.txt.gz``; an optional first line ``count dim``), and the coverage: the
    fraction of the vocabulary's words (``<pad>``/``<unk>`` excluded) found in the file.

    A file word matches a vocabulary word exactly or, failing that, lowercased (the tokenizer
    lowercases), the exact form winning. Words not found get vectors drawn from N(0, 0.1²) with
    ``seed``; the ``<pad>`` row is zero. Every line's field count is checked (a wrong dimension is
    an error naming the file and line); the numbers are parsed only for the words the vocabulary
    needs, so a non-number there is an error too. A line with more fields than ``1 + d`` is read
    as a word containing spaces (as in GloVe 840B) unless the extra field is a number."""
    stoi = vocab.stoi
    vectors: np.ndarray | None = None
    found = np.zeros(len(vocab), dtype=bool)
    exact = np.zeros(len(vocab), dtype=bool)
    expected_count = None
    d = dim
    count = 0
    for lineno, line in open_lines(path):
        parts = line.rstrip("\r\n").rstrip(" ").split(" ")
        if lineno == 1 and len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            expected_count, header_dim = int(parts[0]), int(parts[1])
            if d is not None and header_dim != d:
                raise DataError(f"{path}:1: the header says dimension {header_dim}, expected {d}")
            d = header_dim
            continue
        if parts == [""]:
            continue
        if d is None:
            d = len(parts) - 1
            if d < 1:
                raise DataError(f"{path}:{lineno}: a word with no vector")
        if len(parts) < d + 1 or (len(parts) > d + 1 and _is_number(parts[-d - 1])):
            raise DataError(f"{path}:{lineno}: {len(parts) - 1} values, expected dimension {d}")
        if vectors is None:
            vectors = np.zeros((len(vocab), d), dtype=np.float32)
        count += 1
        word = parts[0] if len(parts) == d + 1 else " ".join(parts[:-d])
        key = word if word in stoi else word.lower()
        i = stoi.get(key, -1)
        if i <= PAD or (found[i] and (exact[i] or word != key)):
            continue
        try:
            vectors[i] = np.asarray(parts[-d:], dtype=np.float32)
        except ValueError:
            raise DataError(f"{path}:{lineno}: a value of {word!r} is not a number") from None
        found[i] = True
        exact[i] = word == key
    if d is None or (vectors is None and dim is None):
        raise DataError(f"{path}: no vectors in the file")
    if expected_count is not None and count != expected_count:
        raise DataError(f"{path}: the header says {expected_count} vectors but the file has {count}")
    if vectors is None:
        vectors = np.zeros((len(vocab), d), dtype=np.float32)
    rng = np.random.default_rng(seed)
    missing = ~found
    missing[PAD] = False
    vectors[missing] = rng.normal(0.0, MISSING_STD, size=(int(missing.sum()), d)).astype(np.float32)
    vectors[PAD] = 0.0
    words = max(len(vocab) - 2, 0)
    coverage = float(found[2:].sum() / words) if words else 0.0
    return vectors, coverage
