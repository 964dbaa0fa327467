"""`xmcnas-fast train`, `evaluate` and `predict`: one model bundle at a time."""
from __future__ import annotations

import json
import os
import sys

from .common import (MODEL_FLAGS, TRAIN_FLAGS, CLIError, console, data_kwargs, load_bundle, load_data, pick)

# ---- train ----------------------------------------------------------------------------------------


def model_config(args):
    """(ModelConfig, name) of --arch (a genotype JSON file or a preset), with the model flags applied."""
    from ..model import ModelConfig, preset
    from ..space import Genotype

    if os.path.exists(args.arch) or args.arch.endswith(".json"):
        try:
            with open(args.arch, encoding="utf-8") as f:
                g = Genotype.from_dict(json.load(f))
        except FileNotFoundError:
            raise CLIError(f"{args.arch}: no such file (and not a preset)") from None
        except (json.JSONDecodeError, ValueError, TypeError) as e:
            raise CLIError(f"{args.arch}: not a genotype ({e})") from None
        mcfg, name = ModelConfig(genotype=g.to_dict()), os.path.splitext(os.path.basename(args.arch))[0]
    else:
        try:
            mcfg, name = preset(args.arch), args.arch
        except ValueError as e:
            raise CLIError(str(e)) from None
    check_tfidf_flags(args, mcfg.kind)
    for k, v in pick(args, [*MODEL_FLAGS, "hidden", "max_features"]).items():
        setattr(mcfg, k, v)
    return mcfg, name


def check_tfidf_flags(args, kind: str) -> None:
    tfidf_only = pick(args, ["hidden", "max_features"])
    if tfidf_only and kind != "tfidf-mlp":
        raise CLIError(f"only tfidf-mlp takes --{' and --'.join(k.replace('_', '-') for k in tfidf_only)}")


def train_config(args):
    """TrainConfig: the preset's known-good settings, then the flags given (where it runs, --device and
    --threads, is no setting: train_model is told)."""
    from ..model import PRESET_TRAINING
    from ..train import TrainConfig

    given = {TRAIN_FLAGS[k]: v for k, v in pick(args, TRAIN_FLAGS).items()}
    return TrainConfig(**{**PRESET_TRAINING.get(args.arch, {}), **given,
                          **pick(args, ["seed", "max_minutes", "max_len"])})


def train_device(args) -> str:
    import torch

    return args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def word_vectors(args, data, dim: int, seed: int, out):
    from ..data import wants_vectors, word_vectors as make

    if not wants_vectors(args.vectors):
        return None
    vectors, coverage, said = make(args.vectors, data, dim, seed=seed)
    out.print(f"{said}: {vectors.shape[1]} dimensions, {100 * coverage:.1f}% of the vocabulary")
    return vectors


def lexical_stage(data, out, args, shortlist: int = 0) -> tuple:
    """(the stage fitted without the validation split, the serving stage or None: --lexical-refit)."""
    from ..lexical import LexicalSettings, TreeSettings, cached_stage

    settings = LexicalSettings(tree=TreeSettings(ensemble=args.lexical_trees or 1), ovr=args.lexical_ovr or "auto",
                               shortlist=shortlist)
    stage = cached_stage(data, settings, threads=args.threads or 0, log=out.print)
    if args.lexical_refit is False or shortlist:
        return stage, None
    out.print("serving stage: the same, fitted on every training document, validation included")
    return stage, cached_stage(data, settings, threads=args.threads or 0, log=out.print, serving=True)


def shortlist_of(args, data, kind: str) -> int:
    """K, the labels the network scores per document (0: every label), by the data's label count."""
    from ..lexical.shortlist import SHORTLIST_ABOVE, SHORTLIST_K, shortlist_size

    above = SHORTLIST_ABOVE if args.shortlist_above is None else args.shortlist_above
    k = shortlist_size(args.shortlist_k or SHORTLIST_K, above, data.num_labels)
    if k and kind != "dag":
        raise CLIError(f"{data.num_labels:,} labels call for a shortlist (above --shortlist-above {above}), which "
                       f"only the attention networks score: pick one, or raise --shortlist-above")
    return k


def cmd_train_lexical(args, out) -> int:
    """--arch plt: the lexical stage alone, as a bundle."""
    from ..bundle import save_bundle

    from ..lexical import lexical_split_metrics

    data = load_data(args.dataset, out, **data_kwargs(args))
    stage, serving = lexical_stage(data, out, args)
    rec = {"status": "ok", "model": "plt", **lexical_split_metrics(stage, data)}
    if serving is not None:
        rec.update(lexical_split_metrics(serving, data, ("test",)))
    path = args.out or os.path.join("models", "plt")
    save_bundle(path, None, None, data, record=rec, lexical=(serving or stage).folder)
    from ..metrics import format_metrics

    out.print(f"validation: {format_metrics(rec['valid'])}")
    out.print(f"test:       {format_metrics(rec['test'])}")
    out.print(f"saved: {path}", soft_wrap=True)
    return 0


