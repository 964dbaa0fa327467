"""Run functions on devices and hand back their results.

The scheduler knows nothing of what it runs: a task is ``fn(payload, ctx)``,
run in a worker bound to one device, and its outcome comes back as a
:class:`TaskResult`; progress the task reports on the way comes back as
:class:`Event` objects.

Backends (:func:`make_scheduler`):

``inline``
    Same process, one task at a time, run when :meth:`Scheduler.poll` is
    called (``poll`` then blocks for the whole task, whatever its timeout).
    For tests and debugging: a crash of the task is a crash of the caller,
    and a Ctrl-C during a task interrupts the caller (the task stays in
    ``running()``, so ``shutdown()`` lists it).
    ``candidate_timeout`` is enforced cooperatively: ``ctx.should_stop()``
    turns True once ``ctx.deadline`` (a :func:`time.monotonic` value) has
    passed, and a task that comes back after its deadline is reported as
    ``"timeout"`` (its value dropped).
``local``
    One worker process per device (``torch.multiprocessing``, spawn method).
    A task past ``candidate_timeout`` has its worker killed and replaced; a
    worker that dies (segfault, ``os._exit``, a signal, the OOM killer) is
    replaced and its task run again up to ``retries_on_death`` times.
``ray``
    One Ray actor per slot, with the same failure handling as ``local``;
    only when ``ray`` is installed (``pip install 'xmcnas-fast[ray]'``).
    ``"cuda"`` means every GPU of the Ray cluster; a CUDA slot asks Ray for
    one GPU and Ray picks which (``cuda:I`` then names the slot, not the
    GPU). If Ray is not running, it is started on this machine and stopped
    at shutdown; to use a cluster, call ``ray.init`` first, with a
    ``runtime_env`` that makes the task modules importable.

A scheduler is driven from one thread (the search loop's).

What crosses process boundaries, and how:

* ``fn`` and ``init_fn`` are pickled by reference: they must be top-level
  functions of a module the workers can import (workers get the parent's
  ``sys.path``).
* ``payload`` is pickled once at :meth:`Scheduler.submit`; keep it small.
  Large read-only data reaches workers through ``init_fn(*init_args)``, run
  once per worker, whose result is ``ctx.shared`` (e.g. pass a path and map
  the arrays with ``numpy.load(..., mmap_mode="r")``).
* The value ``fn`` returns is pickled with the standard :mod:`pickle` and
  sent back through a pipe: it should be small plain data (dicts, lists,
  numbers, strings, small numpy arrays). A CPU tensor is copied by value; a
  CUDA tensor must not be returned (unpickling it would create a CUDA context
  in the main process). A value that cannot be pickled makes the task an
  ``"error"``. The inline backend makes the same round trip, so it catches
  the same mistakes.
* ``ctx.report(**data)`` sends an :class:`Event`, for display only: reports
  closer together than ``report_interval`` seconds are merged (the Event
  carries the union of their keys, the latest value winning, and the time
  of the latest), and a report never blocks the task.

Process hygiene: workers ignore SIGINT (Ctrl-C reaches the main process,
which shuts them down), exit on their own when the main process goes away,
are killed at interpreter exit if still running, and are always joined (no
zombies). No CUDA context is created in the main process: CUDA workers call
``torch.cuda.set_device`` on their own device before ``init_fn``.
"""
from __future__ import annotations

import collections
import contextlib
import dataclasses
import gc
import multiprocessing.util
import os
import pickle
import queue
import signal
import sys
import threading
import time
import traceback
from multiprocessing.connection import wait as _wait_any
from typing import Any, Callable

import torch

__all__ = [
    "Event",
    "Scheduler",
    "TaskResult",
    "WorkerContext",
    "make_scheduler",
    "parse_devices",
]

STATUSES = ("ok", "error", "oom", "timeout", "died")
RAY_INSTALL_HINT = "pip install 'xmcnas-fast[ray]'"

# A worker that dies this many times in a row before it is ready (e.g. a
# segfault in init_fn) is given up instead of being restarted forever.
_MAX_EARLY_DEATHS = 3


@dataclasses.dataclass
class TaskResult:
    """The outcome of one task.

    ``status`` is one of ``"ok"``, ``"error"``, ``"oom"``, ``"timeout"``,
    ``"died"``; ``value`` is what ``fn`` returned (``"ok"`` only); ``error`` a
    one-line summary, then the traceback or the details; ``seconds`` the time
    spent on the last attempt; ``attempts`` how many times it was started.
    """

    task_id: str
    status: str
    value: Any = None
    error: str | None = None
    device: str = ""
    seconds: float = 0.0
    attempts: int = 1


