"""Live progress of a search: a Rich panel on a terminal, plain one-line events elsewhere.

Display only: nothing here decides anything. The search tells it what
happened (a candidate started, reported progress, finished) and it shows it.
"""
from __future__ import annotations

import statistics
import sys
import time
from collections import deque
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


class SearchProgress:
    """Use as a context manager around the search loop."""

    def __init__(self, total: int, devices: list, *, done: int = 0, quiet: bool = False,
                 console: Optional[Console] = None, live: Optional[bool] = None, title: str = "xmcnas-fast search"):
        self.console = console or Console(stderr=False)
        self.quiet = quiet
        self.live_mode = (self.console.is_terminal if live is None else live) and not quiet
        self.title = title
        self.total, self.done = total, done
        self.workers: dict[str, dict] = {d: {} for d in devices}
        self.events: deque = deque(maxlen=6)
        self.fitness: list = []
        self.best: Optional[tuple] = None
        self._bar = Progress(TextColumn("candidates"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                             console=self.console)
        self._task = self._bar.add_task("search", total=total, completed=done)
        self._live: Optional[Live] = None

    # ---- context ---------------------------------------------------------------------------------
    def __enter__(self):
        if self.live_mode:
            self._live = Live(self._render(), console=self.console, refresh_per_second=4, transient=False)
            self._live.__enter__()
        return self

    def __exit__(self, *exc):
        if self._live is not None:
            self._live.update(self._render())
            self._live.__exit__(*exc)
            self._live = None
        return False

    # ---- what the search tells us ---------------------------------------------------------------
    def started(self, cand_id: int, device: str, label: str) -> None:
        self.workers[device] = {"id": cand_id, "label": label, "t0": time.monotonic()}
        self._event(f"start  #{cand_id} on {device}: {label}")

    def progress(self, cand_id: int, device: str, data: dict) -> None:
        w = self.workers.get(device)
        if w and w.get("id") == cand_id:
            w.update(data)
            self._refresh()

    def finished(self, cand_id: int, device: str, status: str, fitness: Optional[float],
                 seconds: float, label: str, population: Optional[list] = None) -> None:
        """`population`: the validation P@5 of the current population's members (None for failed ones)."""
        self.done += 1
        self._bar.update(self._task, completed=self.done)
        if population is not None:
            self.fitness = [f for f in population if f is not None]
        if fitness is not None:
            if self.best is None or fitness > self.best[0]:
                self.best = (fitness, cand_id, label)
        if self.workers.get(device, {}).get("id") == cand_id:
            self.workers[device] = {}
        what = f"P@5 {_pct(fitness)}" if status == "ok" else status.upper()
        self._event(f"done   #{cand_id} [{self.done}/{self.total}] {what} in {seconds:.0f}s: {label}")

    def note(self, text: str) -> None:
        self._event(text)

    # ---- rendering -------------------------------------------------------------------------------
    def _event(self, text: str) -> None:
        stamp = time.strftime("%H:%M:%S")
        self.events.append(f"{stamp} {text}")
        if self.quiet:
            return
        if self._live is None:
            print(f"{stamp} {text}", file=self.console.file, flush=True)
        else:
            self._refresh()

    def _refresh(self) -> None:
        if self._live is not None:
            self._live.update(self._render())

    def _render(self):
        workers = Table(expand=True, box=None, header_style="bold")
        for col in ("device", "candidate", "epoch", "step", "valid P@5", "elapsed"):
            workers.add_column(col)
        now = time.monotonic()
        for dev, w in self.workers.items():
            if not w:
                workers.add_row(dev, "[dim]idle[/dim]", "", "", "", "")
                continue
            workers.add_row(dev, f"#{w['id']} {w['label']}", str(w.get("epoch", "-")), str(w.get("step", "-")),
                            _pct(w.get("valid_p5")), f"{now - w['t0']:.0f}s")
        stats = Table.grid(padding=(0, 3))
        med = statistics.median(self.fitness) if self.fitness else None
        best = f"{_pct(self.best[0])}  (#{self.best[1]} {self.best[2]})" if self.best else "-"
        stats.add_row(f"[bold]best P@5[/bold] {best}", f"[bold]population median[/bold] {_pct(med)}",
                      f"[bold]population best[/bold] {_pct(max(self.fitness) if self.fitness else None)}")
        events = "\n".join(self.events) or "[dim]no events yet[/dim]"
        return Panel(Group(workers, "", stats, self._bar, "", events), title=self.title)
