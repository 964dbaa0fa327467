"""What every command shares: the user-facing error, the console, how the program was started (for
hints that run as printed), argument types and the option groups, loading data and bundles."""
from __future__ import annotations

import argparse
import math
import os
import shlex
import shutil
import sys
from typing import Optional


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def console(quiet: bool = False, stderr: bool = False):
    from rich.console import Console

    c = Console(quiet=quiet, highlight=False, stderr=stderr)
    if not c.is_terminal:
        c.soft_wrap = True  # logs and pipes: one line per message, never wrapped at 80 columns
    return c


def program() -> str:
    """This program as the user can type it again: `xmcnas-fast` where the shell finds this very
    script under that name, else the path it was started by, else `python -m xmcnas_fast.cli`."""
    argv0 = sys.argv[0] if sys.argv else ""
    name = os.path.basename(argv0)
    if name == "__main__.py" and os.path.dirname(os.path.abspath(argv0)) == os.path.dirname(os.path.abspath(__file__)):
        return shlex.join([getattr(sys, "orig_argv", [sys.executable])[0], "-m", "xmcnas_fast.cli"])
    if name != "xmcnas-fast":
        return "xmcnas-fast"   # called from Python (main([...])): the installed command's name
    on_path = shutil.which("xmcnas-fast")
    if on_path and os.path.realpath(on_path) == os.path.realpath(argv0):
        return "xmcnas-fast"
    return shlex.quote(argv0)


# ---- argument types -----------------------------------------------------------------------------
# Every numeric flag takes one of these as its `type=`: a value out of range is refused while the
# command line is read, before anything is loaded or created, as `argument --FLAG: expected ...`.

def number(convert, accept, takes: str):
    """An argparse type: `convert` the text (int or float; a float must be finite), then keep it only
    if `accept(value)`; otherwise say what the flag `takes`."""
    def parse(s: str):
        try:
            v = convert(s)
        except ValueError:
            v = None
        if v is None or (isinstance(v, float) and not math.isfinite(v)) or not accept(v):
            raise argparse.ArgumentTypeError(f"expected {takes}, got {s!r}")
        return v

    return parse


positive_int = number(int, lambda v: v >= 1, "a positive integer")
non_negative_int = number(int, lambda v: v >= 0, "an integer >= 0")
positive_float = number(float, lambda v: v > 0, "a number > 0")
non_negative_float = number(float, lambda v: v >= 0, "a number >= 0")
#: a share that may be none or all (the constraint's part of the population)
fraction = number(float, lambda v: 0 <= v <= 1, "a fraction in [0, 1]")
#: a share that keeps something (the promoted part of the population)
share = number(float, lambda v: 0 < v <= 1, "a fraction in (0, 1]")
#: a dropout probability: 1 would drop everything
probability = number(float, lambda v: 0 <= v < 1, "a probability in [0, 1)")


def count_or_fraction(s: str):
    """A positive count (200) or a fraction strictly between 0 and 1 (0.1)."""
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not (math.isfinite(v) and v > 0 and (v < 1 or v == int(v))):
        raise argparse.ArgumentTypeError(f"expected a count (200) or a fraction (0.1), got {s!r}")
    return int(v) if v >= 1 else v


def positive_int_list(s: str) -> list:
    """Comma-separated positive sizes, at least one (256 or 1024,512,256)."""
    try:
        sizes = [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        sizes = []
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"expected comma-separated positive integers (256 or 1024,512,256), "
                                         f"got {s!r}")
    return sizes


#: the options not named after their dest (switches that turn a setting off)
OFF_SWITCHES = {"final": "--no-final"}


def flag(dest: str, value=None) -> str:
    """The option that sets `dest` (to `value`), as it is typed: named after the dest, --no-NAME for a
    switch given False, and the switches that only turn a setting off under their own names."""
    if dest in OFF_SWITCHES:
        return OFF_SWITCHES[dest]
    return ("--no-" if value is False else "--") + dest.replace("_", "-")