@dataclasses.dataclass
class Event:
    """Progress reported by a running task through ``ctx.report``, for display only."""

    task_id: str
    device: str
    data: dict
    time: float


class WorkerContext:
    """What a task function gets besides its payload.

    ``device``: the :class:`torch.device` to run on; ``shared``: what
    ``init_fn`` returned in this worker (built once per worker); ``task_id``;
    ``worker``: the worker's label (``"cuda:1"``, ``"cpu#0"``); ``attempt``:
    1 on the first run, 2 on the re-run after a worker death; ``deadline``: the
    :func:`time.monotonic` time past which the task counts as timed out, or
    None.
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


class Scheduler:
    """Runs tasks on devices; build one with :func:`make_scheduler`.

    The loop that drives it::

        with make_scheduler("local", "cpu:2") as sched:
            while work_left:
                for _ in range(sched.free_slots()):
                    sched.submit(next_id(), module.fn, payload)
                for item in sched.poll(timeout=1.0):
                    ...  # TaskResult or Event
    """

    backend = ""
    devices: list[str]

    def submit(self, task_id: str, fn: Callable[[Any, WorkerContext], Any], payload: Any) -> None:
        """Queue ``fn(payload, ctx)``; it starts as soon as a worker is free.

        Raises ValueError for a task id already in flight, TypeError when
        ``fn`` or ``payload`` cannot be pickled, RuntimeError once shut down.
        """
        raise NotImplementedError

    def free_slots(self) -> int:
        """How many more tasks can start now (idle workers not already promised a queued task)."""
        raise NotImplementedError

    def poll(self, timeout: float | None = None) -> list[TaskResult | Event]:
        """Events and results that arrived since the last poll, waiting up to ``timeout`` s for one.

        Returns at once when nothing is in flight. ``timeout=None`` waits for
        the next item.
        """
        raise NotImplementedError

    def running(self) -> dict[str, str]:
        """task_id -> worker label of tasks handed to a worker and not finished."""
        raise NotImplementedError

    def queued(self) -> list[str]:
        """Ids of submitted tasks still waiting for a worker."""
        raise NotImplementedError

    def worker_pids(self) -> dict[str, int]:
        """Worker label -> process id of the workers started now (for diagnostics)."""
        raise NotImplementedError

    def shutdown(self, graceful: bool = True, wait: float = 5.0) -> list[str]:
        """Stop the workers; return the ids of submitted tasks that did not finish.

        ``graceful``: ask running tasks to stop (``ctx.should_stop()``) and give
        them ``wait`` seconds to return before terminating the workers. Results
        that arrive meanwhile are kept for the next :meth:`poll`.
        """
        raise NotImplementedError

    def __enter__(self):
        return self

    def __exit__(self, *exc_info) -> None:
        self.shutdown(graceful=True)


# ----------------------------------------------------------------------------
# devices

@dataclasses.dataclass(frozen=True)
class _WorkerSpec:
    label: str          # shown in results and events: "cpu", "cpu#1", "cuda:0"
    device: str         # torch device string: "cpu", "cuda:0"
    threads: int        # torch.set_num_threads in the worker; 0 leaves it alone
    init_fn: Callable | None
    init_args: tuple
    timeout: float | None
    report_interval: float


def _visible_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def _cuda_count() -> int:
    # device_count() asks the driver or NVML; it creates no CUDA context.
    return torch.cuda.device_count() if torch.backends.cuda.is_built() else 0


_DEVICE_FORMS = ('"cpu", "cpu:W" (W worker processes), "cuda" (every visible GPU), '
                 '"cuda:I", or several of these separated by commas or given as a list')


def _parse(devices: str | list[str] | tuple[str, ...],
           gpu_count: Callable[[], int] | None = None) -> list[tuple[str, str]]:
    """(label, torch device) per worker; ``gpu_count`` counts the GPUs "cuda" stands for."""
    if isinstance(devices, str):
        items = devices.split(",")
    elif isinstance(devices, (list, tuple)) and all(isinstance(d, str) for d in devices):
        items = list(devices)
    else:
        raise ValueError(f"devices must be a string or a list of strings, got {devices!r}")
    items = [item.strip().lower() for item in items]
    if not items or any(not item for item in items):
        raise ValueError(f"empty device in {devices!r}; use {_DEVICE_FORMS}")
    cpu_workers = None
    gpus: list[int] = []
    for item in items:
        kind, sep, arg = item.partition(":")
        if kind == "cpu":
            if cpu_workers is not None:
                raise ValueError(f"CPU workers given twice in {devices!r}; give them once, as cpu or cpu:W")
            if not sep:
                cpu_workers = 1
            elif arg.isdigit() and int(arg) >= 1:
                cpu_workers = int(arg)
            else:
                raise ValueError(f"bad device {item!r}: cpu:W takes a number of workers W >= 1")
        elif kind == "cuda":
            count = (gpu_count or _cuda_count)()
            if not sep:
                if count == 0:
                    raise ValueError(f"device {item!r}: no CUDA GPU is visible to this process")
                gpus.extend(range(count))
            elif arg.isdigit():
                if int(arg) >= count:
                    seen = f"only {count} visible" if count else "none is visible"
                    raise ValueError(f"device {item!r}: no such CUDA GPU ({seen})")
                gpus.append(int(arg))
            else:
                raise ValueError(f"bad device {item!r}: cuda:I takes a GPU index I")
        else:
            raise ValueError(f"unknown device {item!r}; use {_DEVICE_FORMS}")
    out = [(f"cuda:{i}", f"cuda:{i}") for i in gpus]
    if cpu_workers == 1:
        out.append(("cpu", "cpu"))
    elif cpu_workers:
        out.extend((f"cpu#{i}", "cpu") for i in range(cpu_workers))
    return out


def parse_devices(devices: str | list[str]) -> list[str]:
    """The worker labels a device spec gives, one per worker (ValueError when malformed).

    ``"cpu"`` -> ``["cpu"]``; ``"cpu:2"`` -> ``["cpu#0", "cpu#1"]``;
    ``"cuda"`` -> one per visible GPU; ``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]``
    (a GPU given twice gets two workers).
    """
    return [label for label, _ in _parse(devices)]


def _worker_specs(devices, init_fn, init_args, timeout, report_interval,
                  gpu_count=None) -> list[_WorkerSpec]:
    parsed = _parse(devices, gpu_count)
    # The machine's cores are split evenly among the workers (cpu:W: cores // W each).
    threads = max(1, _visible_cores() // len(parsed))
    return [_WorkerSpec(label, device, threads, init_fn, tuple(init_args), timeout, report_interval)
            for label, device in parsed]


# ----------------------------------------------------------------------------
# running one task (shared by every backend)

def _is_oom(exc: BaseException) -> bool:
    if isinstance(exc, (torch.OutOfMemoryError, MemoryError)):
        return True
    if isinstance(exc, RuntimeError):
        text = str(exc).lower()
        return "out of memory" in text or "not enough memory" in text
    return False


def _describe(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    summary = f"{type(exc).__name__}: {lines[0]}" if lines else type(exc).__name__
    return summary + "\n" + "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))


def _pickle_task(fn: Callable, payload: Any) -> bytes:
    if not callable(fn):
        raise TypeError(f"fn must be callable, got {fn!r}")
    try:
        return pickle.dumps((fn, payload))
    except Exception as exc:
        raise TypeError(
            f"cannot pickle the task ({type(exc).__name__}: {exc}): fn must be a top-level function "
            f"of an importable module (not a lambda or a closure) and payload must be picklable"
        ) from exc


def _execute(blob: bytes, make_ctx: Callable[[], WorkerContext], device: torch.device,
             interruptible: bool = False):
    """Run one pickled task; returns (status, pickled value or None, error, seconds).
    ``interruptible``: let KeyboardInterrupt through (in the caller's own process)."""
    t0 = time.perf_counter()
    value_blob = error = None
    try:
        fn, payload = pickle.loads(blob)
        value = fn(payload, make_ctx())
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
        status = "oom" if _is_oom(exc) else "error"
        error = _describe(exc)
        traceback.clear_frames(exc.__traceback__)  # let go of the task's tensors
        del exc
    seconds = time.perf_counter() - t0
    if status != "ok":
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return status, value_blob, error, seconds


class _Merger:
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


# ----------------------------------------------------------------------------
# inline backend

@dataclasses.dataclass
class _Task:
    task_id: str
    blob: bytes
    attempts: int = 1


class InlineScheduler(Scheduler):
    backend = "inline"

    def __init__(self, spec: _WorkerSpec):
        self.devices = [spec.label]
        self._spec = spec
        self._device = torch.device(spec.device)
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        self._shared = spec.init_fn(*spec.init_args) if spec.init_fn is not None else None
        self._queue: collections.deque[_Task] = collections.deque()
        self._out: list[TaskResult | Event] = []
        self._merger = _Merger(spec.report_interval)
        self._stop = False
        self._closed = False

    def submit(self, task_id, fn, payload):
        if self._closed:
            raise RuntimeError("the scheduler is shut down")
        if any(t.task_id == task_id for t in self._queue):
            raise ValueError(f"task {task_id!r} is already submitted")
        self._queue.append(_Task(task_id, _pickle_task(fn, payload)))

    def free_slots(self):
        return 0 if self._closed or self._queue else 1

    def running(self):
        return {self._queue[0].task_id: self._spec.label} if self._queue else {}

    def queued(self):
        return [t.task_id for t in list(self._queue)[1:]]

    def worker_pids(self):
        return {} if self._closed else {self._spec.label: os.getpid()}

    def _emit(self, task_id, data):
        self._merger.add(task_id, data)
        if self._merger.due_in() <= 0:
            self._flush_events()

    def _flush_events(self):
        item = self._merger.take()
        if item is not None:
            self._out.append(Event(item[0], self._spec.label, item[1], item[2]))

    def poll(self, timeout=None):
        if self._queue and not self._closed:
            self._run(self._queue[0])
            self._queue.popleft()
        out, self._out = self._out, []
        return out

    def _run(self, task: _Task):
        timeout = self._spec.timeout
        deadline = None if timeout is None else time.monotonic() + timeout

        def make_ctx():
            return WorkerContext(device=self._device, shared=self._shared, task_id=task.task_id,
                                 worker=self._spec.label, attempt=1, deadline=deadline,
                                 emit=self._emit, stopped=lambda: self._stop)

        status, value_blob, error, seconds = _execute(task.blob, make_ctx, self._device,
                                                      interruptible=True)
        value = pickle.loads(value_blob) if status == "ok" else None
        if deadline is not None and time.monotonic() > deadline:
            status, value = "timeout", None
            error = (f"the task ran past candidate_timeout={timeout:g} s on {self._spec.label} "
                     f"(inline: stopped cooperatively, after {seconds:.1f} s)")
        self._flush_events()
        self._out.append(TaskResult(task.task_id, status, value, error, self._spec.label, seconds))

    def shutdown(self, graceful=True, wait=5.0):
        self._stop = True
        if self._closed:
            return []
        self._closed = True
        unfinished = [t.task_id for t in self._queue]
        self._queue.clear()
        return unfinished


# ----------------------------------------------------------------------------
# local backend: the worker process

class _Outbox:
    """The worker's sending side: events from a background thread (merged, never blocking
    the task), results from the task's thread, always in order."""

    def __init__(self, conn, interval: float):
        self._conn = conn
        self._merger = _Merger(interval)
        self._cv = threading.Condition()
        self._send_lock = threading.Lock()  # taken before _cv, never inside it
        threading.Thread(target=self._loop, name="xmcnas-events", daemon=True).start()

    def report(self, task_id: str, data: dict) -> None:
        with self._cv:
            self._merger.add(task_id, data)
            self._cv.notify()

    def _loop(self):
        while True:
            with self._cv:
                while self._merger.pending is None or self._merger.due_in() > 0:
                    self._cv.wait(None if self._merger.pending is None else self._merger.due_in())
            with self._send_lock:
                self._flush_locked()

    def _flush_locked(self):
        with self._cv:
            item = self._merger.take()
        if item is not None:
            self._write(("event", *item))

    def send(self, msg: tuple) -> None:
        with self._send_lock:
            self._flush_locked()
            self._write(msg)

    def _write(self, msg: tuple) -> None:
        try:
            self._conn.send_bytes(pickle.dumps(msg))
        except OSError:
            os._exit(0)  # the main process is gone


def _read_orders(conn, inbox: queue.SimpleQueue, stop: threading.Event) -> None:
    """Worker thread: takes orders from the main process while a task runs."""
    while True:
        try:
            msg = pickle.loads(conn.recv_bytes())
        except (EOFError, OSError):
            os._exit(0)  # the main process is gone, or let go of us: no orphans
        if msg[0] == "task":
            inbox.put(msg[1:])
        elif msg[0] == "stop":
            stop.set()
        elif msg[0] == "quit":
            inbox.put(None)


def _worker_main(conn, spec: _WorkerSpec) -> None:
    # SIGINT is already ignored (inherited from the parent at spawn); make sure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    threading.Thread(target=_read_orders, args=(conn, inbox, stop), name="xmcnas-orders",
                     daemon=True).start()
    device = torch.device(spec.device)
    try:
        if spec.threads:
            torch.set_num_threads(spec.threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        shared = spec.init_fn(*spec.init_args) if spec.init_fn is not None else None
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("init_error", _describe(exc))))
        return
    outbox = _Outbox(conn, spec.report_interval)
    outbox.send(("ready", os.getpid()))
    while (order := inbox.get()) is not None:
        task_id, attempt, blob = order
        deadline = None if spec.timeout is None else time.monotonic() + spec.timeout

        def make_ctx():
            return WorkerContext(device=device, shared=shared, task_id=task_id, worker=spec.label,
                                 attempt=attempt, deadline=deadline, emit=outbox.report,
                                 stopped=stop.is_set)

        outbox.send(("result", task_id, *_execute(blob, make_ctx, device)))