def cmd_train(args) -> int:
    from ..bundle import save_bundle
    from ..model import build_model, count_parameters

    out = console(args.quiet)
    if args.arch == "plt":
        return cmd_train_lexical(args, out)
    mcfg, name = model_config(args)
    tcfg, device = train_config(args), train_device(args)
    data = load_data(args.dataset, out, **data_kwargs(args))
    mcfg.shortlist = shortlist_of(args, data, mcfg.kind)
    lexical = lists = None
    if args.lexical or mcfg.shortlist:
        from ..train import LexicalLists

        if mcfg.shortlist:
            from ..lexical import LexicalSettings

            source = ("label tree" if LexicalSettings().matcher_for(data.num_labels) == "tree" else "label centroids")
            out.print(f"{data.num_labels:,} labels: the network scores a shortlist of {mcfg.shortlist} per document "
                      f"from the lexical stage's {source}")
        stage, serving = lexical_stage(data, out, args, mcfg.shortlist)
        lexical = serving or stage                       # the stage the bundle carries
        lists = LexicalLists.from_stage(stage.folder, serving=serving and serving.folder,
                                        rank=args.lexical_ranker is not False)
    vectors = word_vectors(args, data, mcfg.emb_dim, tcfg.seed, out)
    model = build_model(mcfg, len(data.vocab), data.num_labels, vectors=vectors, seed=tcfg.seed)
    if mcfg.kind == "tfidf-mlp":
        model.fit(data.train.token_ids, data.train.offsets)
    out.print(f"[bold]{name}[/bold]: {count_parameters(model):,} parameters, "
              f"{len(data.train)} training documents, {data.num_labels} labels, device {device}")
    rec = train_with_progress(model, data, tcfg, out, args.quiet, device=device, threads=args.threads,
                              lexical=lists).record
    if rec["status"] not in ("ok", "stopped"):
        raise CLIError(f"training failed: {rec['status']}: {rec.get('error')}")
    path = args.out or os.path.join("models", name + ("+plt" if lexical else ""))
    fusion = None
    if lexical is not None:
        from ..lexical import Fusion

        fusion = Fusion.from_dict(rec["fused"]["fusion"])
    save_bundle(path, model, mcfg, data, train_cfg=tcfg.to_dict(), record=rec,
                lexical=lexical.folder if lexical else None, fusion=fusion)
    print_training(out, rec, path)
    return 0


def print_training(out, rec: dict, path: str) -> None:
    from ..metrics import format_metrics

    out.print(f"validation: {format_metrics(rec['valid'])}")
    if rec.get("test"):
        out.print(f"test:       {format_metrics(rec['test'])}")
    if rec.get("fused"):
        from ..lexical import Fusion

        out.print(f"fused with the lexical stage ({Fusion.from_dict(rec['fused']['fusion']).describe()}):")
        out.print(f"validation: {format_metrics(rec['fused']['valid'])}")
        if rec["fused"].get("test"):
            out.print(f"test:       {format_metrics(rec['fused']['test'])}")
    if rec.get("shortlist"):
        recall = rec["shortlist"]["recall"]
        out.print(f"shortlist of {rec['shortlist']['k']} labels: recall " +
                  "  ".join(f"{split} {100 * r:.2f}%" for split, r in recall.items()))
    out.print(f"{rec['epochs']} epochs, {rec['steps']} steps, {rec['seconds']:.0f} s, "
              f"{rec['train_docs_per_s'] or 0:.0f} training docs/s, "
              f"{rec.get('predict_docs_per_s') or 0:.0f} predict docs/s")
    out.print(f"saved: {path}", soft_wrap=True)


