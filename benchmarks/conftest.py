"""Shared set-up of the benchmarks: the import of this checkout's in-place
build, and a summary of ratios printed after pytest-benchmark's table.

A benchmark takes part in the summary through its extra_info:
  role   "ours", "peer", "floor" (the time some minimal memory traffic takes)
         or "context" (a related operation, for scale)
  what   a short description of a floor or a context, printed beside it
Per group, the summary prints each peer's median over ours (how many times
faster ours is), and ours over each floor or context (how close to it ours
comes).
"""
import os
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # the in-place build of this checkout
    sys.path.insert(0, ROOT)


def _groups(session):
    groups = {}
    for bench in session.benchmarks:
        if not bench or not bench.stats:
            continue
        groups.setdefault(bench.group, []).append(bench)
    return groups


def pytest_terminal_summary(terminalreporter, config):
    session = getattr(config, "_benchmarksession", None)
    if session is None or session.disabled:
        return
    groups = _groups(session)
    lines = []
    for group, benches in sorted(groups.items(), key=lambda g: str(g[0])):
        ours = [b for b in benches if b.extra_info.get("role") == "ours"]
        if len(ours) != 1:
            continue
        t = ours[0].stats.median
        lines.append(f"{group}: ours {ours[0].name} median {t * 1e3:.2f} ms")
        for b in benches:
            role = b.extra_info.get("role")
            if role == "peer":
                lines.append(f"    {b.stats.median / t:6.2f}x faster than {b.name} ({b.stats.median * 1e3:.2f} ms)")
            elif role in ("floor", "context"):
                what = b.extra_info.get("what", "")
                kind = "the floor " if role == "floor" else ""
                lines.append(f"    {t / b.stats.median:6.2f}x {kind}{b.name}: {what} ({b.stats.median * 1e3:.2f} ms)")
    if lines:
        terminalreporter.write_sep("-", f"ratios of medians, same run ({torch.get_num_threads()} threads, "
                                        f"torch {torch.__version__})")
        for line in lines:
            terminalreporter.write_line(line)
