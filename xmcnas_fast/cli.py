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

import argparse
import json
import os
import sys
import time
from typing import Optional

from . import __version__
from .space import OPERATIONS


class CLIError(Exception):
    """A user-facing error: printed as one line, exit status 2."""


def _console(quiet: bool = False):
    from rich.console import Console

    console = Console(quiet=quiet, highlight=False)
    if not console.is_terminal:
        console.soft_wrap = True  # logs and pipes: one line per message, never wrapped at 80 columns
    return console


# ---- shared options ----------------------------------------------------------------------------

def _add_data_args(p, dataset_default: Optional[str] = "debtags"):
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=dataset_default,
                   help="'debtags' (bundled), a JSON-lines / CSV file, or a directory with train/test files "
                        "(JSON lines, CSV, or AttentionXML's train_texts.txt + train_labels.txt)"
                        + (f" (default: {dataset_default})" if dataset_default else ""))
    g.add_argument("--max-len", type=int, help="tokens kept per text")
    g.add_argument("--valid", type=_count_or_fraction, help="validation split drawn from train: a count (200) or a fraction (0.1)")
    g.add_argument("--vectors", help="pretrained word vectors (GloVe / word2vec text, .txt or .txt.gz)")
    g.add_argument("--data-seed", type=int, help="seed of the validation split")


def _count_or_fraction(s: str):
    v = float(s)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return int(v) if v >= 1 and v == int(v) else v