def pick(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# ---- option groups ------------------------------------------------------------------------------

def add_data_args(p, dataset_default: Optional[str] = "debtags", dataset_flag: bool = True):
    g = p.add_argument_group("data")
    if dataset_flag:
        g.add_argument("--dataset", default=dataset_default,
                       help="'debtags' (bundled), a JSON-lines / CSV file, or a directory with train/test files "
                            "(JSON lines, CSV, or AttentionXML's train_texts.txt + train_labels.txt)"
                            + (f" (default: {dataset_default})" if dataset_default else ""))
    g.add_argument("--text-column", help="CSV: the column holding the text (default: summaries)")
    g.add_argument("--labels-column", help="CSV: the column holding the label list (default: terms)")
    g.add_argument("--max-len", type=positive_int, help="tokens kept per text")
    g.add_argument("--valid", type=count_or_fraction,
                   help="validation split drawn from train: a count (200) or a fraction (0.1)")
    g.add_argument("--vectors",
                   help="word vectors the embedding starts from: a GloVe / word2vec text file (.txt or .txt.gz), "
                        "'corpus': learned from the training texts (PPMI + SVD, --emb-dim dimensions; the demo "
                        "search's default), or 'none': random")
    g.add_argument("--data-seed", type=non_negative_int, help="seed of the validation split")


def add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--width", type=positive_int, help="output width D of every layer node")
    g.add_argument("--emb-dim", type=positive_int, help="word embedding size (a vectors file sets its own)")
    g.add_argument("--fc", type=positive_int_list, help="FC chain of the head, e.g. 256 or 1024,512,256")
    g.add_argument("--dropout", type=probability, help="dropout after the merge and in the head (default 0.5)")
    g.add_argument("--freeze-emb", action="store_true", default=None, help="keep pretrained word vectors fixed")


def add_lexical_model_args(g):
    """The lexical stage's one-vs-rest model beside its tree, and its serving stage (to a group)."""
    g.add_argument("--lexical-ovr", choices=["auto", "on", "off"],
                   help="a one-vs-rest linear model (napkinXC's BR, one classifier per label) averaged with the "
                   "tree: auto: with at most 1,000 labels, where it costs about as much as the tree (on debtags "
                   "+0.3 P@1, +0.5 P@3 and P@5 over the tree alone) (default: auto)")
    g.add_argument("--lexical-refit", action=argparse.BooleanOptionalAction, default=None,
                   help="once the stage fitted without the validation split has served to choose the fusion, "
                   "the model keeps (and is tested with) the same stage fitted again on every training "
                   "document; not over a shortlist or in residual mode (on debtags +0.2 P@1 for the stage "
                   "alone, a second fit's time) (default: on)")
    g.add_argument("--lexical-ranker", action=argparse.BooleanOptionalAction, default=None,
                   help="the trained model's fusion may be a small learned ranker over both models' scores, "
                   "ranks and each label's training count, fitted on the validation split, instead of one "
                   "weight; it serves where its out-of-fold validation P@5 beats the weight's (a few seconds; "
                   "not over a shortlist or in residual mode) (default: on)")


def add_shortlist_args(g):
    """The switch between heads that score every label and heads that score a shortlist (to a group)."""
    g.add_argument("--shortlist-above", type=non_negative_int, metavar="LABELS",
                   help="with more labels than this, the network scores a shortlist per document from the lexical "
                   "stage's label tree instead of every label (every true label put in while training); below, "
                   "every label (default 50000; 0: always a shortlist)")
    g.add_argument("--shortlist-k", type=positive_int, metavar="K",
                   help="labels in a document's shortlist (default 1000)")


def add_train_args(p):
    g = p.add_argument_group("training (one candidate)")
    g.add_argument("--epochs", type=positive_int, help="at most this many epochs")
    g.add_argument("--max-steps", type=positive_int, help="at most this many optimizer steps")
    g.add_argument("--min-steps", type=non_negative_int,
                   help="the time limit ends no training before this many steps (epochs and --max-steps still "
                   "do): a budget that grows with the data where a step takes longer (0: no such floor)")
    g.add_argument("--batch-size", type=positive_int, help="documents per step (default 40)")
    g.add_argument("--lr", type=positive_float, help="Adam learning rate (default 1e-3)")
    g.add_argument("--warmup-steps", type=non_negative_int, help="linear learning-rate warm-up steps (0: none)")
    g.add_argument("--lr-schedule", choices=["constant", "cosine"],
                   help="constant (default), or cosine: half a cosine down to 0 at the end of the budget (its "
                   "steps, epochs or minutes, whichever comes first)")
    g.add_argument("--eval-every", type=positive_int, help="steps between validation evaluations")
    g.add_argument("--patience", type=positive_int, help="evaluations without a better validation P@5 before stopping")
    g.add_argument("--seed", type=non_negative_int, help="random seed")
    g.add_argument("--precision", choices=["auto", "bf16", "fp32"],
                   help="auto (default): bf16 autocast on CUDA, float32 on the CPU; bf16: bf16 autocast on any "
                   "device; fp32: no autocast. Recurrent layers always compute in float32")


MODEL_FLAGS = ("width", "emb_dim", "fc", "dropout", "freeze_emb")
#: training flags and the TrainConfig field each sets
TRAIN_FLAGS = {"epochs": "max_epochs", "max_steps": "max_steps", "min_steps": "min_steps", "batch_size": "batch_size",
               "lr": "lr",
               "warmup_steps": "warmup_steps", "eval_every": "eval_every", "patience": "patience",
               "precision": "precision", "lr_schedule": "lr_schedule"}


# ---- data and bundles ---------------------------------------------------------------------------

def data_kwargs(args, base: Optional[dict] = None) -> dict:
    """Keyword arguments of data.load: `base` (e.g. a bundle's saved settings), then the flags given."""
    kw = dict(base or {})
    kw.update(pick(args, ["max_len", "valid", "text_column", "labels_column"]))
    if args.data_seed is not None:
        kw["seed"] = args.data_seed
    return kw


def load_data(name: str, out, **kw):
    from ..data import load

    with out.status(f"loading {name} ..."):
        return load(name, **kw)


def load_bundle(path: str, device: Optional[str], out=None):
    """A bundle, or a search run's best one (said on `out`)."""
    from ..bundle import find_bundle, load_bundle as load

    try:
        found = find_bundle(path)
        if found != path and out is not None:
            out.print(f"using the run's best model: {found}", soft_wrap=True)
        return load(found, device=device or "cpu")
    except ValueError as e:
        raise CLIError(str(e)) from None
