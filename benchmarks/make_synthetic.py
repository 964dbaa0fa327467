"""A synthetic XMC dataset of a given shape, for checking a budget on data larger than debtags.

    python benchmarks/make_synthetic.py --out runs/synthetic.jsonl                 # 85k texts, 4,190 labels
    python benchmarks/make_synthetic.py --texts 2000 --labels 300 --out small.jsonl

The defaults match a short-text set of 68k training texts (85k with the 20% test split) of about
15 words, 4,190 labels, 6.9 labels a text, label frequencies following a power law. Each label has a
few words that signal it; a text holds one or two of them for each of its labels (each kept with
probability --signal), the rest is background words drawn by Zipf's law. So a model can learn it, a
label-prior predictor cannot, and its P@5 ceiling is below 100.

Writes JSON lines ({"id", "text", "labels"}); `xmcnas-fast data show FILE` summarizes it.
"""
from __future__ import annotations

import argparse
import json
import os

import numpy as np


def zipf_weights(n: int, exponent: float) -> np.ndarray:
    w = 1.0 / np.arange(1, n + 1) ** exponent
    return w / w.sum()


def generate(texts: int, labels: int, per_text: float, words: int, vocab: int, signal: float, seed: int):
    """Yield (id, text, labels) of the synthetic set."""
    rng = np.random.default_rng(seed)
    label_cdf = np.cumsum(zipf_weights(labels, 0.9))
    background_cdf = np.cumsum(zipf_weights(vocab, 1.1))
    cues = rng.integers(0, vocab, size=(labels, 4))            # each label's signal words

    def draw(cdf, n):
        return np.minimum(np.searchsorted(cdf, rng.random(n)), len(cdf) - 1)

    for i in range(texts):
        ys = np.unique(draw(label_cdf, max(1, rng.poisson(per_text - 1) + 1)))
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
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="the JSON lines file to write")
    args = p.parse_args(argv)
    tmp = args.out + ".tmp"
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(tmp, "w", encoding="utf-8") as f:
        for ident, text, ys in generate(args.texts, args.labels, args.per_text, args.words, args.vocab,
                                        args.signal, args.seed):
            f.write(json.dumps({"id": ident, "text": text, "labels": ys}) + "\n")
    os.replace(tmp, args.out)    # never a half-written file under the name asked for
    print(f"wrote {args.out}: {args.texts} texts, {args.labels} labels")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
