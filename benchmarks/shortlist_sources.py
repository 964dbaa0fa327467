"""Where a shortlist's candidates come from, side by side on one dataset: the stage fitted with each
candidate model and each source of the training split's lists, its fitting time by part and the
shortlist's recall (the share of true labels it holds) per split.

    python benchmarks/shortlist_sources.py --dataset debtags --k 100
    python benchmarks/shortlist_sources.py --dataset runs/amazon670k.jsonl --k 1000 --sources centroids/own

Sources: tree/crossfit (the tree; the training split's lists from trees fitted on the other of 2 folds:
what the stage does up to lexical.stage.LARGE_LABELS labels), tree/own and centroids/own (the training
split's lists from the stage's own model, which saw those documents: above it, with centroids). Each
stage is fitted in a temporary folder, never the cache. Times are wall seconds on whatever else the
machine runs: compare them only within one run.
"""
from __future__ import annotations

import argparse
import tempfile
import time

SOURCES = ("tree/crossfit", "tree/own", "centroids/own")


def main(argv=None) -> int:
    from xmcnas_fast.data import load
    from xmcnas_fast.lexical import LexicalSettings, fit_stage, stage_data
    from xmcnas_fast.lexical import stage as stage_module
    from xmcnas_fast.lexical.shortlist import shortlist_recall

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="debtags")
    p.add_argument("--valid", type=float, default=1000, help="validation texts (a fraction below 1)")
    p.add_argument("--k", type=int, default=100, help="shortlist size")
    p.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated, of {', '.join(SOURCES)}")
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    sources = args.sources.split(",")
    for s in sources:
        if s not in SOURCES:
            p.error(f"--sources: {s!r} is not one of {', '.join(SOURCES)}")
    valid = int(args.valid) if args.valid >= 1 else args.valid
    data = stage_data(load(args.dataset, max_len=None, valid=valid))
    print(f"{data.name}: {data.num_labels:,} labels, {len(data.train):,} / {len(data.valid):,} / "
          f"{len(data.test):,} texts; shortlists of {args.k}")
    print("| source | fit (s) | recall train | recall valid | recall test |\n|---|---|---|---|---|")
    for source in sources:
        matcher, lists = source.split("/")
        settings = LexicalSettings(shortlist=args.k, matcher=matcher)
        saved = stage_module.LARGE_LABELS
        stage_module.LARGE_LABELS = -1 if lists == "own" else 10 ** 12     # the training lists' switch
        parts = []
        try:
            with tempfile.TemporaryDirectory() as tmp:
                t0 = time.monotonic()
                stage = fit_stage(data, f"{tmp}/stage", settings, threads=args.threads, log=parts.append)
                seconds = time.monotonic() - t0
                recall = [shortlist_recall(stage.split_shortlist(s), getattr(data, s).labels)
                          for s in ("train", "valid", "test")]
        finally:
            stage_module.LARGE_LABELS = saved
        print(f"| {source} | {seconds:.0f} | " + " | ".join(f"{100 * r:.2f} %" for r in recall) + " |")
        for line in parts:
            print(f"    {line}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