def _int_list(s: str) -> list:
    try:
        return [int(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {s!r}") from None


def _add_model_args(p):
    g = p.add_argument_group("model")
    g.add_argument("--width", type=int, help="output width D of every layer node")
    g.add_argument("--emb-dim", type=int, help="word embedding size (ignored with --vectors)")
    g.add_argument("--fc", type=_int_list, help="FC chain of the head, e.g. 256 or 1024,512,256")
    g.add_argument("--dropout", type=float, help="dropout after the merge and in the head (default 0.5)")
    g.add_argument("--freeze-emb", action="store_true", default=None, help="keep pretrained word vectors fixed")


def _add_train_args(p):
    g = p.add_argument_group("training (one candidate)")
    g.add_argument("--epochs", dest="max_epochs", type=int, help="at most this many epochs")
    g.add_argument("--max-steps", type=int, help="at most this many optimizer steps")
    g.add_argument("--batch-size", type=int, help="documents per step (default 40)")
    g.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    g.add_argument("--warmup-steps", type=int, help="linear learning-rate warm-up steps")
    g.add_argument("--eval-every", type=int, help="steps between validation evaluations")
    g.add_argument("--patience", type=int, help="evaluations without a better validation P@5 before stopping")
    g.add_argument("--seed", type=int, help="random seed")


def _pick(args, names) -> dict:
    return {n: getattr(args, n) for n in names if getattr(args, n, None) is not None}


# ---- search ------------------------------------------------------------------------------------

def _search_overrides(args) -> dict:
    o = {
        "data": _pick(args, ["max_len", "valid", "vectors"]),
        "search": _pick(args, ["strategy", "population", "cycles", "sample", "max_depth", "constraint",
                               "constraint_fraction"]),
        "model": _pick(args, ["width", "emb_dim", "fc", "dropout", "freeze_emb"]),
        "train": _pick(args, ["max_epochs", "max_steps", "batch_size", "lr", "warmup_steps", "eval_every",
                              "patience"]),
        "run": _pick(args, ["backend", "devices", "candidate_timeout"]),
    }
    if args.data_seed is not None:
        o["data"]["seed"] = args.data_seed
    if args.seed is not None:
        o["search"]["seed"] = args.seed
    if args.candidate_minutes is not None:
        o["train"]["max_minutes"] = args.candidate_minutes
    if args.max_len is not None:
        o["train"]["max_len"] = args.max_len
    return o


def cmd_search(args) -> int:
    from .progress import SearchProgress
    from .runs import Run
    from .search import candidate_total, make_config, resolve_devices, run_search

    console = _console(args.quiet)
    if args.resume:
        run = Run.open(args.resume)
        given = {k: v for k, v in _search_overrides(args).items() if k != "run" and v}
        if given:
            raise CLIError(f"--resume continues {args.resume} with its saved configuration; "
                           f"drop the settings {sorted(k for v in given.values() for k in v)}")
    else:
        cfg = make_config(args.budget, dataset=args.dataset, overrides=_search_overrides(args))
        name = args.name or time.strftime(f"{args.budget}-%Y%m%d-%H%M%S")
        run = Run.create(os.path.join(args.runs_dir, name), cfg)
    run.lock()
    cfg = run.config
    devices = resolve_devices(cfg, args.devices)
    s, t = cfg["search"], cfg["train"]
    console.print(f"[bold]xmcnas-fast search[/bold] {run.path}\n"
                  f"  {s['strategy']}: population {s['population']}, cycles {s['cycles']}, sample {s['sample']}, "
                  f"depth <= {s['max_depth']}; width {cfg['model']['width']}, {t['max_epochs']} epochs max"
                  + (f", {t['max_minutes']} min max" if t.get("max_minutes") else "")
                  + f" per candidate; dataset {cfg['data']['dataset']}; devices {devices}")
    total = candidate_total(cfg)
    done = len(run.history.records)
    dev_list = _device_names(devices)
    with SearchProgress(total, dev_list, done=done, quiet=args.quiet, console=console,
                        live=False if args.plain else None) as progress:
        outcome = run_search(run, progress=progress, backend=args.backend, devices=devices,
                             candidate_timeout=args.candidate_timeout)
    run.unlock()
    if outcome.interrupted:
        console.print(f"[yellow]interrupted[/yellow] after {outcome.finished}/{outcome.total} candidates; "
                      f"continue with: xmcnas-fast search --resume {run.path}")
        return 130
    _print_search_summary(console, run)
    return 0


def _device_names(devices: str) -> list:
    from .scheduler import parse_devices

    try:
        return parse_devices(devices)
    except ValueError as e:
        raise CLIError(str(e)) from None


def _print_search_summary(console, run) -> None:
    from rich.table import Table

    from .metrics import METRIC_NAMES
    from .space import Genotype

    best = run.best()
    recs = run.history.records
    ok = [r for r in recs if r.get("fitness") is not None]
    console.print(f"\n{len(recs)} candidates, {len(ok)} trained successfully, "
                  f"{sum(1 for r in recs if r.get('reused_from') is not None)} reused; "
                  f"{sum(r.get('seconds') or 0 for r in recs):.0f} s of training")
    if not best:
        console.print("[red]no candidate finished successfully[/red]")
        return
    rec = next(r for r in recs if r["id"] == best["id"])
    g = Genotype.from_dict(rec["genotype"])
    console.print(f"\n[bold]best architecture[/bold] (candidate #{rec['id']}, validation P@5 "
                  f"{100 * rec['fitness']:.2f}):")
    console.print(g.draw(rec.get("layer_weights")))
    if rec.get("test"):
        t = Table(title="test split")
        for n in METRIC_NAMES:
            if n in rec["test"]:
                t.add_column(n, justify="right")
        t.add_row(*[f"{100 * rec['test'][n]:.2f}" for n in METRIC_NAMES if n in rec["test"]])
        console.print(t)
    console.print(f"model bundle: {best.get('model_dir')}\n"
                  f"predict with: xmcnas-fast predict {best.get('model_dir')} \"some text\"\n"
                  f"analysis:     xmcnas-fast analyze {run.path}")


# ---- train / evaluate / predict ---------------------------------------------------------------

def _data_kwargs(args, base: Optional[dict] = None) -> dict:
    kw = dict(base or {})
    if args.max_len is not None:
        kw["max_len"] = args.max_len
    if args.valid is not None:
        kw["valid"] = args.valid
    if args.data_seed is not None:
        kw["seed"] = args.data_seed
    return kw


def _load_data(name: str, console, **kw):
    from .data import load

    with console.status(f"loading {name} ..."):
        return load(name, **kw)


# Training settings a preset is known to do better with (flags still override them).
PRESET_TRAINING = {"tfidf-mlp": {"batch_size": 128, "lr": 2e-3, "max_epochs": 60}}


def cmd_train(args) -> int:
    import torch

    from .bundle import save_bundle
    from .metrics import format_metrics
    from .model import ModelConfig, build_model, count_parameters, preset
    from .space import Genotype
    from .train import TrainConfig, train_model

    console = _console(args.quiet)
    if os.path.exists(args.arch) or args.arch.endswith(".json"):
        try:
            with open(args.arch, encoding="utf-8") as f:
                g = Genotype.from_dict(json.load(f))
        except FileNotFoundError:
            raise CLIError(f"{args.arch}: no such file (and not a preset)") from None
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise CLIError(f"{args.arch}: not a genotype ({e})") from None
        mcfg = ModelConfig(genotype=g.to_dict())
        arch_name = os.path.splitext(os.path.basename(args.arch))[0]
    else:
        try:
            mcfg = preset(args.arch)
        except ValueError as e:
            raise CLIError(str(e)) from None
        arch_name = args.arch
    tfidf_only = _pick(args, ["hidden", "max_features"])
    if tfidf_only and mcfg.kind != "tfidf-mlp":
        raise CLIError(f"only tfidf-mlp takes --{' and --'.join(k.replace('_', '-') for k in tfidf_only)}")
    if "hidden" in tfidf_only and (not args.hidden or min(args.hidden) < 1):
        raise CLIError(f"--hidden: expected one or more positive sizes, got {args.hidden}")
    if "max_features" in tfidf_only and args.max_features < 1:
        raise CLIError(f"--max-features: expected a positive count, got {args.max_features}")
    for k, v in _pick(args, ["width", "emb_dim", "fc", "dropout", "freeze_emb", "hidden", "max_features"]).items():
        setattr(mcfg, k, v)
    tcfg = TrainConfig(**{**PRESET_TRAINING.get(args.arch, {}),
                          **_pick(args, ["max_epochs", "max_steps", "batch_size", "lr", "warmup_steps",
                                         "eval_every", "patience", "seed", "max_minutes", "threads"])})
    tcfg.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.max_len is not None:
        tcfg.max_len = args.max_len
    data = _load_data(args.dataset, console, **_data_kwargs(args))
    vectors = None
    if args.vectors:
        from .data import load_word_vectors

        vectors, coverage = load_word_vectors(args.vectors, data.vocab, seed=tcfg.seed)
        console.print(f"word vectors: {vectors.shape[1]} dimensions, {100 * coverage:.1f}% of the vocabulary")
    model = build_model(mcfg, len(data.vocab), data.num_labels, vectors=vectors, seed=tcfg.seed)
    if mcfg.kind == "tfidf-mlp":
        model.fit(data.train.token_ids, data.train.offsets)
    console.print(f"[bold]{arch_name}[/bold]: {count_parameters(model):,} parameters, "
                  f"{len(data.train)} training documents, {data.num_labels} labels, device {tcfg.device}")
    result = _train_with_progress(model, data, tcfg, console, args.quiet)
    rec = result.record
    if rec["status"] not in ("ok", "stopped"):
        raise CLIError(f"training failed: {rec['status']}: {rec.get('error')}")
    out = args.out or os.path.join("models", arch_name)
    save_bundle(out, model, mcfg, data, train_cfg=tcfg.to_dict(), record=rec)
    console.print(f"validation: {format_metrics(rec['valid'])}")
    if rec.get("test"):
        console.print(f"test:       {format_metrics(rec['test'])}")
    console.print(f"{rec['epochs']} epochs, {rec['steps']} steps, {rec['seconds']:.0f} s, "
                  f"{rec['train_docs_per_s'] or 0:.0f} training docs/s, "
                  f"{rec.get('predict_docs_per_s') or 0:.0f} predict docs/s")
    console.print(f"saved: {out}")
    return 0


def _train_with_progress(model, data, tcfg, console, quiet: bool):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from .train import train_model

    steps_per_epoch = -(-len(data.train) // tcfg.batch_size)
    total = steps_per_epoch * tcfg.max_epochs
    if tcfg.max_steps:
        total = min(total, tcfg.max_steps)
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=console,
                  disable=quiet) as bar:
        task = bar.add_task("train", total=total, info="")

        def report(epoch, step, loss, valid_p1, valid_p5, best_p5):
            info = (f"epoch {epoch}  loss {loss:.4f}  valid P@1 {100 * valid_p1:.2f}  "
                    f"P@5 {100 * valid_p5:.2f} (best {100 * best_p5:.2f})")
            bar.update(task, completed=step, info=info)
            if not console.is_terminal and not quiet:
                console.print(f"step {step}: {info}")

        return train_model(model, data, tcfg, report=report)


def cmd_evaluate(args) -> int:
    from rich.table import Table

    from .bundle import load_bundle
    from .metrics import METRIC_NAMES
    from .train import evaluate, label_inv_propensity

    console = _console()
    bundle = _load_bundle(args.bundle, args.device)
    name = args.dataset or bundle.config["data"].get("name") or "debtags"
    kw = _data_kwargs(args, {"max_len": bundle.max_len, **bundle.config["data"].get("settings", {})})
    data = _load_data(name, console, **kw)
    test = _align_to_bundle(data, bundle)
    inv_prop = label_inv_propensity(data, max(data.test.labels.shape[1], data.num_labels))
    inv_prop = _align_propensity(inv_prop, data, bundle, test.labels.shape[1])
    m = evaluate(bundle.model, test, len(bundle.label_names), inv_prop=inv_prop, device=bundle.device,
                 max_len=bundle.max_len)
    t = Table(title=f"{args.bundle} on {name} (test, {len(test)} documents)")
    for n in METRIC_NAMES:
        t.add_column(n, justify="right")
    t.add_row(*[f"{100 * m[n]:.2f}" for n in METRIC_NAMES])
    console.print(t)
    console.print(f"{m['docs_per_s']:.0f} documents/s")
    if args.json:
        print(json.dumps({k: m[k] for k in METRIC_NAMES}))
    return 0


def _load_bundle(path, device):
    from .bundle import load_bundle

    try:
        return load_bundle(path, device=device or "cpu")
    except ValueError as e:
        raise CLIError(str(e)) from None


def _align_to_bundle(data, bundle):
    """The test split re-expressed in the bundle's vocabulary and label order (by word / label name)."""
    import numpy as np
    import scipy.sparse as sp

    from .data import TextDataset

    test = data.test
    word_map = np.array([bundle.vocab.stoi.get(w, 1) for w in data.vocab.itos], dtype=np.int32)
    word_map[0] = 0
    own = {n: i for i, n in enumerate(bundle.label_names)}
    names = list(data.label_names) + list(data.unseen_label_names)
    extra = {}
    col_map = np.array([own[n] if n in own else len(own) + extra.setdefault(n, len(extra)) for n in names])
    lab = test.labels.tocoo()
    labels = sp.csr_matrix((lab.data, (lab.row, col_map[lab.col])), shape=(len(test), len(own) + len(extra)))
    return TextDataset(token_ids=word_map[test.token_ids], offsets=test.offsets, labels=labels, ids=test.ids)


def _align_propensity(inv_prop, data, bundle, columns):
    """Propensities reordered like _align_to_bundle's columns."""
    import numpy as np

    own = {n: i for i, n in enumerate(bundle.label_names)}
    out = np.full(columns, float(np.max(inv_prop)) if len(inv_prop) else 1.0)
    names = list(data.label_names) + list(data.unseen_label_names)
    extra = 0
    for i, n in enumerate(names):
        if n in own:
            out[own[n]] = inv_prop[i]
        else:
            out[len(own) + extra] = inv_prop[i]
            extra += 1
    return out


def cmd_predict(args) -> int:
    bundle = _load_bundle(args.bundle, args.device)
    if args.input:
        ids, texts = _read_predict_input(args.input)
    elif args.text:
        ids, texts = list(range(len(args.text))), list(args.text)
    else:
        raise CLIError("give texts to label, or --input FILE (JSON lines with a \"text\" field; - for stdin)")
    preds = bundle.predict(texts, k=args.k)
    out = open(args.output, "w", encoding="utf-8") if args.output else sys.stdout
    try:
        if args.input or args.output or args.json:
            for i, p in zip(ids, preds):
                out.write(json.dumps({"id": i, "labels": [[n, round(s, 6)] for n, s in p]}, ensure_ascii=False) + "\n")
        else:
            console = _console()
            for t, p in zip(texts, preds):
                console.print(f"[bold]{t[:100]}[/bold]")
                for n, s in p:
                    console.print(f"  {s:.3f}  {n}")
    finally:
        if out is not sys.stdout:
            out.close()
    return 0


def _read_predict_input(path: str):
    """(ids, texts) from JSON lines with a "text" field and an optional "id" (- for stdin)."""
    from .data import open_lines

    lines = enumerate(sys.stdin, start=1) if path == "-" else open_lines(path)
    ids, texts = [], []
    for n, line in lines:
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise CLIError(f"{path}:{n}: invalid JSON ({e.msg})") from None
        if not isinstance(obj, dict) or not isinstance(obj.get("text"), str):
            raise CLIError(f'{path}:{n}: expected an object with a "text" string')
        ids.append(obj.get("id", n))
        texts.append(obj["text"])
    return ids, texts


# ---- analyze / data ---------------------------------------------------------------------------

def cmd_analyze(args) -> int:
    from .analysis import analyze_run

    console = _console()
    analyze_run(args.run, console=console, top=args.top, out_dir=args.out)
    return 0


def cmd_data_show(args) -> int:
    from .data import dataset_stats, load_word_vectors, render_stats

    console = _console()
    data = _load_data(args.dataset, console, **_data_kwargs(args))
    coverage = None
    if args.vectors:
        _, coverage = load_word_vectors(args.vectors, data.vocab)
    console.print(render_stats(dataset_stats(data, coverage)))
    return 0


# ---- parser -------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    fmt = argparse.RawDescriptionHelpFormatter
    p = argparse.ArgumentParser(prog="xmcnas-fast", description=__doc__, formatter_class=fmt)
    p.add_argument("--version", action="version", version=f"xmcnas-fast {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("search", help="search architectures by regularized evolution", formatter_class=fmt,
                       description="Regularized evolution (Real et al. 2019) over text-encoding DAGs, as XMC-NAS.\n"
                       "Every finished candidate is appended to runs/NAME/history.jsonl; the best models are kept\n"
                       "under runs/NAME/models/. Ctrl-C stops cleanly; --resume continues to the same end.\n\n"
                       "Budgets: demo (default; about 6 minutes on a 2-core CPU with debtags) and paper\n"
                       "(P=20, C=50, S=10, up to 30 epochs, width 512). Every setting below overrides the budget.")
    s.add_argument("--budget", choices=["demo", "paper"], default="demo", help="starting values of every setting")
    s.add_argument("--name", help="run directory name under --runs-dir (default: budget + date)")
    s.add_argument("--runs-dir", default="runs", help="where runs are saved (default: runs)")
    s.add_argument("--resume", metavar="RUN", help="continue the search saved in RUN (a directory)")
    g = s.add_argument_group("search")
    g.add_argument("--strategy", choices=["evolution", "random"], help="random: the ablation with the same budget")
    g.add_argument("--population", type=int, help="P: population size (random architectures first)")
    g.add_argument("--cycles", type=int, help="C: children trained after the initial population")
    g.add_argument("--sample", type=int, help="S: tournament size")
    g.add_argument("--max-depth", type=int, help="most layer nodes in an architecture")
    g.add_argument("--constraint", choices=list(OPERATIONS),
                   help="node 1 of part of the population is this operation reading the embedding")
    g.add_argument("--constraint-fraction", type=float, help="that part (0..1)")
    g = s.add_argument_group("devices")
    g.add_argument("--devices", help="cuda (one worker per GPU), cuda:0,cuda:1, cpu, or cpu:W (W CPU workers); "
                   "several workers per GPU, for candidates too small to fill one: cuda:0x4 (4 on GPU 0), "
                   "cudax2 (2 on every GPU). The CPU cores are split evenly among all the workers")
    g.add_argument("--backend", choices=["local", "inline", "ray"],
                   help="how candidates run (default local: one process per worker; inline: one at a time in "
                   "this process; ray: one Ray actor per worker, with the ray extra installed)")
    g.add_argument("--candidate-timeout", type=float, help="seconds before a candidate is killed and recorded as timeout")
    g.add_argument("--candidate-minutes", type=float, help="training time budget of one candidate (minutes)")
    _add_data_args(s)
    _add_model_args(s)
    _add_train_args(s)
    s.add_argument("--quiet", action="store_true", help="print only the summary")
    s.add_argument("--plain", action="store_true", help="one line per event, even on a terminal")
    s.set_defaults(func=cmd_search)

    t = sub.add_parser("train", help="train one architecture and save a model bundle", formatter_class=fmt,
                       description="Train a preset (attentionxml, discovered, tfidf-mlp) or a genotype JSON\n"
                       '({"nodes": [["bilstm", 0], ["conv3", 1]], "merge": "sum"}) and save it as a bundle.')
    t.add_argument("--arch", required=True, help="preset name or genotype JSON file")
    t.add_argument("--out", help="bundle directory (default: models/ARCH)")
    t.add_argument("--max-minutes", type=float, help="training time budget")
    t.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    t.add_argument("--threads", type=int, help="CPU threads")
    t.add_argument("--quiet", action="store_true")
    _add_data_args(t)
    _add_model_args(t)
    g = t.add_argument_group("tfidf-mlp")
    g.add_argument("--hidden", type=_int_list, help="hidden layer sizes (default 512,256)")
    g.add_argument("--max-features", type=int,
                   help="unigrams and bigrams kept, by document frequency (default 60000)")
    _add_train_args(t)
    t.set_defaults(func=cmd_train)

    e = sub.add_parser("evaluate", help="metrics of a bundle on a test split")
    e.add_argument("bundle", help="model bundle directory")
    e.add_argument("--device")
    e.add_argument("--json", action="store_true", help="also print the metrics as one JSON line")
    _add_data_args(e, dataset_default=None)
    e.set_defaults(func=cmd_evaluate)

    pr = sub.add_parser("predict", help="labels for raw text")
    pr.add_argument("bundle", help="model bundle directory")
    pr.add_argument("text", nargs="*", help="texts to label")
    pr.add_argument("--input", help='JSON lines with a "text" field (and optional "id"); - for stdin')
    pr.add_argument("--output", help="write JSON lines here (default: stdout)")
    pr.add_argument("-k", type=int, default=5, help="labels per text (default 5)")
    pr.add_argument("--json", action="store_true", help="JSON lines even for texts given as arguments")
    pr.add_argument("--device")
    pr.set_defaults(func=cmd_predict)

    a = sub.add_parser("analyze", help="operation-importance analysis of a search")
    a.add_argument("run", help="search directory (runs/NAME)")
    a.add_argument("--top", type=int, default=3, help="best architectures to draw (default 3)")
    a.add_argument("--out", help="where DOT files (and PNG plots, with matplotlib) go (default: RUN/analysis)")
    a.set_defaults(func=cmd_analyze)

    d = sub.add_parser("data", help="inspect a dataset")
    dsub = d.add_subparsers(dest="data_command", metavar="ACTION")
    ds = dsub.add_parser("show", help="statistics of a dataset")
    ds.add_argument("dataset", nargs="?", default="debtags")
    ds.add_argument("--max-len", type=int)
    ds.add_argument("--valid", type=_count_or_fraction)
    ds.add_argument("--data-seed", type=int)
    ds.add_argument("--vectors", help="report the vocabulary coverage of these word vectors")
    ds.set_defaults(func=cmd_data_show)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0 if args.command is None else 2
    try:
        return args.func(args)
    except CLIError as e:
        print(f"xmcnas-fast: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("xmcnas-fast: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # known, user-facing failures from the library: one line, no traceback
        from .data import DataError
        from .runs import RunError

        if isinstance(e, (RunError, DataError, FileNotFoundError)):
            print(f"xmcnas-fast: error: {e}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    sys.exit(main())
