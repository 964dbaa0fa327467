"""The argument parser: one function per command."""
from __future__ import annotations

import argparse

from .. import __version__
from ..fitness import JUDGES
from ..space import OPERATIONS
from .cmd_inspect import cmd_analyze, cmd_data_show
from .cmd_models import cmd_evaluate, cmd_predict, cmd_train
from .cmd_search import cmd_search
from .common import (add_data_args, add_lexical_model_args, add_model_args, add_shortlist_args, add_train_args, fraction,
                     non_negative_float, non_negative_int, positive_float, positive_int, positive_int_list, share)

FMT = argparse.RawDescriptionHelpFormatter


class Parser(argparse.ArgumentParser):
    """argparse's parser, whose refusals are one line as the commands' own are (`PROG: error: argument
    --FLAG: expected ...`, exit status 2); the usage is what --help prints."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}\n")


def print_help_of(parser):
    """A command's func that prints `parser`'s help: a command with actions, given none, lists them
    with a line each, as the program given no command lists its commands."""
    def show(args) -> int:
        parser.print_help()
        return 0

    return show


SEARCH_DESCRIPTION = """\
Regularized evolution (Real et al. 2019) over text-encoding DAGs, as XMC-NAS.
Every finished candidate is appended to runs/NAME/history.jsonl; the best models are kept
under runs/NAME/models/. Ctrl-C stops cleanly; --resume continues to the same end.

