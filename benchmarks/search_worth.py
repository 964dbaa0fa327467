"""Is the search worth it? Evolution against random search (and other arms) at the same budget, over
several seeds: the mean and spread of the best candidate's validation and test P@5, of the final
model's, and of the wall time; whether the difference is within the noise.

    python benchmarks/search_worth.py --seeds 0 1 2                      # demo budget, debtags
    python benchmarks/search_worth.py --arms evolution,evolution-noinherit,evolution-fidelity \\
        --seeds 0 1 2 --set search.fidelity=200 --out worth.json

An arm is a strategy with options: evolution, random, and evolution-noinherit /
evolution-fidelity (inheritance off; short runs first, --set search.fidelity=STEPS), and for the
lexical stage evolution-nolexical (no stage: the network alone, fitted and served) / evolution-network
(fitness from the network alone, the result fused) / evolution-residual (networks trained against the
lexical model's residual). The test figures are those of the model a search
serves: fused with the lexical stage when it used one. Every run is a
normal search directory under --runs-dir, so `xmcnas-fast analyze` reads each one.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's package and in-place build
    sys.path.insert(0, ROOT)

#: each arm's settings over the budget's
ARMS = {
    "evolution": {"search": {"strategy": "evolution"}},
    "random": {"search": {"strategy": "random"}},
    "evolution-noinherit": {"search": {"strategy": "evolution", "inherit": False}},
    "evolution-inherit": {"search": {"strategy": "evolution", "inherit": True}},
    "evolution-fidelity": {"search": {"strategy": "evolution", "fidelity": 200}},
    "evolution-nolexical": {"search": {"strategy": "evolution"}, "lexical": {"enabled": False}},
    "evolution-residual": {"search": {"strategy": "evolution"}, "lexical": {"mode": "residual"}},
    "evolution-network": {"search": {"strategy": "evolution"}, "lexical": {"fitness": "network"}},
}
FIGURES = ("best valid P@5", "best test P@5", "final valid P@5", "final test P@5", "result test P@1",
           "result test P@3", "result test P@5", "result network test P@1", "lexical test P@1", "lexical test P@3",
           "lexical test P@5", "seconds")


def parse_set(items: list) -> dict:
    """--set section.key=JSON values as make_config overrides."""
    out: dict = {}
    for item in items:
        key, _, value = item.partition("=")
        section, _, name = key.partition(".")
        if not name or not _:
            raise SystemExit(f"--set {item!r}: expected section.key=value, e.g. search.cycles=4")
        try:
            out.setdefault(section, {})[name] = json.loads(value)
        except json.JSONDecodeError:
            out.setdefault(section, {})[name] = value
    return out


def merged(*overrides: dict) -> dict:
    out: dict = {}
    for o in overrides:
        for section, values in o.items():
            out.setdefault(section, {}).update(values)
    return out


def figures_of(run) -> dict:
    """What one finished search scored: its best candidate (by the budget its figure comes from, then
    validation P@5) and its final model, P@5 on validation and test, and children's steps to their
    parent's validation P@5."""
    from xmcnas_fast.fitness import ranked

    records = {r["id"]: r for r in run.history.records}
    best = (ranked(records) or [{}])[0]
    final = run.final() or {}
    children = [r for r in records.values() if r.get("parent") is not None and r.get("reused_from") is None]
    reached = [r["steps_to_parent"] for r in children if r.get("steps_to_parent") is not None]
    ensemble = run.ensemble() or {}
    # what best.json names, the search's answer: the ensemble if one was kept, else the final model if
    # chosen, else the best candidate
    result = ensemble if ensemble.get("chosen") else final if final.get("chosen") else best
    served = {r: (x.get("fused") or {}).get("test") or x.get("test") or {} for r, x in
              (("best", best), ("final", final), ("result", result))}     # fused, when the search fused
    lexical = (run.lexical() or {}).get("test") or {}
    return {"best valid P@5": best.get("fitness"), "best test P@5": served["best"].get("P@5"),
            "final valid P@5": final.get("fitness"), "final test P@5": served["final"].get("P@5"),
            **{f"result test P@{k}": served["result"].get(f"P@{k}") for k in (1, 3, 5)},
            "result network test P@1": (result.get("test") or {}).get("P@1"),
            **{f"lexical test P@{k}": lexical.get(f"P@{k}") for k in (1, 3, 5)}, "final chosen": final.get("chosen"),
            "ensemble": ensemble.get("members") if ensemble.get("chosen") else None,
            "candidates": len(records),
            "best id": best.get("id"), "children": len(children), "children reaching parent": len(reached),
            "median steps to parent": statistics.median(reached) if reached else None}


