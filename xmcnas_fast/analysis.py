"""Operation-importance analysis of a search (XMC-NAS, section 4).

Over a search's history: the learned layer-sum weights averaged by operation
type and by position (does the node read the embedding?), the mean validation
P@5 by number of layers, and the best architectures drawn with their weights.
Weights are compared raw and as a share of the candidate's total |w|
(candidates differ in depth, so shares compare better across them).

This module computes and writes files; `xmcnas-fast analyze` (cli/cmd_inspect.py) shows it.
"""
from __future__ import annotations

import os
import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Optional

from .fitness import ranked
from .space import OPERATIONS, Genotype

PLOT_INSTALL_HINT = "PNG plots need matplotlib: pip install 'xmcnas-fast[plot]'"


def _mean(xs):
    return statistics.fmean(xs) if xs else None


def node_weights(records: list) -> list:
    """One row per node of every successful weighted-sum candidate:
    (candidate id, node, operation, input, weight, share of the candidate's total |w|, fitness)."""
    rows = []
    for r in records:
        w = r.get("layer_weights")
        if r.get("fitness") is None or not w or r.get("reused_from") is not None:
            continue
        g = Genotype.from_dict(r["genotype"])
        total = sum(abs(x) for x in w) or 1.0
        for j, ((op, i), x) in enumerate(zip(g.nodes, w), start=1):
            rows.append({"id": r["id"], "node": j, "op": op, "input": i, "weight": x,
                         "share": abs(x) / total, "fitness": r["fitness"]})
    return rows


def operation_importance(records: list) -> dict:
    rows = node_weights(records)
    by_op = {}
    for op in OPERATIONS:
        sel = [x for x in rows if x["op"] == op]
        by_op[op] = {"nodes": len(sel), "mean_weight": _mean([x["weight"] for x in sel]),
                     "mean_share": _mean([x["share"] for x in sel]),
                     "mean_fitness": _mean([x["fitness"] for x in sel])}
    by_input = {}
    for name, pred in (("reads the embedding", lambda x: x["input"] == 0),
                       ("reads another node", lambda x: x["input"] != 0)):
        sel = [x for x in rows if pred(x)]
        by_input[name] = {"nodes": len(sel), "mean_weight": _mean([x["weight"] for x in sel]),
                          "mean_share": _mean([x["share"] for x in sel])}
    depth = defaultdict(list)
    for r in records:
        if r.get("fitness") is not None and r.get("reused_from") is None:
            depth[Genotype.from_dict(r["genotype"]).depth].append(r["fitness"])
    by_depth = {d: {"candidates": len(f), "mean_p5": _mean(f), "best_p5": max(f)} for d, f in sorted(depth.items())}
    return {"by_operation": by_op, "by_input": by_input, "by_depth": by_depth, "nodes": len(rows)}


def inheritance(records: list) -> dict:
    """Children trained from their parent's weights against children trained from scratch: how many
    reached their parent's validation P@5, the median steps that took, their mean validation P@5."""
    children = [r for r in records if r.get("parent") is not None and r.get("reused_from") is None
                and r.get("fitness") is not None]
    groups = {"inherited": [r for r in children if (r.get("inherited") or {}).get("parts")],
              "from scratch": [r for r in children if not (r.get("inherited") or {}).get("parts")]}
    out = {}
    for name, group in groups.items():
        reached = [r["steps_to_parent"] for r in group if r.get("steps_to_parent") is not None]
        out[name] = {"children": len(group), "reached": len(reached),
                     "median_steps": statistics.median(reached) if reached else None,
                     "mean_p5": _mean([r["fitness"] for r in group])}
    return out


def to_dot(g: Genotype, weights: Optional[list] = None, title: str = "") -> str:
    """Graphviz DOT of an architecture: embedding -> nodes -> merge, edges labelled with merge weights."""
    lines = ["digraph architecture {", "  rankdir=LR;", f'  label="{title}";', '  node [shape=box];',
             '  n0 [label="embedding", shape=ellipse];']
    for j, (op, i) in enumerate(g.nodes, start=1):
        lines.append(f'  n{j} [label="{j}: {op}"];')
        lines.append(f"  n{i} -> n{j};")
    merge = "weighted sum" if g.merge == "sum" else "concat"
    lines.append(f'  merge [label="{merge}", shape=ellipse];')
    for j in range(1, g.depth + 1):
        lab = f' [label="{weights[j - 1]:+.3f}"]' if weights else ""
        lines.append(f"  n{j} -> merge{lab};")
    lines.append('  head [label="label-wise attention + FC", shape=ellipse];')
    lines.append("  merge -> head;")
    lines.append("}")
    return "\n".join(lines) + "\n"


@dataclass
class RunAnalysis:
    """What `analyze` computes of a search's history: the operation importance (by operation, by
    position, by depth), the children that inherited weights against those that did not, and the
    best candidates (fitness.ranked order, reused ones left out)."""

    importance: dict
    inheritance: dict
    best: list               # history records, best first
    recorded: int            # candidates in the history


def analyze(records: list) -> RunAnalysis:
    """The analysis of a search's history records (no files, no display)."""
    best = [r for r in ranked(records) if r.get("reused_from") is None]
    return RunAnalysis(operation_importance(records), inheritance(records), best, len(records))


def analyze_run(path: str) -> RunAnalysis:
    """The analysis of the search in `path`; RunError when no candidate has finished successfully."""
    from .runs import Run, RunError

    records = Run.open(path).history.records
    result = analyze(records)
    if not result.best:
        raise RunError(f"{path}: no candidate has finished successfully "
                       f"({len(records)} recorded): nothing to analyze yet")
    return result


def write_dot_files(result: RunAnalysis, out_dir: str, top: int) -> list:
    """A Graphviz DOT file of each of the `top` best architectures in `out_dir`; their paths."""
    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for rank, r in enumerate(result.best[:top], start=1):
        path = os.path.join(out_dir, f"top{rank}-cand{r['id']}.dot")
        title = f"candidate {r['id']}, P@5 {100 * r['fitness']:.2f}"
        with open(path, "w") as f:
            f.write(to_dot(Genotype.from_dict(r["genotype"]), r.get("layer_weights"), title))
        paths.append(path)
    return paths


def write_plots(records: list, result: RunAnalysis, out_dir: str) -> Optional[str]:
    """importance.png in `out_dir` (weight share by operation; fitness by candidate, with the best so
    far); None, and nothing written, without matplotlib (PLOT_INSTALL_HINT says what to install)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    imp = result.importance
    os.makedirs(out_dir, exist_ok=True)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    ops = [op for op, v in imp["by_operation"].items() if v["nodes"]]
    axes[0].bar(ops, [100 * imp["by_operation"][op]["mean_share"] for op in ops])
    axes[0].set_ylabel("mean share of |w| (%)")
    axes[0].set_title("learned layer-sum weight by operation")
    axes[0].tick_params(axis="x", rotation=45)
    xs = [r["id"] for r in records if r.get("fitness") is not None]
    ys = [100 * r["fitness"] for r in records if r.get("fitness") is not None]
    best, run_best = [], float("-inf")
    for y in ys:
        run_best = max(run_best, y)
        best.append(run_best)
    axes[1].scatter(xs, ys, s=10, label="candidate")
    axes[1].plot(xs, best, color="C1", label="best so far")
    axes[1].set_xlabel("candidate")
    axes[1].set_ylabel("validation P@5 (%)")
    axes[1].legend()
    fig.tight_layout()
    path = os.path.join(out_dir, "importance.png")
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
