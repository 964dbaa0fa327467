"""The inline backend: tasks run in the caller's own process, one at a time, inside poll()."""
from __future__ import annotations

import collections
import dataclasses
import os
import pickle
import time

from .interface import Event, Scheduler, TaskResult
from .devices import WorkerSpec, bind
from .task import Merger, Task, deadline_after, execute, pickle_task


class InlineScheduler(Scheduler):
    backend = "inline"

    def __init__(self, spec: WorkerSpec):
        self.devices = [spec.label]
        self._spec = spec
        self._device = bind(spec.device, spec.threads)
        self._shared = spec.init_fn(*spec.init_args) if spec.init_fn is not None else None
        self._queue: collections.deque[Task] = collections.deque()
        self._out: list[TaskResult | Event] = []
        self._merger = Merger(spec.report_interval)
        self._stop = False
        self._closed = False

    @classmethod
    def on_one_device(cls, specs: list[WorkerSpec]) -> InlineScheduler:
        """The scheduler for a device spec that names one worker (it leaves the caller's threads alone)."""
        if len(specs) != 1:
            raise ValueError(f"the inline backend runs on one device, got {len(specs)} "
                             f"({', '.join(s.label for s in specs)}); pick one")
        return cls(dataclasses.replace(specs[0], threads=0))

    def submit(self, task_id, fn, payload):
        if self._closed:
            raise RuntimeError("the scheduler is shut down")
        if any(t.task_id == task_id for t in self._queue):
            raise ValueError(f"task {task_id!r} is already submitted")
        self._queue.append(Task(task_id, pickle_task(fn, payload)))

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

    def _run(self, task: Task):
        timeout = self._spec.timeout
        deadline = deadline_after(timeout)
        status, value_blob, error, seconds = execute(
            task.blob, self._device, interruptible=True, shared=self._shared, task_id=task.task_id,
            worker=self._spec.label, attempt=1, deadline=deadline, emit=self._emit,
            stopped=lambda: self._stop)
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
