"""The pool (main process, any backend with workers): one slot per worker, the queue,
dispatch, retries after a worker's death, timeouts, shutdown bookkeeping. A backend
supplies the transport to its workers (processes, Ray actors)."""
from __future__ import annotations

import collections
import pickle
import time
from typing import Any, Callable

from .interface import Event, Scheduler, TaskResult
from .devices import WorkerSpec
from .task import Task, describe, pickle_task

# A worker that dies this many times in a row before it is ready (e.g. a
# segfault in init_fn) is given up instead of being restarted forever.
MAX_EARLY_DEATHS = 3


class Slot:
    """One worker place: its current worker, reached through its backend's ``transport``
    (None while it has none), its task, its state."""

    def __init__(self, index: int, spec: WorkerSpec):
        self.index = index
        self.spec = spec
        self.transport: Any = None
        self.pid: int | None = None
        self.state = "starting"     # starting -> ready; retired once given up
        self.task: Task | None = None
        self.started: float | None = None  # when the task was handed over
        self.early_deaths = 0
        self.dying = False          # its worker is being cleaned up: hand it nothing
        self.reason = ""            # why it was retired


class PoolScheduler(Scheduler):
    """One worker per slot; several slots may share a device. A backend supplies the
    transport: ``_spawn``, ``_send_task``, ``_receive``, ``_kill``, ``_drain`` and
    ``shutdown``, and reports what happened through the ``_on_*`` methods."""

    def __init__(self, specs: list[WorkerSpec], retries_on_death: int):
        self._slots = [Slot(i, spec) for i, spec in enumerate(specs)]
        self.devices = [spec.label for spec in specs]
        self._timeout = specs[0].timeout
        self._retries = retries_on_death
        self._queue: collections.deque[Task] = collections.deque()
        self._out: list[TaskResult | Event] = []
        self._closing = False
        self._unfinished: list[str] = []

    # -- transport, per backend ------------------------------------------------

    def _spawn(self, slot: Slot) -> None:
        """Start a worker for the slot (state "starting"); it reports through ``_on_ready``."""
        raise NotImplementedError

    def _send_task(self, slot: Slot) -> None:
        """Hand slot.task to its ready worker; set slot.started once handed over."""
        raise NotImplementedError

    def _receive(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` s for news from any worker, then take in all there is."""
        raise NotImplementedError

    def _drain(self, slot: Slot) -> None:
        """Take in what this worker has already sent, without waiting."""

    def _kill(self, slot: Slot) -> str:
        """Kill the worker now; returns how it ended, in words."""
        raise NotImplementedError

    # -- what workers report -----------------------------------------------------

    def _on_ready(self, slot: Slot, pid: int) -> None:
        slot.state, slot.pid, slot.early_deaths = "ready", pid, 0
        if slot.task is not None and not slot.dying and not self._closing:
            self._send_task(slot)

    def _on_init_error(self, slot: Slot, text: str) -> None:
        slot.state = "retired"
        slot.reason = f"init_fn failed in the worker on {slot.spec.label}: {text}"
        if slot.task is not None:
            self._queue.appendleft(slot.task)
            slot.task = None

    def _on_event(self, slot: Slot, task_id: str, data: dict, when: float) -> None:
        self._out.append(Event(task_id, slot.spec.label, data, when))

    def _on_result(self, slot: Slot, task_id: str, status: str, value_blob: bytes | None,
                   error: str | None, seconds: float) -> None:
        task, slot.task, slot.started = slot.task, None, None
        value = None
        if status == "ok":
            try:
                value = pickle.loads(value_blob)
            except Exception as exc:
                status, error = "error", f"the value returned cannot be unpickled here: {describe(exc)}"
        attempts = task.attempts if task is not None and task.task_id == task_id else 1
        self._out.append(TaskResult(task_id, status, value, error, slot.spec.label, seconds, attempts))

    def _on_death(self, slot: Slot, how: str) -> None:
        """The slot's worker ended without being asked to (already cleaned up): account for its
        task, then replace it."""
        task, slot.task = slot.task, None
        started, slot.started = slot.started, None
        if self._closing:
            if task is not None:
                self._unfinished.append(task.task_id)
            return
        if task is not None:
            if started is None:  # never handed over: no attempt spent
                self._queue.appendleft(task)
            elif task.attempts <= self._retries:
                task.attempts += 1
                self._queue.appendleft(task)
            else:
                self._out.append(TaskResult(
                    task.task_id, "died", None,
                    f"the worker (pid {slot.pid}) on {slot.spec.label} died while running the task: "
                    f"{how}; attempt {task.attempts}, no retries left",
                    slot.spec.label, time.monotonic() - started, task.attempts))
        if slot.state == "retired":
            return
        if slot.state == "starting":
            slot.early_deaths += 1
            if slot.early_deaths >= MAX_EARLY_DEATHS:
                slot.state = "retired"
                slot.reason = (f"the worker on {slot.spec.label} died {slot.early_deaths} times before "
                               f"it was ready (last: {how})")
                return
        self._spawn(slot)

    # -- bookkeeping -------------------------------------------------------------

    def _dispatch(self) -> None:
        if self._closing:
            return
        if all(slot.state == "retired" for slot in self._slots):
            reasons = "; ".join(dict.fromkeys(slot.reason for slot in self._slots))
            while self._queue:
                task = self._queue.popleft()
                self._out.append(TaskResult(task.task_id, "error", None,
                                            f"no worker is left to run the task: {reasons}",
                                            attempts=task.attempts))
            return
        for slot in sorted(self._slots, key=lambda s: s.state != "ready"):
            if not self._queue:
                return
            if slot.state != "retired" and slot.task is None and not slot.dying:
                slot.task = self._queue.popleft()
                if slot.state == "ready":
                    self._send_task(slot)

    def _check_timeouts(self) -> None:
        if self._timeout is None or self._closing:
            return
        for slot in self._slots:
            if slot.started is None or time.monotonic() - slot.started <= self._timeout:
                continue
            self._drain(slot)  # a result that just made it counts
            if slot.started is None:
                continue
            task, started = slot.task, slot.started
            slot.task = slot.started = None
            how = self._kill(slot)
            self._out.append(TaskResult(
                task.task_id, "timeout", None,
                f"the task ran past candidate_timeout={self._timeout:g} s on {slot.spec.label}; "
                f"its worker (pid {slot.pid}) was killed ({how}) and replaced",
                slot.spec.label, time.monotonic() - started, task.attempts))
            self._spawn(slot)

    def _pump(self, timeout: float | None) -> None:
        self._receive(timeout)
        self._check_timeouts()
        self._dispatch()

    def _next_deadline(self) -> float | None:
        if self._timeout is None:
            return None
        starts = [slot.started for slot in self._slots if slot.started is not None]
        return min(starts) + self._timeout if starts else None

    def _busy(self) -> bool:
        return bool(self._queue) or any(slot.task is not None for slot in self._slots)

    def _begin_shutdown(self) -> None:
        self._closing = True
        self._unfinished = [task.task_id for task in self._queue]
        self._queue.clear()

    def _end_shutdown(self) -> list[str]:
        self._unfinished.extend(task.task_id for task in self._queue)  # put back meanwhile
        self._queue.clear()
        for slot in self._slots:
            if slot.task is not None:
                self._unfinished.append(slot.task.task_id)
                slot.task = slot.started = None
        return list(dict.fromkeys(self._unfinished))

    def _wait_for_workers(self, seconds: float, alive: Callable[[], bool]) -> None:
        end = time.monotonic() + seconds
        while alive() and (left := end - time.monotonic()) > 0:
            self._pump(left)

    # -- the API -------------------------------------------------------------------

    def submit(self, task_id, fn, payload):
        if self._closing:
            raise RuntimeError("the scheduler is shut down")
        if task_id in self.running() or any(t.task_id == task_id for t in self._queue):
            raise ValueError(f"task {task_id!r} is already submitted")
        if all(slot.state == "retired" for slot in self._slots):
            raise RuntimeError("no worker is left: " + "; ".join(slot.reason for slot in self._slots))
        self._queue.append(Task(task_id, pickle_task(fn, payload)))
        self._dispatch()

    def free_slots(self):
        if self._closing:
            return 0
        idle = sum(1 for slot in self._slots if slot.state != "retired" and slot.task is None)
        return max(0, idle - len(self._queue))

    def running(self):
        return {slot.task.task_id: slot.spec.label for slot in self._slots if slot.task is not None}

    def queued(self):
        return [task.task_id for task in self._queue]

    def worker_pids(self):
        return {slot.spec.label: slot.pid for slot in self._slots
                if slot.pid is not None and slot.state != "retired" and not self._closing}

    def poll(self, timeout=None):
        if not self._closing:
            end = None if timeout is None else time.monotonic() + max(0.0, timeout)
            self._pump(0)
            while not self._out and self._busy():
                now = time.monotonic()
                wait = None if end is None else end - now
                if wait is not None and wait <= 0:
                    break
                deadline = self._next_deadline()
                if deadline is not None:
                    left = max(0.0, deadline - now)
                    wait = left if wait is None else min(wait, left)
                self._pump(wait)
        out, self._out = self._out, []
        return out
