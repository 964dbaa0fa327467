"""Live progress of a search: a Rich panel on a terminal, plain one-line events elsewhere.

Display only: nothing here decides anything. The search tells it what
happened (a candidate started, reported progress, finished) and it shows it.
"""
from __future__ import annotations

import heapq
import statistics
import time
from collections import deque
from typing import Optional

from rich.console import Console, Group
from rich.live import Live
from rich.panel import Panel
from rich.progress import BarColumn, MofNCompleteColumn, Progress, ProgressColumn, TextColumn, TimeElapsedColumn
from rich.table import Table
from rich.text import Text


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.2f}"


def eta_seconds(durations: list, running_elapsed: list, remaining: int, workers: int) -> Optional[float]:
    """Seconds until the last of `remaining` candidates (those running included) finishes, if each
    takes the mean of `durations` (the finished candidates that trained) and `workers` run at once:
    a running one needs the mean less its elapsed time (at least 0), the others queue for the first
    worker free. None before a candidate has finished."""
    if not durations or workers < 1:
        return None
    if remaining <= 0:
        return 0.0
    mean = statistics.fmean(durations)
    running = sorted(max(mean - e, 0.0) for e in running_elapsed)[:remaining]
    free_at = running + [0.0] * max(workers - len(running), 0)
    heapq.heapify(free_at)
    end = max(running, default=0.0)
    for _ in range(remaining - len(running)):
        t = heapq.heappop(free_at) + mean
        heapq.heappush(free_at, t)
        end = max(end, t)
    return end


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


class _EtaColumn(ProgressColumn):
    """The search's own estimate (see eta_seconds), recomputed at every refresh."""

    def __init__(self, owner: "SearchProgress"):
        super().__init__()
        self.owner = owner

    def render(self, task) -> Text:
        eta = self.owner.eta()
        return Text("ETA " + ("-:--:--" if eta is None else _clock(eta)), style="progress.remaining")


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
        self.durations: list = []   # seconds of each finished candidate that trained (reused ones take none)
        self._bar = Progress(TextColumn("candidates"), BarColumn(), MofNCompleteColumn(),
                             TimeElapsedColumn(), _EtaColumn(self), console=self.console)
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
    def set_workers(self, devices: list) -> None:
        """The workers' labels, once the scheduler has placed them (a row each, idle until a task)."""
        self.workers = {d: self.workers.get(d, {}) for d in devices}
        self._refresh()

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
        if seconds > 0:
            self.durations.append(seconds)
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

    def ended(self, task_id, device: str, text: str) -> None:
        """A task outside the candidates' count (the final model) ended: its worker is idle again."""
        if self.workers.get(device, {}).get("id") == task_id:
            self.workers[device] = {}
        self._event(text)

    def eta(self) -> Optional[float]:
        now = time.monotonic()
        running = [now - w["t0"] for w in self.workers.values() if w]
        return eta_seconds(self.durations, running, self.total - self.done, len(self.workers))

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
        stats = Table.grid(padding=(0, 3))   # one row each: the best's label is long, 80 columns are few
        med = statistics.median(self.fitness) if self.fitness else None
        best = f"{_pct(self.best[0])}  (#{self.best[1]} {self.best[2]})" if self.best else "-"
        stats.add_row(f"[bold]best P@5[/bold] {best}")
        stats.add_row(f"[bold]population median[/bold] {_pct(med)}   "
                      f"[bold]population best[/bold] {_pct(max(self.fitness) if self.fitness else None)}")
        events = "\n".join(self.events) or "[dim]no events yet[/dim]"
        return Panel(Group(workers, "", stats, self._bar, "", events), title=self.title)