After the evolution, the best architecture is trained to the end of the budget (the demo goes on
from the candidate's weights; paper trains it again from scratch); that model is the search's
result (runs/NAME/models/final, best.json) when its validation P@5 is at least the candidate's.

Budgets: demo (default; 6 to 12 minutes on a 2-core CPU with debtags, as its candidates' speed says;
longer on larger data, where every candidate trains at least 800 steps and the total time
stretches with them) and paper (P=20, C=50, S=10, up to 30 epochs, width 512, the final model 30 epochs).
Every setting below overrides the budget."""

TRAIN_DESCRIPTION = """\
Train a preset (attentionxml, discovered, tfidf-mlp) or a genotype JSON
({"nodes": [["bilstm", 0], ["conv3", 1]], "merge": "sum"}) and save it as a bundle."""


def add_search(sub) -> None:
    s = sub.add_parser("search", help="search architectures by regularized evolution", formatter_class=FMT,
                       description=SEARCH_DESCRIPTION)
    s.add_argument("--budget", choices=["demo", "paper"], help="starting values of every setting (default: demo)")
    s.add_argument("--name", help="run directory name under --runs-dir (default: budget + date)")
    s.add_argument("--runs-dir", default="runs", help="where runs are saved (default: runs)")
    s.add_argument("--resume", metavar="RUN", help="continue the search saved in RUN (a directory)")
    g = s.add_argument_group("search")
    g.add_argument("--strategy", choices=["evolution", "random"], help="random: the ablation with the same budget")
    g.add_argument("--population", type=positive_int, help="P: population size (random architectures first)")
    g.add_argument("--cycles", type=non_negative_int,
                   help="C: children trained after the initial population (0: the population alone)")
    g.add_argument("--sample", type=positive_int, help="S: tournament size (at most the population)")
    g.add_argument("--max-depth", type=positive_int, help="most layer nodes in an architecture")
    g.add_argument("--constraint", choices=list(OPERATIONS),
                   help="node 1 of part of the population is this operation reading the embedding")
    g.add_argument("--constraint-fraction", type=fraction, help="that part (0..1)")
    g.add_argument("--inherit-weights", action=argparse.BooleanOptionalAction, default=None,
                   help="a child starts from its parent's trained weights wherever the two agree (embedding, "
                   "head, each node whose operation and input are unchanged); the rest starts fresh. Each "
                   "history line says what was inherited (default: on in the demo budget, off in paper)")
    g.add_argument("--fidelity", type=positive_int, metavar="STEPS",
                   help="short runs first: every new candidate trains STEPS steps, and goes on to the full "
                   "budget only if its validation P@5 is in the top --promote part of the population's at "
                   "STEPS steps (successive halving; figures of different budgets are never compared)")
    g.add_argument("--promote", type=share, metavar="FRACTION", help="that top part (default 1/3)")
    g = s.add_argument_group("the lexical stage (TF-IDF uni+bigrams and napkinXC's label tree, or above 100K labels "
                             "label centroids, fitted once per dataset and settings and cached, timed inside the "
                             "budget)")
    g.add_argument("--lexical", action=argparse.BooleanOptionalAction, default=None,
                   help="fuse every candidate with the lexical stage: its fitness is the fused model's "
                   "validation P@5, so evolution looks for the network that adds most to it, and the result "
                   "serves the fused model (default: on)")
    g.add_argument("--lexical-mode", choices=["fuse", "residual"],
                   help="fuse: the two models' probabilities combined as validation says (a weight on a grid); "
                   "residual: networks train with the lexical logits as a fixed offset, to learn what the "
                   "lexical model misses (default: fuse)")
    g.add_argument("--lexical-fitness", choices=JUDGES,
                   help="what a candidate is judged by: fused, the validation P@5 of the network fused with the "
                   "stage; network, the network's own (the fusion is still chosen on validation and served). "
                   "fuse mode only: a residual network is judged fused (default: fused; network measured no better on debtags)")
    g.add_argument("--lexical-trees", type=positive_int, metavar="N",
                   help="label trees in the lexical model, their probabilities averaged (default 1; 3 measured "
                   "+0.4 P@1 on debtags for 2.8x the fitting time)")
    add_lexical_model_args(g)
    add_shortlist_args(g)
    g = s.add_argument_group("the final model (the best architecture trained to the end: the search's result)")
    g.add_argument("--no-final", dest="final", action="store_false", default=None,
                   help="stop after the search: its best candidate is the result")
    g.add_argument("--final-width", type=positive_int, help="its node width (default: the budget's)")
    g.add_argument("--final-inherit", action=argparse.BooleanOptionalAction, default=None,
                   help="start it from the candidate's weights wherever the two networks agree (all of them at "
                   "the search's sizes: it goes on training the candidate), or from scratch as the paper did "
                   "(default: on in the demo budget, off in paper)")
    g.add_argument("--final-epochs", type=positive_int, help="at most this many epochs (default: the budget's)")
    g.add_argument("--final-minutes", type=positive_float, help="at most this many minutes of training")
    g.add_argument("--total-minutes", type=positive_float,
                   help="wall-clock budget of the whole search: the final training gets what the candidates "
                   "left of it (at least --final-min-minutes, else half a minute)")
    g.add_argument("--final-min-minutes", type=positive_float, metavar="MINUTES",
                   help="with --total-minutes: the final training's guaranteed share. No candidate starts once "
                   "less than this is left (those running finish), so a slow machine trains fewer candidates "
                   "rather than starving the final model (demo: 4)")
    g.add_argument("--ensemble", type=non_negative_int, metavar="K",
                   help="after the final training, up to K of the run's trained networks (the result first, "
                   "then the kept candidates) averaged and fused with the lexical stage, kept only where the "
                   "validation P@5 gains --ensemble-min-gain; one bundle holds them (0 or 1: one network; "
                   "demo: 3; needs the lexical stage in fuse mode)")
    g.add_argument("--ensemble-min-gain", type=fraction, metavar="FRACTION",
                   help="the least gain of validation P@5 (a fraction: 0.002 is 0.2 points) for which a network "
                   "joins the ensemble (default 0.002)")
    g = s.add_argument_group("devices (may change on --resume)")
    g.add_argument("--devices", help="cuda (one worker per GPU), cuda:0,cuda:1, cpu, or cpu:W (W CPU workers); "
                   "several workers per GPU, for candidates too small to fill one: cuda:0x4 (4 on GPU 0), "
                   "cudax2 (2 on every GPU). The CPU cores are split evenly among all the workers")
    g.add_argument("--backend", choices=["local", "inline", "ray"],
                   help="how candidates run (default local: one process per worker; inline: one at a time in "
                   "this process; ray: one Ray actor per worker, with the ray extra installed)")
    g.add_argument("--candidate-timeout", type=positive_float, help="seconds before a candidate is killed and recorded as timeout")
    s.add_argument("--candidate-minutes", type=non_negative_float,
                   help="training time budget of one candidate (minutes; 0: no limit, its epochs or steps end it)")
    add_data_args(s)
    s.set_defaults(dataset=None)   # given or not is told apart: --resume refuses a new dataset
    add_model_args(s)
    add_train_args(s)
    s.add_argument("--quiet", action="store_true", help="print only the summary")
    s.add_argument("--plain", action="store_true", help="one line per event, even on a terminal")
    s.set_defaults(func=cmd_search)


def add_train(sub) -> None:
    t = sub.add_parser("train", help="train one architecture and save a model bundle", formatter_class=FMT,
                       description=TRAIN_DESCRIPTION)
    t.add_argument("--arch", required=True, help="preset name (attentionxml, discovered, tfidf-mlp, or plt: the "
                   "lexical stage alone) or genotype JSON file")
    t.add_argument("--out", help="bundle directory (default: models/ARCH)")
    t.add_argument("--max-minutes", type=non_negative_float,
                   help="training time budget in minutes (default and 0: no limit, the epochs or steps end it)")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--threads", type=positive_int, help="CPU threads")
    t.add_argument("--quiet", action="store_true")
    add_data_args(t)
    add_model_args(t)
    g = t.add_argument_group("tfidf-mlp")
    g.add_argument("--hidden", type=positive_int_list, help="hidden layer sizes (default 512,256)")
    g.add_argument("--max-features", type=positive_int, help="unigrams and bigrams kept, by document frequency (default 60000)")
    g = t.add_argument_group("lexical stage (TF-IDF uni+bigrams and napkinXC's label tree, or above 100K labels "
                             "label centroids; cached per dataset)")
    g.add_argument("--lexical", action="store_true",
                   help="fuse the network with the lexical stage: weights are chosen by the fused model's "
                   "validation P@5, and the bundle serves the fused model (--arch plt: the stage alone)")
    g.add_argument("--lexical-trees", type=positive_int, metavar="N",
                   help="label trees in the lexical model, their probabilities averaged (default 1)")
    add_lexical_model_args(g)
    add_shortlist_args(g)
    add_train_args(t)
    t.set_defaults(func=cmd_train)


def add_evaluate(sub) -> None:
    e = sub.add_parser("evaluate", help="metrics of a bundle on a test split",
                       description="P@k, nDCG@k and PSP@k (k = 1, 3, 5) of a bundle on a dataset's test split "
                                   "(by default the data it was trained on, read with its settings).")
    e.add_argument("bundle", help="model bundle directory, or a search run (its best model)")
    e.add_argument("--device")
    e.add_argument("--json", action="store_true", help="print the metrics as one JSON line on stdout (the table "
                                                       "goes to stderr)")
    add_data_args(e, dataset_default=None)
    e.set_defaults(func=cmd_evaluate)


def add_predict(sub) -> None:
    pr = sub.add_parser("predict", help="labels for raw text")
    pr.add_argument("bundle", help="model bundle directory, or a search run (its best model)")
    pr.add_argument("text", nargs="*", help="texts to label")
    pr.add_argument("--input", help='JSON lines with a "text" field (and optional "id"); - for stdin')
    pr.add_argument("--output", help="write JSON lines here (default: stdout)")
    pr.add_argument("-k", type=positive_int, default=5, help="labels per text (default 5)")
    pr.add_argument("--json", action="store_true", help="JSON lines even for texts given as arguments")
    pr.add_argument("--device")
    pr.set_defaults(func=cmd_predict)


def add_analyze(sub) -> None:
    a = sub.add_parser("analyze", help="operation-importance analysis of a search")
    a.add_argument("run", help="search directory (runs/NAME)")
    a.add_argument("--top", type=non_negative_int, default=3, help="best architectures to draw (default 3; 0: none)")
    a.add_argument("--out", help="where DOT files (and PNG plots, with matplotlib) go (default: RUN/analysis)")
    a.set_defaults(func=cmd_analyze)


def add_data(sub) -> None:
    d = sub.add_parser("data", help="inspect a dataset", description="Inspect a dataset: xmcnas-fast data show DATASET")
    d.set_defaults(func=print_help_of(d))
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION", title="actions")
    ds = dsub.add_parser("show", help="statistics of a dataset")
    ds.add_argument("dataset", nargs="?", default="debtags", help="as --dataset of the other commands (default: debtags)")
    add_data_args(ds, dataset_flag=False)
    ds.set_defaults(func=cmd_data_show)


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = Parser(prog="xmcnas-fast", description=description, formatter_class=FMT)
    p.add_argument("--version", action="version", version=f"xmcnas-fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for add in (add_search, add_train, add_evaluate, add_predict, add_analyze, add_data):
        add(sub)
    return p
