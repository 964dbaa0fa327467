"""The data layer: formats, tokenizer and vocabulary, encoded datasets with an on-disk cache,
batching, pretrained word vectors or vectors learned from the training texts, and the bundled ``debtags`` dataset.

``load("debtags")`` gives the bundled dataset; ``load(path)`` reads a file or a directory:

- a directory with ``train.jsonl`` + ``test.jsonl`` (or ``.ndjson``/``.json``; each may be
  ``.gz``/``.xz``/``.bz2``), ``train.csv`` + ``test.csv`` (or ``.tsv``), or AttentionXML's
  ``train_texts.txt`` + ``train_labels.txt`` + ``test_texts.txt`` + ``test_labels.txt``;
- a single ``.jsonl`` or ``.csv`` file: split 80/20 into train/test by a hash of each example's
  id (its position when it has none), or by its ``"split"`` field where a JSON-lines record has one.

The Extreme Classification Repository's sparse bag-of-words files are read by
:func:`read_xc_sparse` into a :class:`BowDataset`; they hold no text, so ``load`` refuses them.
"""
from .batching import Batch, batch_order, iterate_batches, make_batch
from .dataset import (FORMAT_VERSION, TextDataset, XMCData, default_cache_dir, hash_unit, is_test_key,
                      load)
from .errors import DataError
from .readers import BowDataset, json_objects, open_lines, read_attentionxml, read_csv, read_jsonl, read_xc_sparse
from .stats import dataset_stats, render_stats
from .text import PAD, UNK, Vocab, tokenize
from .corpus_vectors import CORPUS, wants_vectors, word_vectors
from .vectors import load_word_vectors

__all__ = [
    "Batch", "BowDataset", "CORPUS", "DataError", "FORMAT_VERSION", "PAD", "TextDataset", "UNK", "Vocab", "XMCData",
    "batch_order", "dataset_stats", "default_cache_dir", "hash_unit", "is_test_key", "iterate_batches",
    "json_objects", "load", "load_word_vectors", "make_batch", "open_lines", "read_attentionxml", "read_csv",
    "read_jsonl", "read_xc_sparse", "render_stats", "tokenize", "wants_vectors", "word_vectors",
]
