"""A synthetic XMC dataset of a given shape, for checking a budget on data larger than debtags.

    python benchmarks/make_synthetic.py --out runs/synthetic.jsonl                 # 85k texts, 4,190 labels
    python benchmarks/make_synthetic.py --texts 2000 --labels 300 --out small.jsonl
    python benchmarks/make_synthetic.py --shape amazon-670k --out runs/amazon670k.jsonl   # 100k texts, 670k labels

The defaults match a short-text set of 68k training texts (85k with the 20% test split) of about
15 words, 4,190 labels, 6.9 labels a text, label frequencies following a power law. Each label has a
few words that signal it; a text holds one or two of them for each of its labels (each kept with
probability --signal), the rest is background words drawn by Zipf's law. So a model can learn it, a
label-prior predictor cannot, and its P@5 ceiling is below 100.

`--shape amazon-670k` is Amazon-670K's label space on as many documents as a 24 GiB machine holds:
670,091 labels, 100k texts of about 100 words. With `--min-docs N` every label is given to at least
N texts (spread at random) besides the power-law draws, so that the labels seen in training are
most of the label space, as in Amazon-670K, whose labels nearly all have a few training documents.

Writes JSON lines ({"id", "text", "labels"}); `xmcnas-fast data show FILE` summarizes it.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

import numpy as np


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return w / w.sum()


#: Amazon-670K's label count, on 100k texts of about 100 words (the rest of its shape: --min-docs)
SHAPES = {"amazon-670k": {"texts": 100_000, "labels": 670_091, "per_text": 2.0, "words": 100, "vocab": 100_000,
                          "min_docs": 2}}


def spread_labels(texts: int, labels: int, min_docs: int, rng) -> list:
    """Each text's share of `min_docs` copies of every label, dealt at random (a list of arrays)."""
    if not min_docs:
        return [np.zeros(0, dtype=np.int64)] * texts
    dealt = np.tile(np.arange(labels, dtype=np.int64), min_docs)
    owner = rng.integers(0, texts, size=len(dealt))
    order = np.argsort(owner, kind="stable")
    return np.split(dealt[order], np.searchsorted(owner[order], np.arange(1, texts)))


def generate(texts: int, labels: int, per_text: float, words: int, vocab: int, signal: float, seed: int,
             min_docs: int = 0):
    """Yield (id, text, labels) of the synthetic set."""
    rng = np.random.default_rng(seed)
    label_cdf = np.cumsum(zipf_weights(labels, 0.9))
    background_cdf = np.cumsum(zipf_weights(vocab, 1.1))
    cues = rng.integers(0, vocab, size=(labels, 4))            # each label's signal words
    spread = spread_labels(texts, labels, min_docs, rng)

    def draw(cdf, n):
        return np.minimum(np.searchsorted(cdf, rng.random(n)), len(cdf) - 1)

    for i in range(texts):
        ys = np.unique(np.concatenate([draw(label_cdf, max(1, rng.poisson(per_text - 1) + 1)), spread[i]]))
        toks = []
        for y in ys:
            if rng.random() < signal:
                toks.extend(cues[y, rng.integers(0, 4, size=rng.integers(1, 3))].tolist())
        toks.extend(draw(background_cdf, max(0, int(rng.poisson(words)) - len(toks))).tolist())
        rng.shuffle(toks)
        yield f"s{i}", " ".join(f"w{t}" for t in toks) or "w0", [f"l{y}" for y in ys]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--texts", type=int, default=85_000, help="texts in all, train and test (default 85000)")
    p.add_argument("--labels", type=int, default=4_190, help="label count (default 4190)")
    p.add_argument("--per-text", type=float, default=6.9, help="mean labels a text (default 6.9)")
    p.add_argument("--words", type=float, default=15, help="mean words a text (default 15)")
    p.add_argument("--vocab", type=int, default=30_000, help="vocabulary size (default 30000)")
    p.add_argument("--signal", type=float, default=0.8,
                   help="chance that a label's signal words are in a text of it (default 0.8)")
    p.add_argument("--min-docs", type=int, default=0,
                   help="every label is given to at least this many texts, at random (default 0)")
    p.add_argument("--shape", choices=sorted(SHAPES),
                   help="a named shape: its values replace the defaults of the options above (those given win)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the JSON lines file to write")
    args = p.parse_args(argv)
    if args.shape:
        given = {a.split("=")[0].lstrip("-").replace("-", "_") for a in (sys.argv[1:] if argv is None else argv)
                 if a.startswith("--")}
        for k, v in SHAPES[args.shape].items():
            if k not in given:
                setattr(args, k, v)
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for ident, text, ys in generate(args.texts, args.labels, args.per_text, args.words, args.vocab,
                                        args.signal, args.seed, args.min_docs):
            f.write(json.dumps({"id": ident, "text": text, "labels": ys}) + "\n")
    os.replace(tmp, args.out)    # never a half-written file under the name asked for
    print(f"wrote {args.out}: {args.texts} texts, {args.labels} labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
