"""Tokenizer and vocabulary.

The tokenizer is deliberately simple and fully specified: the text is lowercased
(``str.lower``) and split into maximal runs of Unicode word characters (Python's
``re`` ``\\w``: letters, digits and the underscore, in any script). Everything else
(punctuation, symbols, whitespace) separates tokens and is dropped, so
``"GTK+-based C/C++ tool, v2.0"`` gives ``["gtk", "based", "c", "c", "tool", "v2", "0"]``.
"""
from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from itertools import repeat
from pathlib import Path

import numpy as np

from .errors import DataError

#: bump when :func:`tokenize` changes; part of every cache key
TOKENIZER_VERSION = 1

PAD, UNK = 0, 1
PAD_TOKEN, UNK_TOKEN = "<pad>", "<unk>"

_WORD = re.compile(r"\w+")


def tokenize(text: str) -> list[str]:
    """Lowercase, then the maximal runs of Unicode word characters (``re`` ``\\w+``)."""
    return _WORD.findall(text.lower())


class Vocab:
    """Token <-> id. Id 0 is ``<pad>``, id 1 is ``<unk>``; the words follow by decreasing count
    in the data it was built from (ties by the word), so a vocabulary is a pure function of
    that data and the settings."""

    def __init__(self, itos: list[str]):
        if list(itos[:2]) != [PAD_TOKEN, UNK_TOKEN]:
            raise DataError(f"a vocabulary starts with {PAD_TOKEN!r}, {UNK_TOKEN!r}; got {itos[:2]!r}")
        self.itos: list[str] = list(itos)
        self.stoi: dict[str, int] = {w: i for i, w in enumerate(self.itos)}
        if len(self.stoi) != len(self.itos):
            raise DataError("a vocabulary has a word twice")

    @classmethod
    def build(cls, token_lists: Iterable[list[str]], min_count: int = 1,
              max_size: int | None = None) -> "Vocab":
        """The words seen at least ``min_count`` times; with ``max_size``, only the most frequent,
        so that ``len(vocab) <= max_size`` (the two special ids included)."""
        counts: Counter = Counter()
        for tokens in token_lists:
            counts.update(tokens)
        counts.pop(PAD_TOKEN, None)
        counts.pop(UNK_TOKEN, None)
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        if max_size is not None:
            if max_size < 2:
                raise DataError(f"max_size={max_size}: a vocabulary holds at least <pad> and <unk>")
            words = words[: max_size - 2]
        return cls([PAD_TOKEN, UNK_TOKEN, *words])

    def encode(self, tokens: list[str]) -> np.ndarray:
        """Token ids (int32); words not in the vocabulary get ``<unk>`` (1)."""
        return np.fromiter(map(self.stoi.get, tokens, repeat(UNK)), dtype=np.int32, count=len(tokens))

    def __len__(self) -> int:
        return len(self.itos)

    def __contains__(self, word: str) -> bool:
        return word in self.stoi

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocab) and self.itos == other.itos

    def __repr__(self) -> str:
        return f"Vocab({len(self)} entries)"

    def save(self, path) -> None:
        """JSON ``{"format": "xmcnas-vocab", "version": 1, "itos": [...]}``, written atomically."""
        path = Path(path)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        try:
            with open(tmp, "w", encoding="utf-8") as f:
                json.dump({"format": "xmcnas-vocab", "version": 1, "itos": self.itos}, f, ensure_ascii=False)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)

    @classmethod
    def load(cls, path) -> "Vocab":
        try:
            with open(path, encoding="utf-8") as f:
                obj = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise DataError(f"{path}: not a readable vocabulary file ({e})") from None
        if not isinstance(obj, dict) or obj.get("format") != "xmcnas-vocab" or not isinstance(obj.get("itos"), list):
            raise DataError(f"{path}: not a vocabulary file (no \"format\": \"xmcnas-vocab\" with \"itos\")")
        return cls(obj["itos"])
