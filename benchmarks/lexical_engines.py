"""Which label-tree library for the lexical stage? napkinXC's PLT (with its defaults, and with the
settings the stage uses), its one-vs-rest model and the two averaged (the stage where labels are
few), against omikuji (Parabel, 1 and 3 trees), on the same TF-IDF uni+bigram
features of the same split, test P@1/3/5 and the seconds to fit and to predict.

    pip install omikuji      # not a dependency of the tool: only this comparison needs it
    python benchmarks/lexical_engines.py [--dataset debtags] [--threads 2] [--out engines.json]

omikuji trains from a file in the Extreme Classification Repository's format (written here to a
temporary folder) and predicts one document at a time; napkinXC fits and predicts scipy matrices.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)


def napkinxc_arm(settings, engines=("plt",)):
    """The stage's models: a tree, a one-vs-rest model ("br"), or both with their top lists averaged."""
    def run(X, Y, Xt, k, threads, folder):
        from xmcnas_fast.lexical import LabelTree
        from xmcnas_fast.lexical.tree import average_lists

        t0 = time.monotonic()
        models = [LabelTree(os.path.join(folder, e), settings, threads=threads, engine=e).fit(X, Y) for e in engines]
        fit = time.monotonic() - t0
        t0 = time.monotonic()
        lists = [m.topk(Xt, k) for m in models]
        ids, probs = lists[0] if len(lists) == 1 else average_lists(*lists, k)
        return ids, probs, fit, time.monotonic() - t0
    return run


def napkinxc_defaults(X, Y, Xt, k, threads, folder):
    from napkinxc.models import PLT

    from xmcnas_fast.lexical.tree import label_lists

    t0 = time.monotonic()
    m = PLT(folder, seed=0, threads=threads)
    m.fit(X, label_lists(Y))
    fit = time.monotonic() - t0
    t0 = time.monotonic()
    ids = np.full((Xt.shape[0], k), -1)
    probs = np.zeros((Xt.shape[0], k), dtype=np.float32)
    for i, row in enumerate(m.predict_proba(Xt, top_k=k)):
        ids[i, : len(row)] = [a for a, _ in row]
        probs[i, : len(row)] = [b for _, b in row]
    return ids, probs, fit, time.monotonic() - t0


def omikuji_arm(n_trees):
    def run(X, Y, Xt, k, threads, folder):
        import omikuji

        path = os.path.join(folder, "train.xc")
        with open(path, "w") as f:
            f.write(f"{X.shape[0]} {X.shape[1]} {Y.shape[1]}\n")
            for i in range(X.shape[0]):
                labels = ",".join(map(str, Y.indices[Y.indptr[i]:Y.indptr[i + 1]]))
                a, b = X.indptr[i], X.indptr[i + 1]
                f.write(labels + " " + " ".join(f"{j}:{v:.6g}" for j, v in zip(X.indices[a:b], X.data[a:b])) + "\n")
        hp = omikuji.Model.default_hyper_param()
        hp.n_trees = n_trees
        t0 = time.monotonic()
        model = omikuji.Model.train_on_data(path, hp, n_threads=threads)
        fit = time.monotonic() - t0
        t0 = time.monotonic()
        ids = np.full((Xt.shape[0], k), -1)
        probs = np.zeros((Xt.shape[0], k), dtype=np.float32)
        for i in range(Xt.shape[0]):
            a, b = Xt.indptr[i], Xt.indptr[i + 1]
            row = model.predict(list(zip(Xt.indices[a:b].tolist(), Xt.data[a:b].tolist())), top_k=k)
            ids[i, : len(row)] = [x for x, _ in row]
            probs[i, : len(row)] = [y for _, y in row]
        return ids, probs, fit, time.monotonic() - t0
    return run


def main(argv=None) -> int:
    from xmcnas_fast.data import load
    from xmcnas_fast.lexical import NgramTfidf, TreeSettings, dense_lexical
    from xmcnas_fast.metrics import compute_metrics

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", default="debtags")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", help="write the figures here (JSON)")
    args = p.parse_args(argv)
    data = load(args.dataset, max_len=None)
    feats = NgramTfidf(len(data.vocab)).fit(data.train.token_ids, data.train.offsets)
    X = feats.transform(data.train.token_ids, data.train.offsets)
    Xt = feats.transform(data.test.token_ids, data.test.offsets)
    arms = {"napkinXC PLT, library defaults": napkinxc_defaults,
            "napkinXC PLT, the stage's settings": napkinxc_arm(TreeSettings()),
            "napkinXC PLT, the stage's settings, 3 trees": napkinxc_arm(TreeSettings(ensemble=3)),
            "napkinXC one-vs-rest (BR), the stage's settings": napkinxc_arm(TreeSettings(), ("br",)),
            "the stage with --lexical-ovr on: PLT and one-vs-rest averaged": napkinxc_arm(TreeSettings(), ("plt", "br"))}
    try:
        import omikuji  # noqa: F401
        arms.update({"omikuji Parabel, 1 tree": omikuji_arm(1), "omikuji Parabel, 3 trees": omikuji_arm(3)})
    except ImportError:
        print("omikuji is not installed: its arms are left out (pip install omikuji)", file=sys.stderr)
    print(f"{args.dataset}: {X.shape[0]} training documents, {X.shape[1]} features, {data.num_labels} labels")
    print("| engine | P@1 | P@3 | P@5 | fit s | predict s |\n|---|---|---|---|---|---|")
    results = {}
    for name, run in arms.items():
        with tempfile.TemporaryDirectory() as folder:
            ids, probs, fit, pred = run(X, data.train.labels, Xt, 5, args.threads, folder)
        m = compute_metrics(dense_lexical(ids, probs, data.num_labels, "cpu")[0], data.test.labels)
        results[name] = {**{k: m[k] for k in ("P@1", "P@3", "P@5")}, "fit_s": fit, "predict_s": pred}
        print(f"| {name} | {100 * m['P@1']:.2f} | {100 * m['P@3']:.2f} | {100 * m['P@5']:.2f} | {fit:.0f} | {pred:.1f} |",
              flush=True)
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump(results, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
