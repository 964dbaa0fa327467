"""Operation-importance analysis of a search (XMC-NAS, section 4).

Over a search's history: the learned layer-sum weights averaged by operation
type and by position (does the node read the embedding?), the mean validation
P@5 by number of layers, and the best architectures drawn with their weights.
Weights are compared raw and as a share of the candidate's total |w|
(candidates differ in depth, so shares compare better across them).
"""
from __future__ import annotations

import os
import shlex
import statistics
from collections import defaultdict
from typing import Optional

from rich.text import Text

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


def _fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:+.3f}"


def analyze_run(path: str, *, console, top: int = 3, out_dir: Optional[str] = None) -> dict:
    from rich.table import Table

    from .runs import Run, RunError

    run = Run.open(path)
    records = run.history.records
    ok = sorted((r for r in records if r.get("fitness") is not None and r.get("reused_from") is None),
                key=lambda r: (-(r.get("rung") or 0), -r["fitness"]))   # full-budget figures first
    if not ok:
        raise RunError(f"{path}: no candidate has finished successfully "
                       f"({len(records)} recorded): nothing to analyze yet")
    imp = operation_importance(records)
    out_dir = out_dir or os.path.join(run.path, "analysis")
    os.makedirs(out_dir, exist_ok=True)

    t = Table(title="learned layer-sum weight by operation")
    for c in ("operation", "nodes", "mean weight", "mean share of |w|", "mean P@5 of candidates"):
        t.add_column(c, justify="right" if c != "operation" else "left")
    for op, v in sorted(imp["by_operation"].items(), key=lambda kv: -(kv[1]["mean_share"] or -1)):
        t.add_row(op, str(v["nodes"]), _fmt(v["mean_weight"]), _fmt(v["mean_share"], True),
                  _fmt(v["mean_fitness"], True))
    console.print(t)

    t = Table(title="by position")
    for c in ("node", "nodes", "mean weight", "mean share of |w|"):
        t.add_column(c)
    for name, v in imp["by_input"].items():
        t.add_row(name, str(v["nodes"]), _fmt(v["mean_weight"]), _fmt(v["mean_share"], True))
    console.print(t)

    t = Table(title="validation P@5 by number of layers")
    for c in ("layers", "candidates", "mean P@5", "best P@5"):
        t.add_column(c, justify="right")
    for d, v in imp["by_depth"].items():
        t.add_row(str(d), str(v["candidates"]), _fmt(v["mean_p5"], True), _fmt(v["best_p5"], True))
    console.print(t)

    inh = inheritance(records)
    if any(v["children"] for v in inh.values()):
        t = Table(title="children: steps to reach their parent's validation P@5")
        for c in ("children", "number", "reached it", "median steps", "mean P@5"):
            t.add_column(c, justify="right" if c != "children" else "left")
        for name, v in inh.items():
            t.add_row(name, str(v["children"]), str(v["reached"]),
                      "-" if v["median_steps"] is None else f"{v['median_steps']:.0f}", _fmt(v["mean_p5"], True))
        console.print(t)
    imp["inheritance"] = inh

    for rank, r in enumerate(ok[:top], start=1):
        g = Genotype.from_dict(r["genotype"])
        test = r.get("test") or {}
        fused = r.get("fused")
        if fused:      # the figure that ranked it is the fused model's; its network alone beside it
            test = fused.get("test") or {}
        console.print(f"\n[bold]#{rank}[/bold] candidate {r['id']}: validation P@5 {_fmt(r['fitness'], True)}"
                      + (" fused with the lexical stage (the network alone: "
                         f"{_fmt((r.get('valid') or {}).get('P@5'), True)})" if fused else "")
                      + (f", test P@1/3/5 {_fmt(test.get('P@1'), True)}/{_fmt(test.get('P@3'), True)}/"
                         f"{_fmt(test.get('P@5'), True)}" if test else ""))
        console.print(g.draw(r.get("layer_weights")))
        dot = os.path.join(out_dir, f"top{rank}-cand{r['id']}.dot")
        with open(dot, "w") as f:
            f.write(to_dot(g, r.get("layer_weights"), f"candidate {r['id']}, P@5 {_fmt(r['fitness'], True)}"))
    _plots(records, imp, out_dir, console)
    if top >= 1:
        first = shlex.quote(os.path.join(out_dir, f"top1-cand{ok[0]['id']}"))
        console.print(f"\nDOT files of the best {min(top, len(ok))} in {out_dir}; render one with Graphviz:",
                      soft_wrap=True)
        console.print(f"  dot -Tpng {first}.dot -o {first}.png", soft_wrap=True)
    return imp


def _plots(records, imp, out_dir, console) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        console.print(Text(PLOT_INSTALL_HINT, style="dim"))
        return
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
    fig.savefig(os.path.join(out_dir, "importance.png"), dpi=120)
    plt.close(fig)