# ----------------------------------------------------------------------------
# local backend: the main process

@contextlib.contextmanager
def _sigint_ignored():
    """Ignore SIGINT while a worker is spawned: the child inherits SIG_IGN through exec, so
    a Ctrl-C that hits it while it still imports torch cannot kill it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)


def _describe_exit(code: int | None) -> str:
    if code is None:
        return "exit status unknown"
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        hint = " (the out-of-memory killer sends this)" if -code == signal.SIGKILL else ""
        return f"killed by {name}{hint}"
    return f"exit code {code}"


def _end_processes(procs: dict) -> None:
    """Terminate, then kill, then join: used by shutdown and at interpreter exit."""
    for proc in procs.values():
        if proc.is_alive():
            proc.terminate()
    end = time.monotonic() + 1.0
    for proc in procs.values():
        proc.join(max(0.0, end - time.monotonic()))
    for proc in procs.values():
        if proc.is_alive():
            proc.kill()
        proc.join()
    procs.clear()


class _Slot:
    """One worker place: its current worker (process or actor), its task, its state."""

    def __init__(self, index: int, spec: _WorkerSpec):
        self.index = index
        self.spec = spec
        self.pid: int | None = None
        self.state = "starting"     # starting -> ready; retired once given up
        self.task: _Task | None = None
        self.started: float | None = None  # when the task was handed over
        self.early_deaths = 0
        self.dying = False          # its worker is being cleaned up: hand it nothing
        self.reason = ""            # why it was retired
        self.proc = self.conn = None   # local backend
        self.actor = None              # ray backend
        self.polling = False           # ray: an `events` call is in flight


class _PoolScheduler(Scheduler):
    """One worker per device slot: the queue, dispatch, retries and timeouts shared by the
    process and Ray backends. A backend supplies the transport: ``_spawn``,
    ``_send_task``, ``_receive``, ``_kill``, ``_drain`` and ``shutdown``, and reports
    what happened through the ``_on_*`` methods."""

    def __init__(self, specs: list[_WorkerSpec], retries_on_death: int):
        self._slots = [_Slot(i, spec) for i, spec in enumerate(specs)]
        self.devices = [spec.label for spec in specs]
        self._timeout = specs[0].timeout
        self._retries = retries_on_death
        self._queue: collections.deque[_Task] = collections.deque()
        self._out: list[TaskResult | Event] = []
        self._closing = False
        self._unfinished: list[str] = []

    # -- transport, per backend ------------------------------------------------

    def _spawn(self, slot: _Slot) -> None:
        raise NotImplementedError

    def _send_task(self, slot: _Slot) -> None:
        """Hand slot.task to its ready worker; set slot.started once handed over."""
        raise NotImplementedError

    def _receive(self, timeout: float | None) -> None:
        """Wait up to ``timeout`` s for news from any worker, then take in all there is."""
        raise NotImplementedError

    def _drain(self, slot: _Slot) -> None:
        """Take in what this worker has already sent, without waiting."""

    def _kill(self, slot: _Slot) -> str:
        """Kill the worker now; returns how it ended, in words."""
        raise NotImplementedError

    # -- what workers report -----------------------------------------------------

    def _on_ready(self, slot: _Slot, pid: int) -> None:
        slot.state, slot.pid, slot.early_deaths = "ready", pid, 0
        if slot.task is not None and not slot.dying and not self._closing:
            self._send_task(slot)

    def _on_init_error(self, slot: _Slot, text: str) -> None:
        slot.state = "retired"
        slot.reason = f"init_fn failed in the worker on {slot.spec.label}: {text}"
        if slot.task is not None:
            self._queue.appendleft(slot.task)
            slot.task = None

    def _on_event(self, slot: _Slot, task_id: str, data: dict, when: float) -> None:
        self._out.append(Event(task_id, slot.spec.label, data, when))

    def _on_result(self, slot: _Slot, task_id: str, status: str, value_blob: bytes | None,
                   error: str | None, seconds: float) -> None:
        task, slot.task, slot.started = slot.task, None, None
        value = None
        if status == "ok":
            try:
                value = pickle.loads(value_blob)
            except Exception as exc:
                status, error = "error", f"the value returned cannot be unpickled here: {_describe(exc)}"
        attempts = task.attempts if task is not None and task.task_id == task_id else 1
        self._out.append(TaskResult(task_id, status, value, error, slot.spec.label, seconds, attempts))

    def _on_death(self, slot: _Slot, how: str) -> None:
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
            if slot.early_deaths >= _MAX_EARLY_DEATHS:
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
        self._queue.append(_Task(task_id, _pickle_task(fn, payload)))
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


class LocalScheduler(_PoolScheduler):
    backend = "local"

    def __init__(self, specs: list[_WorkerSpec], retries_on_death: int):
        super().__init__(specs, retries_on_death)
        self._mp = torch.multiprocessing.get_context("spawn")
        self._procs: dict[int, Any] = {}
        # Runs at interpreter exit before multiprocessing joins its children.
        self._finalizer = multiprocessing.util.Finalize(self, _end_processes, args=(self._procs,),
                                                        exitpriority=10)
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: _Slot) -> None:
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=_worker_main, args=(child_conn, slot.spec),
                                name=f"xmcnas-worker[{slot.spec.label}]")
        with _sigint_ignored():
            proc.start()
        child_conn.close()
        slot.proc, slot.conn, slot.pid, slot.state = proc, parent_conn, proc.pid, "starting"
        self._procs[slot.index] = proc

    def _send_task(self, slot: _Slot) -> None:
        task = slot.task
        try:
            slot.conn.send_bytes(pickle.dumps(("task", task.task_id, task.attempts, task.blob)))
            slot.started = time.monotonic()
        except OSError:
            pass  # the worker is gone; its exit puts the task back in the queue

    def _drain(self, slot: _Slot) -> None:
        while slot.conn is not None:
            try:
                if not slot.conn.poll():
                    return
                msg = pickle.loads(slot.conn.recv_bytes())
            except (EOFError, OSError):
                self._on_exit(slot)
                return
            self._handle(slot, msg)

    def _handle(self, slot: _Slot, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            self._on_ready(slot, msg[1])
        elif kind == "init_error":
            self._on_init_error(slot, msg[1])
        elif kind == "event":
            self._on_event(slot, *msg[1:])
        elif kind == "result":
            self._on_result(slot, *msg[1:])

    def _close(self, slot: _Slot, kill: bool) -> int | None:
        proc = slot.proc
        if kill:
            proc.kill()
        proc.join(1.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        slot.conn.close()
        slot.proc = slot.conn = None
        self._procs.pop(slot.index, None)
        return proc.exitcode

    def _kill(self, slot: _Slot) -> str:
        return _describe_exit(self._close(slot, kill=True))

    def _on_exit(self, slot: _Slot) -> None:
        """The worker process ended (or closed its pipe) without being asked to."""
        slot.dying = True
        try:  # what it sent before it went still counts
            while slot.conn.poll():
                self._handle(slot, pickle.loads(slot.conn.recv_bytes()))
        except (EOFError, OSError):
            pass
        slot.dying = False
        self._on_death(slot, _describe_exit(self._close(slot, kill=False)))

    def _receive(self, timeout: float | None) -> None:
        waitables = {}
        for slot in self._slots:
            if slot.proc is not None:
                waitables[slot.conn] = slot
                waitables[slot.proc.sentinel] = slot
        if not waitables:
            return
        for obj in _wait_any(list(waitables), timeout):
            slot = waitables[obj]
            if obj is slot.conn:
                self._drain(slot)
            elif slot.proc is not None and obj == slot.proc.sentinel:
                self._on_exit(slot)

    def shutdown(self, graceful=True, wait=5.0):
        if self._closing:
            return []
        self._begin_shutdown()
        try:
            for slot in self._slots:
                if slot.proc is None:
                    continue
                if slot.state != "ready":  # still importing: nothing of value there
                    if slot.task is not None:
                        self._unfinished.append(slot.task.task_id)
                        slot.task = None
                    self._close(slot, kill=True)
                    continue
                for order in (("stop",), ("quit",)) if graceful else ():
                    try:
                        slot.conn.send_bytes(pickle.dumps(order))
                    except OSError:
                        pass
            if graceful:
                self._wait_for_workers(wait, lambda: any(s.proc is not None for s in self._slots))
        finally:
            for slot in self._slots:
                if slot.conn is not None:
                    slot.conn.close()
                    slot.conn = slot.proc = None
            _end_processes(self._procs)
            self._finalizer.cancel()
        return self._end_shutdown()


# ----------------------------------------------------------------------------
# ray backend

class _RayWorker:
    """The body of one Ray actor (made remote by RayScheduler): a threaded actor, so that
    ``events`` and ``stop`` are answered while ``run`` works."""

    def __init__(self, spec: _WorkerSpec):
        self._spec = spec
        self._stop = threading.Event()
        self._cv = threading.Condition()
        self._merger = _Merger(spec.report_interval)
        self._device = torch.device("cpu")
        self._shared = None

    def setup(self):
        try:
            if self._spec.threads:
                torch.set_num_threads(self._spec.threads)
            if self._spec.device.startswith("cuda"):
                # Ray shows the actor only the GPU it was given: it is device 0 here.
                self._device = torch.device("cuda", 0)
                torch.cuda.set_device(self._device)
            if self._spec.init_fn is not None:
                self._shared = self._spec.init_fn(*self._spec.init_args)
        except BaseException as exc:
            return ("init_error", _describe(exc))
        return ("ready", os.getpid())

    def _report(self, task_id, data):
        with self._cv:
            self._merger.add(task_id, data)
            self._cv.notify_all()

    def run(self, task_id, attempt, blob):
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)  # the current device is per thread
        timeout = self._spec.timeout
        deadline = None if timeout is None else time.monotonic() + timeout

        def make_ctx():
            return WorkerContext(device=self._device, shared=self._shared, task_id=task_id,
                                 worker=self._spec.label, attempt=attempt, deadline=deadline,
                                 emit=self._report, stopped=self._stop.is_set)

        outcome = _execute(blob, make_ctx, self._device)
        with self._cv:
            last_event = self._merger.take()
        return (task_id, last_event, *outcome)

    def events(self, wait):
        """Long poll: the next due event, or nothing after ``wait`` s."""
        end = time.monotonic() + wait
        with self._cv:
            while True:
                if self._merger.pending is not None and self._merger.due_in() <= 0:
                    return [self._merger.take()]
                left = end - time.monotonic()
                if left <= 0:
                    return []
                if self._merger.pending is not None:
                    left = min(left, self._merger.due_in())
                self._cv.wait(left)

    def stop(self):
        self._stop.set()


class RayScheduler(_PoolScheduler):
    """One Ray actor per slot (a GPU each for CUDA slots; Ray picks which GPU)."""

    backend = "ray"
    _EVENT_WAIT = 1.0

    def __init__(self, specs: list[_WorkerSpec], retries_on_death: int, ray, owns_ray: bool):
        super().__init__(specs, retries_on_death)
        self._ray = ray
        self._owns_ray = owns_ray
        self._actor_cls = ray.remote(_RayWorker)
        self._refs: dict[Any, tuple[_Slot, str, Any]] = {}  # ref -> (slot, kind, actor)
        for slot in self._slots:
            self._spawn(slot)

    def _track(self, slot: _Slot, kind: str, ref) -> None:
        self._refs[ref] = (slot, kind, slot.actor)

    def _spawn(self, slot: _Slot) -> None:
        if slot.spec.device.startswith("cuda"):
            options = {"num_gpus": 1, "num_cpus": 1}
        else:
            options = {"num_cpus": slot.spec.threads}
        slot.actor = self._actor_cls.options(max_concurrency=3, **options).remote(slot.spec)
        slot.state, slot.pid = "starting", None
        self._track(slot, "setup", slot.actor.setup.remote())

    def _send_task(self, slot: _Slot) -> None:
        task = slot.task
        self._track(slot, "run", slot.actor.run.remote(task.task_id, task.attempts, task.blob))
        slot.started = time.monotonic()
        self._poll_events(slot)

    def _poll_events(self, slot: _Slot) -> None:
        if not slot.polling:  # one at a time: each holds one of the actor's threads
            slot.polling = True
            self._track(slot, "events", slot.actor.events.remote(self._EVENT_WAIT))

    def _forget(self, slot: _Slot) -> None:
        actor, slot.actor, slot.polling = slot.actor, None, False
        for ref in [r for r, (_, _, a) in self._refs.items() if a is actor]:
            del self._refs[ref]
        if actor is not None:
            self._ray.kill(actor, no_restart=True)

    def _kill(self, slot: _Slot) -> str:
        self._forget(slot)
        return "Ray actor killed"

    def _take(self, refs) -> None:
        # events before results, so that a task's progress precedes its outcome
        order = {"events": 0, "run": 1, "setup": 2}
        entries = sorted(((ref, *self._refs.pop(ref)) for ref in refs if ref in self._refs),
                         key=lambda e: order[e[2]])
        for ref, slot, kind, actor in entries:
            if actor is not slot.actor:
                continue  # from a worker already replaced
            if kind == "events":
                slot.polling = False
            try:
                reply = self._ray.get(ref)
            except self._ray.exceptions.RayError as exc:
                if kind != "events":  # the run or setup call tells the same story
                    self._forget(slot)
                    lines = str(exc).strip().splitlines()
                    self._on_death(slot, lines[0] if lines else type(exc).__name__)
                continue
            if kind == "setup":
                if reply[0] == "ready":
                    self._on_ready(slot, reply[1])
                else:
                    self._forget(slot)
                    self._on_init_error(slot, reply[1])
            elif kind == "events":
                for task_id, data, when in reply:
                    if slot.task is not None and slot.task.task_id == task_id:
                        self._on_event(slot, task_id, data, when)
                if slot.task is not None:
                    self._poll_events(slot)
            else:
                task_id, last_event, *outcome = reply
                if last_event is not None:
                    self._on_event(slot, *last_event)
                self._on_result(slot, task_id, *outcome)

    def _drain(self, slot: _Slot) -> None:
        mine = [ref for ref, (s, _, _) in self._refs.items() if s is slot]
        if mine:
            self._take(self._ray.wait(mine, num_returns=len(mine), timeout=0)[0])

    def _receive(self, timeout: float | None) -> None:
        refs = list(self._refs)
        if not refs:
            return
        ready, _ = self._ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:
            self._take(self._ray.wait(refs, num_returns=len(refs), timeout=0)[0])

    def shutdown(self, graceful=True, wait=5.0):
        if self._closing:
            return []
        self._begin_shutdown()
        try:
            busy = [slot for slot in self._slots if slot.started is not None]
            if graceful and busy:
                for slot in busy:
                    slot.actor.stop.remote()
                self._wait_for_workers(wait, lambda: any(s.started is not None for s in busy))
        finally:
            for slot in self._slots:
                if slot.actor is not None:
                    self._forget(slot)
            if self._owns_ray:
                self._ray.shutdown()
        return self._end_shutdown()


# ----------------------------------------------------------------------------

def make_scheduler(backend: str, devices: str | list[str], *, init_fn: Callable | None = None,
                   init_args: tuple = (), candidate_timeout: float | None = None,
                   retries_on_death: int = 1, report_interval: float = 0.1) -> Scheduler:
    """Build a scheduler.

    backend: ``"inline"``, ``"local"`` or ``"ray"`` (see the module doc).
    devices: ``"cpu"``, ``"cpu:W"``, ``"cuda"``, ``"cuda:0,cuda:1"`` or a list
    (see :func:`parse_devices`); the machine's cores are split evenly among the
    workers (``torch.set_num_threads(max(1, cores // workers))``; inline leaves
    the calling process's threads alone). init_fn(*init_args) runs once per
    worker and becomes ``ctx.shared``. candidate_timeout: seconds per task
    attempt, or None. retries_on_death: how many times a task whose worker
    died is run again. report_interval: reports closer together are merged.
    """
    if candidate_timeout is not None and not candidate_timeout > 0:
        raise ValueError(f"candidate_timeout must be > 0 seconds or None, got {candidate_timeout!r}")
    if not isinstance(retries_on_death, int) or retries_on_death < 0:
        raise ValueError(f"retries_on_death must be an integer >= 0, got {retries_on_death!r}")
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"init_fn must be callable, got {init_fn!r}")
    if backend not in ("inline", "local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; use inline, local or ray")
    if backend == "inline":
        specs = _worker_specs(devices, init_fn, init_args, candidate_timeout, report_interval)
        if len(specs) != 1:
            raise ValueError(f"the inline backend runs on one device, got {len(specs)} "
                             f"({', '.join(s.label for s in specs)}); pick one")
        return InlineScheduler(dataclasses.replace(specs[0], threads=0))
    try:
        pickle.dumps((init_fn, tuple(init_args)))
    except Exception as exc:
        raise TypeError(f"init_fn must be a top-level function of an importable module and init_args "
                        f"picklable: {type(exc).__name__}: {exc}") from exc
    if backend == "local":
        return LocalScheduler(_worker_specs(devices, init_fn, init_args, candidate_timeout, report_interval),
                              retries_on_death)
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"the ray backend needs Ray: {RAY_INSTALL_HINT}") from exc
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    try:
        # under Ray, "cuda" means every GPU of the cluster, and cuda:I names a slot, not a GPU
        specs = _worker_specs(devices, init_fn, init_args, candidate_timeout, report_interval,
                              gpu_count=lambda: int(ray.cluster_resources().get("GPU", 0)))
        return RayScheduler(specs, retries_on_death, ray, owns_ray)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
