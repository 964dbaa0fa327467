"""`xmcnas-fast search`: everything is checked (settings, devices, data) before the run directory is
created, so a search that cannot start leaves nothing behind."""
from __future__ import annotations

import os
import shlex
import time
from typing import Optional

from ..final import search_deadline
from .common import CLIError, console, flag, load_data, program

#: (flag dest, config section, config key) of every setting of a search
SETTINGS = [
    ("max_len", "data", "max_len"), ("max_len", "train", "max_len"), ("valid", "data", "valid"),
    ("vectors", "data", "vectors"), ("data_seed", "data", "seed"),
    ("strategy", "search", "strategy"), ("population", "search", "population"), ("cycles", "search", "cycles"),
    ("sample", "search", "sample"), ("max_depth", "search", "max_depth"), ("constraint", "search", "constraint"),
    ("constraint_fraction", "search", "constraint_fraction"), ("seed", "search", "seed"),
    ("width", "model", "width"), ("emb_dim", "model", "emb_dim"), ("fc", "model", "fc"),
    ("dropout", "model", "dropout"), ("freeze_emb", "model", "freeze_emb"),
    ("epochs", "train", "max_epochs"), ("max_steps", "train", "max_steps"), ("min_steps", "train", "min_steps"),
    ("batch_size", "train", "batch_size"),
    ("lr", "train", "lr"), ("warmup_steps", "train", "warmup_steps"), ("eval_every", "train", "eval_every"),
    ("patience", "train", "patience"), ("candidate_minutes", "train", "max_minutes"),
    ("precision", "train", "precision"), ("lr_schedule", "train", "lr_schedule"),
    ("inherit_weights", "search", "inherit"), ("fidelity", "search", "fidelity"), ("promote", "search", "promote"),
    ("final", "final", "enabled"), ("final_width", "final", "width"), ("final_epochs", "final", "max_epochs"),
    ("final_minutes", "final", "max_minutes"), ("total_minutes", "final", "total_minutes"),
    ("final_min_minutes", "final", "min_minutes"), ("final_inherit", "final", "inherit"),
    ("ensemble", "final", "ensemble"), ("ensemble_min_gain", "final", "ensemble_min_gain"),
    ("lexical", "lexical", "enabled"), ("lexical_mode", "lexical", "mode"), ("lexical_trees", "lexical", "trees"),
    ("lexical_ovr", "lexical", "ovr"), ("lexical_refit", "lexical", "refit"), ("lexical_fitness", "lexical", "fitness"),
    ("lexical_ranker", "lexical", "ranker"),
    ("shortlist_above", "lexical", "shortlist_above"), ("shortlist_k", "lexical", "shortlist_k"),
]
#: data settings stored beside the budget's (CSV columns)
COLUMNS = ("text_column", "labels_column")
#: how this invocation runs the search: allowed with --resume (a new search saves them as the run's
#: defaults, which a resume's flags override)
RUN_FLAGS = ("backend", "devices", "candidate_timeout")


def overrides(args) -> dict:
    """make_config's overrides {section: {key: value}} from the flags given."""
    o: dict = {"data": {}, "search": {}, "model": {}, "train": {}, "final": {}, "lexical": {}}
    for dest, section, key in SETTINGS:
        if getattr(args, dest, None) is not None:
            o[section][key] = getattr(args, dest)
    o["run"] = {d: getattr(args, d) for d in RUN_FLAGS if getattr(args, d, None) is not None}
    return o


def settings_changed(args, cfg: dict) -> list:
    """The flags given whose value differs from the run's saved settings."""
    def saved_value(section, key):
        return (cfg.get(section) or {}).get(key)

    saved = [("budget", cfg.get("budget")), ("dataset", saved_value("data", "dataset")),
             *[(d, saved_value(section, key)) for d, section, key in SETTINGS],
             *[(c, saved_value("data", c)) for c in COLUMNS]]
    return list(dict.fromkeys(flag(d, getattr(args, d)) for d, was in saved
                              if getattr(args, d, None) is not None and getattr(args, d) != was))


def new_run_config(args) -> dict:
    from ..config import make_config

    try:
        cfg = make_config(args.budget or "demo", dataset=args.dataset or "debtags", overrides=overrides(args))
    except ValueError as e:
        raise CLIError(str(e)) from None
    for c in COLUMNS:
        if getattr(args, c) is not None:
            cfg["data"][c] = getattr(args, c)
    return cfg


def device_request(devices: str, backend: str):
    """The --devices spec parsed (the one parse of it: the search is handed the result). Whether the
    GPUs it names exist is checked here against this machine's, except with Ray, whose workers run
    on the cluster's GPUs: the scheduler checks those when it opens."""
    from ..scheduler.devices import parse_request

    try:
        request = parse_request(devices)
        if backend != "ray":
            request.resolve()
    except ValueError as e:
        raise CLIError(f"--devices {devices}: {e}") from None
    return request


