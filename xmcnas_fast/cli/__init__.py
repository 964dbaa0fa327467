"""xmcnas-fast: find, train, evaluate and serve neural models for extreme multi-label text classification.

Commands:
  search     regularized evolution over text-encoding DAGs (XMC-NAS), candidates trained in parallel
  train      train one architecture (a preset or a genotype JSON) and save it as a model bundle
  evaluate   P@k, nDCG@k and PSP@k of a bundle on a dataset's test split
  predict    labels for raw text with a bundle
  analyze    which operations earned weight in a search (operation-importance analysis)
  data       inspect a dataset (`data show DATASET`)

With no dataset named, the bundled `debtags` set is used (Debian package
descriptions labelled with their debtags). Run `xmcnas-fast COMMAND --help`.
"""
from __future__ import annotations

import sys

from .common import CLIError


def build_parser():
    from .parser import build_parser as build

    return build(__doc__)


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        return args.func(args)
    except CLIError as e:
        print(f"xmcnas-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xmcnas-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # known, user-facing failures from the library: one line, no traceback
        from ..data import DataError
        from ..runs import RunError

        if isinstance(e, (RunError, DataError, FileNotFoundError)):
            print(f"xmcnas-fast: error: {e}", file=sys.stderr)
            return 2
        raise


__all__ = ["CLIError", "build_parser", "main"]
