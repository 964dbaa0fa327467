"""The data layer: formats, tokenizer and vocabulary, pretrained word vectors."""
from .errors import DataError
from .readers import BowDataset, open_lines, read_attentionxml, read_csv, read_jsonl, read_xc_sparse
from .text import PAD, UNK, Vocab, tokenize
from .vectors import load_word_vectors

__all__ = [
    "BowDataset", "DataError", "PAD", "UNK", "Vocab", "load_word_vectors", "open_lines", "read_attentionxml",
    "read_csv", "read_jsonl", "read_xc_sparse", "tokenize",
]
