"""`xmcnas-fast analyze` and `xmcnas-fast data show`: look at a search or a dataset."""
from __future__ import annotations

from .common import console, data_kwargs, load_data


def cmd_analyze(args) -> int:
    """Compute the analysis (analysis.py), write its DOT files and plots, and show it."""
    import os
    import shlex

    from rich.text import Text

    from ..analysis import PLOT_INSTALL_HINT, analyze_run, write_dot_files, write_plots
    from ..runs import Run

    out = console()
    result = analyze_run(args.run)
    out_dir = args.out or os.path.join(os.path.abspath(args.run), "analysis")
    for table in analysis_tables(result):
        out.print(table)
    dots = write_dot_files(result, out_dir, args.top)
    for rank, r in enumerate(result.best[: args.top], start=1):
        show_candidate(out, rank, r)
    if write_plots(Run.open(args.run).history.records, result, out_dir) is None:
        out.print(Text(PLOT_INSTALL_HINT, style="dim"))
    if dots:
        first = shlex.quote(dots[0][: -len(".dot")])
        out.print(f"\nDOT files of the best {len(dots)} in {out_dir}; render one with Graphviz:", soft_wrap=True)
        out.print(f"  dot -Tpng {first}.dot -o {first}.png", soft_wrap=True)
    return 0


def _fmt(x, pct=False):
    if x is None:
        return "-"
    return f"{100 * x:.2f}" if pct else f"{x:+.3f}"


def analysis_tables(result) -> list:
    """The analysis as Rich tables: by operation, by position, by depth, and (with children) inheritance."""
    from rich.table import Table

    imp, tables = result.importance, []
    t = Table(title="learned layer-sum weight by operation")
    for c in ("operation", "nodes", "mean weight", "mean share of |w|", "mean P@5 of candidates"):
        t.add_column(c, justify="right" if c != "operation" else "left")
    for op, v in sorted(imp["by_operation"].items(), key=lambda kv: -(kv[1]["mean_share"] or -1)):
        t.add_row(op, str(v["nodes"]), _fmt(v["mean_weight"]), _fmt(v["mean_share"], True),
                  _fmt(v["mean_fitness"], True))
    tables.append(t)
    t = Table(title="by position")
    for c in ("node", "nodes", "mean weight", "mean share of |w|"):
        t.add_column(c)
    for name, v in imp["by_input"].items():
        t.add_row(name, str(v["nodes"]), _fmt(v["mean_weight"]), _fmt(v["mean_share"], True))
    tables.append(t)
    t = Table(title="validation P@5 by number of layers")
    for c in ("layers", "candidates", "mean P@5", "best P@5"):
        t.add_column(c, justify="right")
    for d, v in imp["by_depth"].items():
        t.add_row(str(d), str(v["candidates"]), _fmt(v["mean_p5"], True), _fmt(v["best_p5"], True))
    tables.append(t)
    if any(v["children"] for v in result.inheritance.values()):
        t = Table(title="children: steps to reach their parent's validation P@5")
        for c in ("children", "number", "reached it", "median steps", "mean P@5"):
            t.add_column(c, justify="right" if c != "children" else "left")
        for name, v in result.inheritance.items():
            t.add_row(name, str(v["children"]), str(v["reached"]),
                      "-" if v["median_steps"] is None else f"{v['median_steps']:.0f}", _fmt(v["mean_p5"], True))
        tables.append(t)
    return tables


def show_candidate(out, rank: int, r: dict) -> None:
    """One of the best candidates: its figures and its architecture drawn with its layer weights."""
    from ..space import Genotype

    fused = r.get("fused")      # the figure that ranked it is the fused model's; its network alone beside it
    test = (fused.get("test") if fused else r.get("test")) or {}
    out.print(f"\n[bold]#{rank}[/bold] candidate {r['id']}: validation P@5 {_fmt(r['fitness'], True)}"
              + (" fused with the lexical stage (the network alone: "
                 f"{_fmt((r.get('valid') or {}).get('P@5'), True)})" if fused else "")
              + (f", test P@1/3/5 {_fmt(test.get('P@1'), True)}/{_fmt(test.get('P@3'), True)}/"
                 f"{_fmt(test.get('P@5'), True)}" if test else ""))
    out.print(Genotype.from_dict(r["genotype"]).draw(r.get("layer_weights")))


def cmd_data_show(args) -> int:
    from ..data import dataset_stats, render_stats, wants_vectors, word_vectors

    out = console()
    data = load_data(args.dataset, out, **data_kwargs(args))
    coverage = None
    if wants_vectors(args.vectors):
        _, coverage, _ = word_vectors(args.vectors, data, 2)     # (corpus: 2 dimensions do for the coverage)
    out.print(render_stats(dataset_stats(data, coverage)))
    return 0