def run_arm(arm: str, seed: int, args, extra: dict) -> dict:
    from xmcnas_fast.runs import Run
    from xmcnas_fast.config import make_config
    from xmcnas_fast.search import run_search

    cfg = make_config(args.budget, dataset=args.dataset,
                      overrides=merged(ARMS[arm], extra, {"search": {"seed": seed}}))
    path = os.path.join(args.runs_dir, f"{arm}-seed{seed}")
    run = Run.open(path) if os.path.exists(os.path.join(path, "config.json")) else Run.create(path, cfg)
    t0 = time.monotonic()
    run.lock()
    try:
        run_search(run, backend=args.backend, devices=args.devices)
    finally:
        run.unlock()
    return {"arm": arm, "seed": seed, "run": path, "seconds": round(time.monotonic() - t0, 1), **figures_of(run)}


def mean_sd(xs: list) -> tuple:
    xs = [x for x in xs if x is not None]
    if not xs:
        return None, None
    return statistics.fmean(xs), (statistics.stdev(xs) if len(xs) > 1 else 0.0)


def summary(results: list) -> dict:
    """Per arm and figure: (mean, standard deviation) over its seeds."""
    arms = list(dict.fromkeys(r["arm"] for r in results))
    return {a: {f: mean_sd([r[f] for r in results if r["arm"] == a]) for f in FIGURES} for a in arms}


def verdict(results: list, a: str, b: str, figure: str) -> str:
    """One plain sentence: is arm a's mean ahead of arm b's by more than the noise (two standard
    errors of the difference of the means)?"""
    xa = [r[figure] for r in results if r["arm"] == a and r[figure] is not None]
    xb = [r[figure] for r in results if r["arm"] == b and r[figure] is not None]
    if len(xa) < 2 or len(xb) < 2:
        return f"{figure}: too few seeds to tell {a} from {b} (at least 2 each)"
    diff = statistics.fmean(xa) - statistics.fmean(xb)
    se = math.sqrt(statistics.variance(xa) / len(xa) + statistics.variance(xb) / len(xb))
    within = abs(diff) <= 2 * se
    return (f"{figure}: {a} - {b} = {100 * diff:+.2f} points, two standard errors {100 * 2 * se:.2f}: "
            + ("within the noise" if within else f"{a if diff > 0 else b} is ahead beyond the noise"))


def table(results: list) -> str:
    rows = ["| arm | seeds | " + " | ".join(FIGURES) + " |", "|---|---|" + "---|" * len(FIGURES)]
    for arm, figs in summary(results).items():
        n = sum(1 for r in results if r["arm"] == arm)
        cells = []
        for f in FIGURES:
            m, sd = figs[f]
            scale = 1 if f == "seconds" else 100
            cells.append("-" if m is None else f"{scale * m:.2f} ± {scale * sd:.2f}")
        rows.append(f"| {arm} | {n} | " + " | ".join(cells) + " |")
    return "\n".join(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--arms", default="evolution,random", help=f"comma-separated, of {', '.join(ARMS)}")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="search seeds (default 0 1 2)")
    p.add_argument("--budget", default="demo", choices=["demo", "paper"])
    p.add_argument("--dataset", default="debtags")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="a setting over the budget's for every arm, e.g. search.cycles=4 or final.enabled=false")
    p.add_argument("--backend", default=None, help="local (default), inline or ray")
    p.add_argument("--devices", default=None, help="as search --devices")
    p.add_argument("--runs-dir", default="runs/worth", help="where the runs go (a finished one is reused)")
    p.add_argument("--out", help="write every run's figures and the summary here (JSON)")
    args = p.parse_args(argv)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    unknown = [a for a in arms if a not in ARMS]
    if unknown:
        p.error(f"unknown arm(s) {', '.join(unknown)}; expected some of {', '.join(ARMS)}")
    extra = parse_set(args.set)
    results = []
    for seed in args.seeds:          # seeds outermost: an interrupted benchmark still compares the arms
        for arm in arms:
            results.append(run_arm(arm, seed, args, extra))
            print(json.dumps(results[-1]), flush=True)
    print(table(results))
    for other in arms[1:]:
        for f in ("best valid P@5", "best test P@5", "final test P@5", "result test P@5"):
            print(verdict(results, arms[0], other, f))
    if args.out:
        with open(args.out, "w", encoding="utf-8") as f:
            json.dump({"settings": vars(args), "results": results,
                       "summary": summary(results)}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