def check_before_creating(cfg: dict, devices: str, backend: str, out) -> None:
    """Devices, the lexical stage's library, word vectors and data, checked in that order (data errors
    name the file and line); loading the data here also fills the cache the search reads it from. The
    head's shortlist, decided by the data's label count, is recorded in `cfg` (model.shortlist)."""
    from ..config import resolve_shortlist
    from ..data.corpus_vectors import CORPUS, wants_vectors

    import importlib.util

    device_request(devices, backend)
    if cfg["lexical"]["enabled"] and importlib.util.find_spec("napkinxc") is None:
        raise CLIError("the lexical stage needs napkinXC, which is not installed: pip install napkinxc==0.7.2 "
                       "(or search the networks alone: --no-lexical)")
    d = cfg["data"]
    if wants_vectors(d.get("vectors")) and d["vectors"] != CORPUS and not os.path.isfile(d["vectors"]):
        raise CLIError(f"{d['vectors']}: no such file (--vectors takes a GloVe / word2vec text file, "
                       f"'corpus' or 'none')")
    data = load_data(d["dataset"], out, max_len=d["max_len"], min_count=d["min_count"], max_vocab=d["max_vocab"],
                     valid=d["valid"], seed=d["seed"], **{c: d[c] for c in COLUMNS if d.get(c) is not None})
    try:
        resolve_shortlist(cfg, data.num_labels)
    except ValueError as e:
        raise CLIError(str(e)) from None


def check_backend(backend) -> None:
    """The ray backend needs Ray installed: say so in one line, before anything is created or run."""
    import importlib.util

    if backend == "ray" and importlib.util.find_spec("ray") is None:
        from ..scheduler.ray_backend import RAY_INSTALL_HINT

        raise CLIError(f"--backend ray needs Ray, which is not installed: {RAY_INSTALL_HINT}")


def open_or_create(args, out):
    from ..config import devices_text
    from ..runs import Run

    if args.resume:
        run = Run.open(args.resume)
        changed = settings_changed(args, run.config)
        if changed:
            raise CLIError(f"--resume continues {args.resume} with its saved settings; drop {' '.join(changed)} "
                           f"(or start a new search with them)")
        check_backend(args.backend or run.config["run"]["backend"])
        return run
    cfg = new_run_config(args)
    check_backend(args.backend or cfg["run"]["backend"])
    path = os.path.join(args.runs_dir, args.name or time.strftime(f"{cfg['budget']}-%Y%m%d-%H%M%S"))
    Run.check_free(path)   # before the data is read, which may take a while
    check_before_creating(cfg, devices_text(cfg, args.devices), args.backend or cfg["run"]["backend"], out)
    return Run.create(path, cfg)


def header(run, devices: str) -> list:
    """The search's settings, a few short lines (no line breaks inside a setting at 80 columns)."""
    cfg = run.config
    s, t = cfg["search"], cfg["train"]
    return [f"[bold]xmcnas-fast search[/bold] {run.path}",
            f"  {s['strategy']}: population {s['population']}, cycles {s['cycles']}, sample {s['sample']}, "
            f"depth <= {s['max_depth']}",
            f"  per candidate: width {cfg['model']['width']}, at most {t['max_epochs']} epochs"
            + (f" and {t['max_minutes']} min" if t.get("max_minutes") else "")
            + (f", {s['fidelity']} steps first" if s.get("fidelity") else "")
            + (", inheriting weights" if s.get("inherit") else ""),
            *final_line(cfg),
            f"  dataset {cfg['data']['dataset']}; devices {devices}"]


def final_line(cfg: dict) -> list:
    """The header's line on the final model (none for a run made before it existed, or without one)."""
    f = cfg["final"]
    if not f["enabled"]:
        return []
    width = f["width"] or cfg["model"]["width"]
    epochs = f["max_epochs"] or cfg["train"]["max_epochs"]
    limit = (f" and {f['max_minutes']} min" if f["max_minutes"] else "") + \
        (f", until minute {f['total_minutes']}" if f["total_minutes"] else "")
    start = "" if f["inherit"] else ", from scratch"
    lines = [f"  then the best to the end: width {width}, at most {epochs} epochs{limit}{start}"]
    deadline = search_deadline(cfg)
    if deadline is not None:
        lines.append(f"  (no candidate starts after minute {deadline / 60:.1f}: the final training keeps "
                     f"{f['min_minutes']} min)")
    return lines


def cmd_search(args) -> int:
    from ..config import candidate_total, devices_text
    from ..progress import SearchProgress
    from ..search import run_search

    out = console()   # --quiet silences the header and the progress, not the summary
    run = open_or_create(args, out)
    run.lock()
    try:
        devices = devices_text(run.config, args.devices)
        request = device_request(devices, args.backend or run.config["run"]["backend"])
        for line in [] if args.quiet else header(run, devices):
            out.print(line, soft_wrap=True)
        with SearchProgress(candidate_total(run.config), [], done=len(run.history.records), quiet=args.quiet,
                            console=out, live=False if args.plain else None) as progress:
            outcome = run_search(run, progress=progress, backend=args.backend, devices=request,
                                 candidate_timeout=args.candidate_timeout)
    finally:
        run.unlock()
    if outcome.interrupted:
        out.print(f"[yellow]interrupted[/yellow] after {outcome.finished}/{outcome.total} candidates; "
                  f"continue with:\n  {program()} search --resume {shlex.quote(run.path)}", soft_wrap=True)
        return 130
    print_summary(out, run)
    return 0


