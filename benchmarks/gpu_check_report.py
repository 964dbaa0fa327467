"""The figures of a benchmarks/gpu_check.sh run: one table printed, gpu_check.md and gpu_check.json written.

Reads the steps file (name, status, seconds), the combined log, the trained bundle, the search runs
and the pytest-benchmark JSON. Exits 1 when a step failed, else 2 when steps were cut short (stopped
by their time limit, or never started for want of time), else 0.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys


def sections(log: str) -> dict:
    """The log's text under each '== NAME: ...' header."""
    out, name = {}, None
    for line in log.splitlines():
        m = re.match(r"== (\S+): ", line)
        if m:
            name = m.group(1)
            out[name] = []
        elif name:
            out[name].append(line)
    return {k: "\n".join(v) for k, v in out.items()}


def pytest_summary(text: str) -> str | None:
    lines = [ln.strip("= ") for ln in text.splitlines()
             if re.search(r"\d+ (passed|failed|error)", ln) and not ln.startswith("========= ")]  # not the sanitizer's
    return lines[-1] if lines else None


def parity(text: str) -> dict | None:
    m = re.search(r"validation P@5 after (\d+) steps: cpu ([\d.]+), cuda ([\d.]+), label prior ([\d.]+)", text)
    if not m:
        return None
    steps, cpu, cuda, prior = int(m.group(1)), *map(float, m.groups()[1:])
    return {"steps": steps, "cpu_valid_P@5": cpu, "cuda_valid_P@5": cuda, "label_prior_P@5": prior,
            "difference": round(cuda - cpu, 2)}


# compute-sanitizer's reports: the summary line it prints at exit, and each finding as it goes (a step
# cut short by its time limit has findings but no summary).
SUMMARY = re.compile(r"(?:ERROR|RACECHECK) SUMMARY: (\d+) (?:error|hazard)")
FINDING = re.compile(r"^========= (?:Invalid |Program hit |Race reported|.*[Hh]azard|Barrier error|Uninitialized |"
                     r"Error: |Leaked )", re.M)


def sanitizer(text: str) -> dict | None:
    """compute-sanitizer's findings in one step's output: {"errors": n, "complete": whether it summed them
    up at exit}, or None when the step shows no sign of the sanitizer."""
    summaries = [int(n) for n in SUMMARY.findall(text)]
    if summaries:
        return {"errors": sum(summaries), "complete": True}
    found = len(FINDING.findall(text))
    return {"errors": found, "complete": False} if found or "COMPUTE-SANITIZER" in text else None


def trained(bundle: str) -> dict | None:
    path = os.path.join(bundle, "metrics.json")
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        rec = json.load(f)
    test = rec.get("test") or {}
    return {"device": rec.get("device"), "steps": rec.get("steps"), "epochs": rec.get("epochs"),
            "seconds": rec.get("seconds"),
            "test P@1/3/5": [round(100 * test.get(f"P@{k}", float("nan")), 2) for k in (1, 3, 5)],
            "train_docs_per_s": round(rec.get("train_docs_per_s") or 0.0, 1),
            "predict_docs_per_s": round(rec.get("predict_docs_per_s") or 0.0, 1),
            "peak_memory_mb": rec.get("peak_memory_mb")}


def searches(runs: str, steps: dict) -> dict:
    out = {}
    if not os.path.isdir(runs):
        return out
    for name in sorted(os.listdir(runs)):
        hist = os.path.join(runs, name, "history.jsonl")
        if not os.path.exists(hist):
            continue
        with open(hist, encoding="utf-8") as f:
            recs = [json.loads(line) for line in f if line.strip()]
        workers = name.rsplit("-x", 1)[-1]
        wall = float(steps.get(f"search_x{workers}", {}).get("seconds") or 0.0)
        fit = [r["fitness"] for r in recs if r.get("fitness") is not None]
        statuses = sorted({r.get("status") for r in recs})
        out[f"x{workers}"] = {
            "candidates": len(recs), "statuses": statuses, "wall_seconds": wall,
            "candidates_per_hour": round(len(recs) / wall * 3600, 1) if wall else None,
            "mean_candidate_seconds": round(sum(r.get("seconds") or 0 for r in recs) / max(len(recs), 1), 1),
            "best_valid_P@5": round(100 * max(fit), 2) if fit else None}
    return out


