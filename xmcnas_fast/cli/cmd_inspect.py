"""`xmcnas-fast analyze` and `xmcnas-fast data show`: look at a search or a dataset."""
from __future__ import annotations

from .common import console, data_kwargs, load_data


def cmd_analyze(args) -> int:
    from ..analysis import analyze_run

    analyze_run(args.run, console=console(), top=args.top, out_dir=args.out)
    return 0


def cmd_data_show(args) -> int:
    from ..data import dataset_stats, load_word_vectors, render_stats

    out = console()
    data = load_data(args.dataset, out, **data_kwargs(args))
    coverage = None
    if args.vectors:
        _, coverage = load_word_vectors(args.vectors, data.vocab)
    out.print(render_stats(dataset_stats(data, coverage)))
    return 0