def print_summary(out, run) -> None:
    from ..config import candidate_total
    from ..space import Genotype

    best, final = run.best(), run.final()
    recs = run.history.records
    ok = [r for r in recs if r.get("fitness") is not None]
    out.print(f"\n{len(recs)} candidates, {len(ok)} trained successfully, "
              f"{sum(1 for r in recs if r.get('reused_from') is not None)} reused; "
              f"{sum(r.get('seconds') or 0 for r in recs):.0f} s of training")
    if not best:
        out.print("[red]no candidate finished successfully[/red]")
        return
    cand_id = final["of"] if final else best["id"]
    rec = next(r for r in recs if r["id"] == cand_id)
    out.print(f"\n[bold]best architecture[/bold] (candidate #{rec['id']}, validation P@5 "
              f"{100 * rec['fitness']:.2f}" + (" after its short run" if rec.get("short") and not rec.get("rung")
                                               else "") + "):")
    shown = final if final and final.get("layer_weights") else rec
    out.print(Genotype.from_dict(rec["genotype"]).draw(shown.get("layer_weights")))
    out.print(result_table(rec, final, run.lexical(), run.ensemble()))
    if (run.lexical() or {}).get("serving"):
        out.print("test figures with the lexical stage are its serving stage's: refit on every training document")
    if final and final.get("fitness") is None:
        out.print(f"[red]the final training ended {final['status']}[/red]: {final.get('error') or ''}; "
                  f"the result is the best candidate")
    elif final and best.get("id") != "final":
        out.print(f"[yellow]the final model's validation P@5 {100 * final['fitness']:.2f} is below the "
                  f"candidate's {100 * rec['fitness']:.2f}[/yellow]: the result is the candidate")
    if final and final.get("candidates") is not None and final["candidates"] < candidate_total(run.config):
        out.print(f"the search's time was up after {final['candidates']} of {candidate_total(run.config)} "
                  f"candidates (the final training's share of --total-minutes was kept for it)")
    out.print(peak_memory_line(recs + ([final] if final else [])))
    prog, bundle = program(), best.get("model_dir") or ""
    for line in (f"model bundle: {bundle}", "predict with:",
                 f"  {prog} predict {shlex.quote(bundle)} \"some text\"", "analysis:",
                 f"  {prog} analyze {shlex.quote(run.path)}"):
        out.print(line, soft_wrap=True)   # a path is never broken across lines: it copies as one


def peak_memory_line(records: list) -> str:
    """The search's memory high-water marks: this process's, its largest finished worker's (the
    operating system's account of both) and the largest a training recorded."""
    import resource

    own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20              # KiB on Linux
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    trained = max((r.get("peak_memory_mb") or 0 for r in records), default=0) / 1024
    return (f"peak memory: {own:.1f} GiB this process, {workers:.1f} GiB its largest worker process, "
            f"{trained:.1f} GiB the largest a training recorded")


SUMMARY_METRICS = ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5")


def result_table(rec: dict, final, lexical: Optional[dict] = None, ensemble: Optional[dict] = None) -> object:
    """Validation P@5 and test metrics of the best candidate (the search's proxy), of the final model
    (that architecture trained to the end) and of the ensemble when one was kept, one row each: fused
    with the lexical stage when the search used one (then the stage alone and the result's networks
    alone have rows too)."""
    from rich.table import Table

    def figures(r):
        fused = r.get("fused")
        return (fused["valid"], fused.get("test") or {}) if fused else (r.get("valid") or {}, r.get("test") or {})

    rows = [(f"candidate #{rec['id']} (search)", *figures(rec))]
    if final and final.get("fitness") is not None:
        s = final.get("settings") or {}
        width = (s.get("model") or {}).get("width")
        rows.append((f"final, width {width}", *figures(final)))
    result = 1 if len(rows) == 2 and final.get("chosen", True) else 0
    served = final if result else rec
    if ensemble and ensemble.get("chosen"):
        rows.append((f"ensemble of {len(ensemble['members'])}: {' + '.join(ensemble['members'])}", *figures(ensemble)))
        result, served = len(rows) - 1, ensemble
    rows[result] = (rows[result][0] + " [bold](result)[/bold]", *rows[result][1:])
    if served.get("fused"):
        rows.append(("  its network" + ("s" if served is ensemble else "") + " alone", served.get("valid") or {},
                     served.get("test") or {}))
    if lexical:
        rows.append(("lexical stage alone", lexical["valid"], lexical["test"]))
    names = [n for n in SUMMARY_METRICS if any(n in test for _, _, test in rows)]
    t = Table(title="validation P@5 and test split" + (" (fused with the lexical stage)" if served.get("fused") else ""))
    t.add_column("model", no_wrap=True)
    t.add_column("valid P@5", justify="right")
    for n in names:
        t.add_column(n, justify="right")
    for label, valid, test in rows:
        t.add_row(label, f"{100 * valid['P@5']:.2f}", *[f"{100 * test[n]:.2f}" if n in test else "-" for n in names])
    return t