def benchmarks(path: str) -> list:
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        doc = json.load(f)
    rows = []
    for b in doc.get("benchmarks", []):
        extra = {k: (round(v, 3) if isinstance(v, float) else v) for k, v in (b.get("extra_info") or {}).items()}
        rows.append({"name": b["name"], "median_ms": round(1e3 * b["stats"]["median"], 3), **extra})
    return rows


def sanitizer_note(found: dict | None) -> str | None:
    if found is None:
        return None
    return f"{found['errors']} sanitizer findings" + ("" if found["complete"] else " before it was stopped")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    for flag in ("--steps", "--log", "--bundle", "--runs", "--bench", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--device", default="cuda")
    a = p.parse_args(argv)
    with open(a.steps, encoding="utf-8") as f:
        steps = {n: {"status": s, "seconds": float(t)} for n, s, t in (ln.rstrip("\n").split("\t") for ln in f if ln.strip())}
    with open(a.log, encoding="utf-8", errors="replace") as f:
        log = f.read()
    sec = sections(log)
    gpu = None
    try:
        import torch

        gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
        versions = {"torch": torch.__version__, "cuda": torch.version.cuda}
    except ImportError:
        versions = {}
    kernels = re.search(r"^kernels: (.*)$", log, re.M)
    checked = {name: sanitizer(sec.get(name, "")) for name in steps
               if name.split("_")[0] in ("memcheck", "racecheck", "synccheck")}
    cut = [n for n, st in steps.items() if st["status"].startswith("CUT")]
    figures = {
        "machine": {"gpu": gpu, "device": a.device, "cpu_cores": os.cpu_count(), "host": platform.node(),
                    **versions, "kernels": kernels.group(1) if kernels else None},
        "steps": steps,
        "tests": pytest_summary(sec.get("tests", "")),
        "tests_simple_kernels": pytest_summary(sec.get("tests_simple", "")),
        "sanitizer": {name: {**(found or {}), "tests": pytest_summary(sec.get(name, ""))}
                      for name, found in checked.items()},
        "cut_short": cut,
        "parity": parity(sec.get("parity", "")),
        "train": trained(a.bundle),
        "evaluate": next((json.loads(ln) for ln in reversed(sec.get("evaluate", "").splitlines())
                          if ln.startswith("{")), None),
        "search": searches(a.runs, steps),
        "bench_cuda": benchmarks(a.bench),
    }
    md = [f"# GPU check: {gpu or 'no GPU'} ({a.device}), torch {versions.get('torch')}", "",
          "| step | status | seconds | figure |", "|---|---|---|---|"]
    notes = {"tests": figures["tests"], "tests_simple": figures["tests_simple_kernels"],
             "host_paths": pytest_summary(sec.get("host_paths", "")),
             **{name: "; ".join(x for x in (sanitizer_note(found), pytest_summary(sec.get(name, ""))) if x)
                for name, found in checked.items()},
             "parity": json.dumps(figures["parity"]) if figures["parity"] else None,
             "train": json.dumps(figures["train"]) if figures["train"] else None,
             "bench": f"{len(figures['bench_cuda'])} cases in bench_cuda.json" if figures["bench_cuda"] else None}
    for name, st in steps.items():
        note = notes.get(name)
        if name.startswith("search_x") and name[len("search_"):] in figures["search"]:
            note = json.dumps(figures["search"][name[len("search_"):]])
        md.append(f"| {name} | {st['status']} | {st['seconds']} | {note or ''} |")
    if figures["bench_cuda"]:
        md += ["", "## bench_cuda (median of few rounds)", "", "```"]
        md += [json.dumps(r) for r in figures["bench_cuda"]]
        md += ["```"]
    if cut:
        md += ["", f"Cut short (stopped by their time limit, or never started within the budget): {', '.join(cut)}"]
    text = "\n".join(md) + "\n"
    with open(os.path.join(a.out, "gpu_check.md"), "w", encoding="utf-8") as f:
        f.write(text)
    with open(os.path.join(a.out, "gpu_check.json"), "w", encoding="utf-8") as f:
        json.dump(figures, f, indent=2)
    print(text)
    failed = [n for n, st in steps.items() if st["status"].startswith("FAIL")]
    if failed:
        print(f"failed steps: {', '.join(failed)} (see {os.path.join(a.out, 'gpu_check.log')})", file=sys.stderr)
    if cut:
        print(f"steps cut short: {', '.join(cut)} (raise GPU_CHECK_BUDGET, or run them alone with GPU_CHECK_SKIP)",
              file=sys.stderr)
    return 1 if failed else 2 if cut else 0


if __name__ == "__main__":
    sys.exit(main())
