"""What every backend shares (main process): results, events and the Scheduler interface. The
backends import it; :mod:`.api` imports the backends."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

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
