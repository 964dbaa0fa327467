"""Summary statistics of a dataset (what ``xmcnas-fast data show`` prints)."""
from __future__ import annotations

import numpy as np

from .dataset import XMCData

LABEL_QUANTILES = (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)


def _label_figures(counts: np.ndarray) -> dict:
    """Mean, median, min, max and quantiles of examples per label."""
    if not counts.size:
        return {"mean": 0.0, "median": 0.0, "min": 0, "max": 0, "quantiles": {}}
    return {"mean": float(counts.mean()), "median": float(np.median(counts)), "min": int(counts.min()),
            "max": int(counts.max()), "quantiles": {f"{q:g}": float(np.quantile(counts, q)) for q in LABEL_QUANTILES}}


def dataset_stats(data: XMCData, vectors_coverage: float | None = None) -> dict:
    """Sizes, label and length distributions. The ``examples_per_label_*`` and ``label_frequency_*``
    figures cover the training file (train + valid: the trained labels); ``all_splits_per_label``
    covers train + valid + test and every label, those seen only in test included. Words per text
    are tokens after truncation to ``max_len``, over all splits."""
    counts = data.label_counts()
    test_rows = data.test.labels.tocsr()
    all_counts = np.bincount(np.concatenate([data.train.labels.indices, data.valid.labels.indices,
                                             test_rows.indices]).astype(np.int64),
                             minlength=test_rows.shape[1])
    per_example = np.concatenate([np.diff(data.train.labels.indptr), np.diff(data.valid.labels.indptr)])
    unseen_cols = test_rows.indices >= data.num_labels
    lengths = np.concatenate([data.train.lengths, data.valid.lengths, data.test.lengths])
    truncated = data.source.get("truncated_texts", {})
    train_file = _label_figures(counts)
    n_all = len(data.train) + len(data.valid) + len(data.test)
    stats = {
        "name": data.name,
        "train": len(data.train), "valid": len(data.valid), "test": len(data.test),
        "labels": data.num_labels,
        "labels_all_splits": int(test_rows.shape[1]),
        "labels_per_example": float(per_example.mean()) if per_example.size else 0.0,
        "test_labels_per_example": float(np.diff(test_rows.indptr).mean()) if len(data.test) else 0.0,
        "labels_per_example_all_splits": float(all_counts.sum() / n_all) if n_all else 0.0,
        "examples_per_label_mean": train_file["mean"],
        "examples_per_label_median": train_file["median"],
        "label_frequency_quantiles": train_file["quantiles"],
        "label_frequency_min": train_file["min"],
        "label_frequency_max": train_file["max"],
        "all_splits_per_label": _label_figures(all_counts),
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
    ("train", "train examples", "{:,}"),
    ("valid", "valid examples (drawn from train)", "{:,}"),
    ("test", "test examples", "{:,}"),
    ("labels", "labels, training file", "{:,}"),
    ("labels_all_splits", "labels, all splits", "{:,}"),
    ("labels_per_example", "labels per example, training file", "{:.2f}"),
    ("test_labels_per_example", "labels per example, test", "{:.2f}"),
    ("labels_per_example_all_splits", "labels per example, all splits", "{:.2f}"),
    ("words_per_text_mean", "words per text, all splits, cut (mean)", "{:.1f}"),
    ("words_per_text_median", "words per text (median)", "{:g}"),
    ("words_per_text_p95", "words per text (95th percentile)", "{:g}"),
    ("max_len", "max_len (texts cut to)", "{}"),
    ("truncated_texts", "texts truncated", "{:,}"),
    ("unseen_test_labels", "test labels unseen in train", "{:,}"),
    ("unseen_test_label_occurrences", "... their occurrences in test", "{:,}"),
    ("vocab", "vocabulary, train split (+ <pad>, <unk>)", "{:,}"),
    ("vectors_coverage", "word vector coverage", "{:.1%}"),
]


def render_stats(stats: dict):
    """Two rich Tables of :func:`dataset_stats`' output (display only): the dataset, then examples
    per label over the training file and over all splits, one figure a row (fits 80 columns)."""
    from rich.console import Group
    from rich.table import Table

    table = Table(title=f"dataset {stats.get('name', '')}".strip(), show_header=False)
    table.add_column("what", style="bold")
    table.add_column("value", justify="right")
    for key, label, fmt in _ROWS:
        if key in stats:
            table.add_row(label, fmt.format(stats[key]))
    skipped = {k: v for k, v in (stats.get("skipped") or {}).items() if v}
    if skipped:
        table.add_row("skipped", ", ".join(f"{k.replace('_', ' ')}: {v:,}" for k, v in skipped.items()))
    train_file = {"mean": stats.get("examples_per_label_mean"), "median": stats.get("examples_per_label_median"),
                  "min": stats.get("label_frequency_min"), "max": stats.get("label_frequency_max"),
                  "quantiles": stats.get("label_frequency_quantiles") or {}}
    return Group(table, _per_label_table(train_file, stats.get("all_splits_per_label")))


def _per_label_table(train_file: dict, all_splits) -> "Table":
    from rich.table import Table

    columns = [("training file (train + valid)", train_file)] + ([("all splits", all_splits)] if all_splits else [])
    t = Table(title="examples per label")
    t.add_column("")
    for name, _ in columns:
        t.add_column(name, justify="right")
    t.add_row("mean", *[f"{c['mean']:.1f}" for _, c in columns])
    for key in ("median", "min", "max"):
        t.add_row(key, *[f"{c[key]:,g}" for _, c in columns])
    for q in train_file["quantiles"]:
        t.add_row(f"{float(q):.0%} of labels have at most",
                  *[f"{c['quantiles'].get(q, float('nan')):,g}" for _, c in columns])
    return t
