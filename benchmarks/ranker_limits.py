"""What limits the ranker fusion, on finished runs' final networks: its features, or its data.

For each run directory given, its final network's validation and test logits and its stages' lists
(as fusion_methods.py), then the test P@1/3/5 of
  - the stage alone, and the ranker as it is served (lexical/ranker.py), fitted on the validation split;
  - the same ranker with more inputs per (document, label) pair:
      relative:  the network's logit minus the document's top logit, the stage's probability minus its top;
      document:  each model's top probability and probability sum, how many labels tie at the stage's top;
      apart:     the label tree's and the one-vs-rest model's probabilities (the stage averages them);
  - more documents to fit on: the test split halved at random, every ranker scored on the second half,
    fitted on the validation split alone, or with 1,000 or 3,000 documents of the first half added
    (their lists the serving stage's, as the second half's are; no cap on the pairs).

    python benchmarks/ranker_limits.py runs/s0 runs/s1 runs/s2
"""
import json
import os
import sys

import numpy as np
import torch

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from fusion_methods import report, run_scores  # noqa: E402
from xmcnas_fast.lexical import ranker as R  # noqa: E402
from xmcnas_fast.lexical.fusion import dense_lexical, lists_metrics  # noqa: E402
from xmcnas_fast.lexical.stage import LexicalStage, serving_data, stage_data  # noqa: E402
from xmcnas_fast.metrics import compute_metrics  # noqa: E402

EXTRAS = {"relative": ("z_gap", "p_gap"), "document": ("p_net_top", "p_lex_top", "p_net_sum", "p_lex_sum", "ties"),
          "apart": ("p_tree", "p_ovr")}
ARMS = ("stage alone", "ranker", *(f"ranker + {k}" for k in EXTRAS),
        "half: stage alone", "half: ranker", "half: + 1,000 documents", "half: + 3,000 documents")
ADDED = {"half: ranker": 0, "half: + 1,000 documents": 1000, "half: + 3,000 documents": 3000}


def part_lists(run: str, data) -> dict:
    """{split: (tree's lists, one-vs-rest model's lists)}: validation from the search's stage, test from
    the serving one, each as deep as the stage's own lists."""
    with open(os.path.join(run, "lexical.json")) as f:
        lex = json.load(f)
    out = {}
    for split, folder, source in (("valid", lex["folder"], stage_data(data)),
                                  ("test", lex.get("serving") or lex["folder"], serving_data(data))):
        stage = LexicalStage.load(folder)
        if stage.ovr is None:
            raise SystemExit(f"{folder}: the stage has no one-vs-rest model to take apart")
        rows = getattr(source, split)
        X = stage.features.transform(rows.token_ids, rows.offsets)
        out[split] = tuple(m.topk(X, stage.settings.list_k) for m in (stage.tree, stage.ovr))
    return out


def split_pairs(z, lists, parts, truth, prior) -> dict:
    """The split's candidate mask [n, L], served features [n, L, F], every extra input [n, L] and truth."""
    cpu = torch.device("cpu")
    num_labels = z.shape[1]
    p_lex, listed = dense_lexical(*lists, num_labels, cpu)
    cand, feats = R.pair_features(z, p_lex, listed, R.lexical_ranks(lists[0], num_labels, cpu), prior)
    p_net = torch.sigmoid(z)
    top_z, top_p = z.max(1, keepdim=True).values, p_lex.max(1, keepdim=True).values
    per_doc = lambda v: v.expand_as(z)
    extra = {"z_gap": z - top_z, "p_gap": p_lex - top_p, "p_net_top": per_doc(torch.sigmoid(top_z)),
             "p_lex_top": per_doc(top_p), "p_net_sum": per_doc(p_net.sum(1, keepdim=True)),
             "p_lex_sum": per_doc(p_lex.sum(1, keepdim=True)),
             "ties": per_doc(((p_lex >= top_p - 1e-6) & (listed > 0)).float().sum(1, keepdim=True)),
             "p_tree": dense_lexical(*parts[0], num_labels, cpu)[0], "p_ovr": dense_lexical(*parts[1], num_labels, cpu)[0]}
    return {"cand": cand, "feats": feats, "extra": extra, "truth": truth}


def pairs_of(s: dict, names: tuple, rows=None) -> tuple:
    """(features [P, F + len(names)], targets [P]) of the candidate pairs of `rows` (all by default)."""
    pick = (lambda t: t) if rows is None else (lambda t: t[rows])
    cand = pick(s["cand"])
    x = torch.cat([pick(s["feats"])] + [pick(s["extra"][n]).unsqueeze(-1) for n in names], -1)[cand]
    return x, pick(s["truth"])[cand]


def scored(fitted, s: dict, names: tuple, rows=None) -> torch.Tensor:
    """[n, L] the ranker's scores of the candidate pairs of `rows`, 0 elsewhere."""
    cand = s["cand"] if rows is None else s["cand"][rows]
    out = torch.zeros(cand.shape)
    out[cand] = R.pair_scores(fitted, pairs_of(s, names, rows)[0])
    return out


def p135(scores, truth_csr) -> dict:
    m = compute_metrics(scores, truth_csr)
    return {k: m[k] for k in ("P@1", "P@3", "P@5")}


def p135_lists(lists: tuple, truth_csr, num_labels: int) -> dict:
    """The stage alone: its lists ranked in their own order."""
    m = lists_metrics(lists, truth_csr, num_labels)
    return {k: m[k] for k in ("P@1", "P@3", "P@5")}


def run_figures(run: str) -> dict:
    data, lists, logits, prior = run_scores(run)
    parts = part_lists(run, data)
    prior = torch.as_tensor(prior, dtype=torch.float32)
    num_labels = data.num_labels
    v, t = ({**split_pairs(logits[s], getattr(lists, s), parts[s], R.dense_truth(getattr(data, s).labels, num_labels, "cpu"),
                           prior), "labels": getattr(data, s).labels} for s in ("valid", "test"))
    out = {"stage alone": p135_lists(lists.test, t["labels"], num_labels)}
    for arm, names in (("ranker", ()), *((f"ranker + {k}", n) for k, n in EXTRAS.items())):
        out[arm] = p135(scored(R.fit_pairs(*pairs_of(v, names)), t, names), t["labels"])
    n = t["truth"].shape[0]
    perm = torch.from_numpy(np.random.default_rng(0).permutation(n))
    first, second = perm[: n // 2], perm[n // 2:]
    truth_second = t["labels"][second.numpy()]
    out["half: stage alone"] = p135_lists(tuple(np.asarray(a)[second.numpy()] for a in lists.test), truth_second, num_labels)
    cap, R.MAX_PAIRS = R.MAX_PAIRS, 1 << 40
    try:
        for arm, added in ADDED.items():
            xv, yv = pairs_of(v, ())
            if added:
                xa, ya = pairs_of(t, (), first[:added])
                xv, yv = torch.cat([xv, xa]), torch.cat([yv, ya])
            out[arm] = p135(scored(R.fit_pairs(xv, yv), t, (), second), truth_second)
    finally:
        R.MAX_PAIRS = cap
    return out


def main() -> int:
    return report(__doc__, run_figures, ARMS, lambda arm: "half: stage alone" if arm.startswith("half") else "stage alone")


if __name__ == "__main__":
    raise SystemExit(main())
