"""Summary statistics of a dataset (what ``xmcnas-fast data show`` prints)."""
from __future__ import annotations

import numpy as np

from .dataset import XMCData

LABEL_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def dataset_stats(data: XMCData, vectors_coverage: float | None = None) -> dict:
    """Sizes, label and length distributions. Per-label figures are over train + valid (the
    trained labels); words per text are tokens after truncation to ``max_len``, over all splits."""
    counts = data.label_counts()
    per_example = np.concatenate([np.diff(data.train.labels.indptr), np.diff(data.valid.labels.indptr)])
    test_rows = data.test.labels.tocsr()
    unseen_cols = test_rows.indices >= data.num_labels
    lengths = np.concatenate([data.train.lengths, data.valid.lengths, data.test.lengths])
    truncated = data.source.get("truncated_texts", {})
    stats = {
        "name": data.name,
        "train": len(data.train), "valid": len(data.valid), "test": len(data.test),
        "labels": data.num_labels,
        "labels_per_example": float(per_example.mean()) if per_example.size else 0.0,
        "test_labels_per_example": float(np.diff(test_rows.indptr).mean()) if len(data.test) else 0.0,
        "examples_per_label_mean": float(counts.mean()) if counts.size else 0.0,
        "examples_per_label_median": float(np.median(counts)) if counts.size else 0.0,
        "label_frequency_quantiles": {f"{q:g}": float(np.quantile(counts, q)) for q in LABEL_QUANTILES}
        if counts.size else {},
        "label_frequency_min": int(counts.min()) if counts.size else 0,
        "label_frequency_max": int(counts.max()) if counts.size else 0,
        "words_per_text_mean": float(lengths.mean()) if lengths.size else 0.0,
        "words_per_text_median": float(np.median(lengths)) if lengths.size else 0.0,
        "words_per_text_p95": float(np.quantile(lengths, 0.95)) if lengths.size else 0.0,
        "max_len": data.max_len,
        "truncated_texts": int(sum(truncated.values())),
        "unseen_test_labels": len(data.unseen_label_names),
        "unseen_test_label_occurrences": int(unseen_cols.sum()),
        "vocab": len(data.vocab),
        "skipped": dict(data.source.get("skipped", {})),
    }
    if vectors_coverage is not None:
        stats["vectors_coverage"] = float(vectors_coverage)
    return stats


_ROWS = [
    ("name", "dataset", "{}"),
    ("train", "train examples", "{:,}"),
    ("valid", "valid examples", "{:,}"),
    ("test", "test examples", "{:,}"),
    ("labels", "labels (train + valid)", "{:,}"),
    ("labels_per_example", "labels per example (mean)", "{:.2f}"),
    ("test_labels_per_example", "labels per test example (mean)", "{:.2f}"),
    ("examples_per_label_mean", "examples per label (mean)", "{:.1f}"),
    ("examples_per_label_median", "examples per label (median)", "{:g}"),
    ("label_frequency_min", "examples per label (min)", "{:,}"),
    ("label_frequency_max", "examples per label (max)", "{:,}"),
    ("words_per_text_mean", "words per text (mean)", "{:.1f}"),
    ("words_per_text_median", "words per text (median)", "{:g}"),
    ("words_per_text_p95", "words per text (95th percentile)", "{:g}"),
    ("max_len", "max_len (texts cut to)", "{}"),
    ("truncated_texts", "texts truncated", "{:,}"),
    ("unseen_test_labels", "test labels unseen in train", "{:,}"),
    ("unseen_test_label_occurrences", "... their occurrences in test", "{:,}"),
    ("vocab", "vocabulary (with <pad>, <unk>)", "{:,}"),
    ("vectors_coverage", "word vector coverage", "{:.1%}"),
]


def render_stats(stats: dict):
    """A rich Table of :func:`dataset_stats`' output (display only)."""
    from rich.table import Table

    table = Table(title=f"dataset {stats.get('name', '')}".strip(), show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, label, fmt in _ROWS:
        if key in stats and key != "name":
            table.add_row(label, fmt.format(stats[key]))
    quantiles = stats.get("label_frequency_quantiles") or {}
    if quantiles:
        table.add_row("examples per label (quantiles)",
                      "  ".join(f"{float(q):.0%}: {v:g}" for q, v in quantiles.items()))
    skipped = {k: v for k, v in (stats.get("skipped") or {}).items() if v}
    if skipped:
        table.add_row("skipped", ", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in skipped.items()))
    return table
