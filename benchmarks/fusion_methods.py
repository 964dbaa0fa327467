"""The fusions a search's result may be served with, on finished runs' final networks.

For each run directory given: its final network's validation and test scores, its lexical stages
(lexical.json: the search's for validation, the serving one for test), then the test P@1/3/5 of
  - the stage alone (its lists in their own order),
  - the weight grid chosen on validation,
  - the ranker fusion chosen on validation (lexical/ranker.py), with the network,
  - the same with the network's scores constant: what the ranker gives the stage without a network.

    python benchmarks/fusion_methods.py runs/s0 runs/s1 runs/s2
"""
import argparse
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from xmcnas_fast.bundle import load_bundle  # noqa: E402
from xmcnas_fast.ensemble import split_probs  # noqa: E402
from xmcnas_fast.lexical.fusion import Fusion, LexicalLists, fused_metrics, lists_metrics  # noqa: E402
from xmcnas_fast.lexical.ranker import label_counts  # noqa: E402
from xmcnas_fast.search import load_data  # noqa: E402

ARMS = ("stage alone", "weight", "ranker", "ranker, no network")


def run_scores(run: str) -> tuple:
    """(data, lists, logits, prior) of a finished run: its data, its stages' top lists (LexicalLists: the
    search's stage for validation, the serving one for test), its final network's logits on the validation
    and test splits, each label's log(1 + training count)."""
    with open(os.path.join(run, "config.json")) as f:
        cfg = json.load(f)
    with open(os.path.join(run, "lexical.json")) as f:
        lex = json.load(f)
    with open(os.path.join(run, "final.json")) as f:
        model_dir = json.load(f)["model_dir"]
    data = load_data(cfg["data"])
    lists = LexicalLists.from_stage(lex["folder"], serving=lex.get("serving"))
    b = load_bundle(model_dir)
    cpu = torch.device("cpu")
    logits = {s: torch.logit(split_probs(b.model, getattr(data, s), data.num_labels, device=cpu, precision=b.precision,
                                         max_len=b.max_len).clamp(1e-6, 1 - 1e-6)) for s in ("valid", "test")}
    return data, lists, logits, label_counts(data.train.labels, data.num_labels)


def run_figures(run: str) -> dict:
    data, lists, logits, prior = run_scores(run)
    out = {"stage alone": lists_metrics(lists.test, data.test.labels, data.num_labels)}
    for arm, methods, constant in (("weight", ("weighted",), False), ("ranker", ("weighted", "ranker"), False),
                                   ("ranker, no network", ("weighted", "ranker"), True)):
        z = {s: torch.zeros_like(v) if constant else v for s, v in logits.items()}
        chosen = fused_metrics(z["valid"], lists.valid, data.valid.labels, None, methods=methods, prior=prior)
        fusion = Fusion.from_dict(chosen["fusion"])
        out[arm] = {**fused_metrics(z["test"], lists.test, data.test.labels, None, fusion=fusion),
                    "chosen": fusion.method}
    return out


def report(doc: str, figures_of, arms: tuple, baseline=lambda arm: "stage alone") -> int:
    """The command line of a script over finished runs: each run's figures_of(run) {arm: metrics} printed,
    then each arm's mean and its P@1 over its baseline arm's."""
    ap = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("runs", nargs="+", help="finished search run directories (with final.json and lexical.json)")
    ap.add_argument("--out", help="write every run's figures to this JSON file")
    args = ap.parse_args()
    figures = {}
    for run in args.runs:
        figures[run] = figures_of(run)
        print(run + ": " + "; ".join(f"{arm} {' / '.join(f'{100 * figures[run][arm][k]:.2f}' for k in ('P@1', 'P@3', 'P@5'))}"
                                     + (f" ({figures[run][arm]['chosen']})" if "chosen" in figures[run][arm] else "")
                                     for arm in arms), flush=True)
    mean = {arm: np.mean([[100 * f[arm][k] for k in ("P@1", "P@3", "P@5")] for f in figures.values()], axis=0)
            for arm in arms}
    width = max(len(a) for a in arms)
    for arm in arms:
        gain = mean[arm][0] - mean[baseline(arm)][0]
        print(f"mean of {len(figures)}: {arm:{width}s} {' / '.join(f'{v:.2f}' for v in mean[arm])}   "
              f"P@1 over {baseline(arm)} {gain:+.2f}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(figures, f, indent=1)
    return 0


def main() -> int:
    return report(__doc__, run_figures, ARMS)


if __name__ == "__main__":
    raise SystemExit(main())
