"""The public API (runs in the main process): results, events, the Scheduler interface and
:func:`make_scheduler`, which picks a backend. The backends are imported when asked for."""
from __future__ import annotations

import dataclasses
import pickle
from typing import Any, Callable

from .devices import worker_specs
from .task import WorkerContext


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


def make_scheduler(backend: str, devices: str | list[str], *, init_fn: Callable | None = None,
                   init_args: tuple = (), candidate_timeout: float | None = None,
                   retries_on_death: int = 1, report_interval: float = 0.1) -> Scheduler:
    """Build a scheduler.

    backend: ``"inline"``, ``"local"`` or ``"ray"`` (see the package doc).
    devices: ``"cpu"``, ``"cpu:W"``, ``"cuda"``, ``"cudaxN"``, ``"cuda:0,cuda:1"``,
    ``"cuda:0x4"`` or a list (see :func:`parse_devices`); the machine's cores
    are split evenly among the workers (``torch.set_num_threads(max(1, cores //
    workers))``; inline leaves the calling process's threads alone).
    init_fn(*init_args) runs once per worker and becomes ``ctx.shared``.
    candidate_timeout: seconds per task attempt, or None. retries_on_death: how
    many times a task whose worker died is run again. report_interval: reports
    closer together are merged.
    """
    if candidate_timeout is not None and not candidate_timeout > 0:
        raise ValueError(f"candidate_timeout must be > 0 seconds or None, got {candidate_timeout!r}")
    if not isinstance(retries_on_death, int) or retries_on_death < 0:
        raise ValueError(f"retries_on_death must be an integer >= 0, got {retries_on_death!r}")
    if init_fn is not None and not callable(init_fn):
        raise TypeError(f"init_fn must be callable, got {init_fn!r}")
    if backend not in ("inline", "local", "ray"):
        raise ValueError(f"unknown backend {backend!r}; use inline, local or ray")

    def specs(gpu_count=None):
        return worker_specs(devices, init_fn, init_args, candidate_timeout, report_interval,
                            gpu_count=gpu_count)

    if backend == "inline":
        from .inline import InlineScheduler

        return InlineScheduler.on_one_device(specs())
    try:
        pickle.dumps((init_fn, tuple(init_args)))
    except Exception as exc:
        raise TypeError(f"init_fn must be a top-level function of an importable module and init_args "
                        f"picklable: {type(exc).__name__}: {exc}") from exc
    if backend == "local":
        from .local import LocalScheduler

        return LocalScheduler(specs(), retries_on_death)
    from .ray_backend import open_ray_scheduler

    return open_ray_scheduler(specs, retries_on_death)
