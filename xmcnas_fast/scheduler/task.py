"""A task and its execution, in whatever process runs it: the context a task function gets,
pickling the task, running it and classifying its failure, merging its progress reports."""
from __future__ import annotations

import dataclasses
import gc
import pickle
import time
import traceback
from typing import Any, Callable

import torch


class WorkerContext:
    """What a task function gets besides its payload.

    ``device``: the :class:`torch.device` to run on; ``shared``: what
    ``init_fn`` returned in this worker (built once per worker); ``task_id``;
    ``worker``: the worker's label (``"cuda:1"``, ``"cuda:0#2"``, ``"cpu#0"``);
    ``attempt``: 1 on the first run, 2 on the re-run after a worker death;
    ``deadline``: the :func:`time.monotonic` time past which the task counts as
    timed out, or None.
    """

    def __init__(self, *, device: torch.device, shared: Any, task_id: str, worker: str,
                 attempt: int, deadline: float | None,
                 emit: Callable[[str, dict], None], stopped: Callable[[], bool]):
        self.device = device
        self.shared = shared
        self.task_id = task_id
        self.worker = worker
        self.attempt = attempt
        self.deadline = deadline
        self._emit = emit
        self._stopped = stopped

    def report(self, **data) -> None:
        """Send progress to the main process (merged when frequent; never blocks)."""
        self._emit(self.task_id, data)

    def should_stop(self) -> bool:
        """True once the scheduler asks running tasks to stop, or the deadline has passed."""
        return self._stopped() or (self.deadline is not None and time.monotonic() >= self.deadline)

    def time_left(self) -> float | None:
        """Seconds until the deadline (negative once past it), or None without a timeout."""
        return None if self.deadline is None else self.deadline - time.monotonic()


@dataclasses.dataclass
class Task:
    """A submitted task as the main process keeps it: ``fn`` and ``payload`` pickled once."""

    task_id: str
    blob: bytes
    attempts: int = 1


def deadline_after(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return "out of memory" in text or "not enough memory" in text
    return False


def describe(exc: BaseException) -> str:
    """One summary line, then the traceback."""
    lines = str(exc).strip().splitlines()
    summary = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return summary + "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def pickle_task(fn: Callable, payload: Any) -> bytes:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    try:
        return pickle.dumps((fn, payload))
    except Exception as exc:
        raise TypeError(
            f"cannot pickle the task ({type(exc).__name__}: {exc}): fn must be a top-level function "
            f"of an importable module (not a lambda or a closure) and payload must be picklable"
        ) from exc


def execute(blob: bytes, device: torch.device, *, interruptible: bool = False, **context):
    """Run one pickled task with ``WorkerContext(device=device, **context)``; returns
    (status, pickled value or None, error, seconds).
    ``interruptible``: let KeyboardInterrupt through (in the caller's own process)."""
    t0 = time.perf_counter()
    value_blob = error = None
    try:
        fn, payload = pickle.loads(blob)
        value = fn(payload, WorkerContext(device=device, **context))
        try:
            value_blob = pickle.dumps(value)
            status = "ok"
        except Exception as exc:
            status = "error"
            error = (f"the value returned ({type(value).__name__}) cannot be pickled back to the main "
                     f"process: {type(exc).__name__}: {exc}")
        del value
    except BaseException as exc:  # the task's SystemExit too: it must not end the worker
        if interruptible and isinstance(exc, KeyboardInterrupt):
            raise
        status = "oom" if is_oom(exc) else "error"
        error = describe(exc)
        traceback.clear_frames(exc.__traceback__)  # let go of the task's tensors
        del exc
    seconds = time.perf_counter() - t0
    if status != "ok":
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return status, value_blob, error, seconds


class Merger:
    """Merges reports closer together than ``interval``: union of keys, latest values and time."""

    def __init__(self, interval: float):
        self.interval = interval
        self.pending: tuple[str, dict, float] | None = None
        self.last_sent = float("-inf")

    def add(self, task_id: str, data: dict) -> None:
        try:
            pickle.dumps(data)
        except Exception as exc:
            raise TypeError(f"ctx.report data must be picklable: {type(exc).__name__}: {exc}") from exc
        merged = dict(data)
        if self.pending is not None and self.pending[0] == task_id:
            merged = {**self.pending[1], **data}
        self.pending = (task_id, merged, time.time())

    def due_in(self) -> float:
        return self.last_sent + self.interval - time.monotonic()

    def take(self):
        item, self.pending = self.pending, None
        if item is not None:
            self.last_sent = time.monotonic()
        return item