def train_with_progress(model, data, tcfg, out, quiet: bool, *, device="cpu", threads=None, lexical=None):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn

    from ..train import train_model

    total = -(-len(data.train) // tcfg.batch_size) * tcfg.max_epochs
    if tcfg.max_steps:
        total = min(total, tcfg.max_steps)
    with Progress(TextColumn("training"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
                  TextColumn("{task.fields[info]}"), TimeElapsedColumn(), console=out, disable=quiet) as bar:
        task = bar.add_task("train", total=total, info="")

        def report(epoch, step, loss, valid_p1, valid_p5, best_p5):
            info = (f"epoch {epoch}  loss {loss:.4f}  valid P@1 {100 * valid_p1:.2f}  "
                    f"{'fused ' if lexical else ''}P@5 {100 * valid_p5:.2f} (best {100 * best_p5:.2f})")
            bar.update(task, completed=step, info=info)
            if not out.is_terminal and not quiet:
                out.print(f"step {step}: {info}")

        return train_model(model, data, tcfg, device=device, threads=threads, on_progress=report, lexical=lexical)


# ---- evaluate / predict -----------------------------------------------------------------------------

def cmd_evaluate(args) -> int:
    from rich.table import Table

    from ..metrics import METRIC_NAMES
    from ..train import evaluate

    out = console(stderr=args.json)   # with --json, stdout holds the JSON line alone
    bundle = load_bundle(args.bundle, args.device, out)
    saved = bundle.config["data"]
    name = args.dataset or saved.get("location") or saved.get("name") or "debtags"
    data = load_data(name, out, **data_kwargs(args, {"max_len": bundle.max_len,
                                                     **bundle.config["data"].get("settings", {})}))
    test, inv_prop = bundle.aligned_test(data)
    rows, lists, shortlist = {}, None, None
    if bundle.lexical is not None:
        top_k = bundle.lexical.settings.top_k
        ids, probs = bundle.lexical_lists(data, max(top_k, bundle.shortlist))
        lists = (ids[:, :top_k], probs[:, :top_k])
        shortlist = ids[:, :bundle.shortlist] if bundle.shortlist else None
        from ..lexical.fusion import lists_metrics

        rows["lexical"] = lists_metrics(lists, test.labels, len(bundle.label_names), inv_prop)
    if bundle.model is not None:
        m = evaluate(bundle.model, test, len(bundle.label_names), inv_prop=inv_prop, device=bundle.device,
                     max_len=bundle.max_len, precision=bundle.precision, lexical=lists, fusion=bundle.fusion,
                     shortlist=shortlist)
        rows = {"network": m, **rows}
        if "fused" in m:
            rows["fused"] = m.pop("fused")
    # a column per model, a row per metric: three models fit in 80 columns
    t = Table(title=f"{args.bundle} on {name} (test, {len(test)} documents)")
    t.add_column("metric", no_wrap=True)
    members = len(getattr(bundle.model, "members", ()))
    for label in rows:
        shown = f"{members} networks" if label == "network" and members else label   # an ensemble's
        t.add_column(shown + (" (served)" if len(rows) > 1 and label == list(rows)[-1] else ""), justify="right",
                     no_wrap=True)
    for n in METRIC_NAMES:
        t.add_row(n, *[f"{100 * m[n]:.2f}" for m in rows.values()])
    out.print(t)
    if "network" in rows:
        out.print(f"{rows['network']['docs_per_s']:.0f} documents/s (network)")
    recall = rows.get("network", {}).get("shortlist_recall")
    if recall is not None:
        out.print(f"shortlist of {bundle.shortlist} labels a document: it holds {100 * recall:.2f}% of the test "
                  f"split's true labels (the rest count in every denominator, never hit)")
    if args.json:
        served = list(rows.values())[-1]
        print(json.dumps({**{k: served[k] for k in METRIC_NAMES},
                          **({"shortlist_recall": recall} if recall is not None else {}),
                          **({"parts": {r: {k: m[k] for k in METRIC_NAMES} for r, m in rows.items()}}
                             if len(rows) > 1 else {})}))
    return 0


def cmd_predict(args) -> int:
    bundle = load_bundle(args.bundle, args.device, console(stderr=True))
    if args.input:
        ids, texts = read_predict_input(args.input)
    elif args.text:
        ids, texts = list(range(len(args.text))), list(args.text)
    else:
        raise CLIError("give texts to label, or --input FILE (JSON lines with a \"text\" field; - for stdin)")
    preds = bundle.predict(texts, k=args.k)
    if args.input or args.output or args.json:
        write_predictions(args.output, ids, preds)
    else:
        out = console()
        for t, p in zip(texts, preds):
            out.print(f"[bold]{t[:100]}[/bold]")
            for n, s in p:
                out.print(f"  {s:.3f}  {n}")
    return 0


def write_predictions(path, ids, preds) -> None:
    """JSON lines {"id", "labels": [[name, score], ...]} to `path` (written whole or not at all), or stdout."""
    from ..runs import write_atomic

    lines = (json.dumps({"id": i, "labels": [[n, round(s, 6)] for n, s in p]}, ensure_ascii=False) + "\n"
             for i, p in zip(ids, preds))
    if path:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(folder):
            raise CLIError(f"{path}: the folder {folder} does not exist (--output)")
        write_atomic(path, lambda f: f.writelines(lines))
    else:
        sys.stdout.writelines(lines)


def read_predict_input(path: str):
    """(ids, texts) from JSON lines with a "text" field and an optional "id" (- for stdin)."""
    from ..data import DataError, json_objects

    lines = enumerate(sys.stdin, start=1) if path == "-" else None
    ids, texts = [], []
    try:
        for n, obj in json_objects(path, lines):
            if not isinstance(obj.get("text"), str):
                raise CLIError(f'{path}:{n}: expected an object with a "text" string')
            ids.append(obj.get("id", n))
            texts.append(obj["text"])
    except DataError as e:
        raise CLIError(str(e)) from None
    return ids, texts
