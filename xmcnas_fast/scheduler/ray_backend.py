"""The Ray backend: one Ray actor per slot. :class:`RayWorker` is the actor's body (it runs
in a Ray worker process); :class:`RayScheduler` drives the actors from the main process.
This module is imported only when the ray backend is asked for."""
from __future__ import annotations

import dataclasses
import os
import sys
import threading
import time
from typing import Any, Callable

import torch

from .devices import WorkerSpec, bind
from .pool import PoolScheduler, Slot
from .task import Merger, deadline_after, describe, execute
from .worker import init_worker

RAY_INSTALL_HINT = "pip install 'xmcnas-fast[ray]'"


class RayWorker:
    """The body of one Ray actor (made remote by RayScheduler): a threaded actor, so that
    ``events`` and ``stop`` are answered while ``run`` works."""

    def __init__(self, spec: WorkerSpec):
        self._spec = spec
        self._stop = threading.Event()
        self._cv = threading.Condition()
        self._merger = Merger(spec.report_interval)
        # Ray shows the actor only the GPU it was given: it is device 0 here.
        self._device = torch.device("cuda", 0) if spec.device.startswith("cuda") else torch.device("cpu")
        self._shared = None

    def setup(self):
        try:
            self._shared = init_worker(self._spec, self._device)
        except BaseException as exc:
            return ("init_error", describe(exc))
        return ("ready", os.getpid())

    def _report(self, task_id, data):
        with self._cv:
            self._merger.add(task_id, data)
            self._cv.notify_all()

    def run(self, task_id, attempt, blob):
        bind(self._device)  # the current CUDA device is per thread: this call's thread takes it too
        outcome = execute(blob, self._device, shared=self._shared, task_id=task_id,
                          worker=self._spec.label, attempt=attempt,
                          deadline=deadline_after(self._spec.timeout), emit=self._report,
                          stopped=self._stop.is_set)
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


@dataclasses.dataclass
class Actor:
    """A slot's transport: its Ray actor, and whether an ``events`` call is in flight."""

    handle: Any
    polling: bool = False


def actor_options(spec: WorkerSpec) -> dict:
    """The resources one slot's actor asks Ray for: a CUDA slot shares a GPU with the other
    ``spec.share - 1`` slots written on it (``cuda:0x4``: a quarter each); Ray picks the GPU."""
    if spec.device.startswith("cuda"):
        return {"num_gpus": 1 / spec.share, "num_cpus": 1}
    return {"num_cpus": spec.threads}


class RayScheduler(PoolScheduler):
    """One Ray actor per slot (a GPU, or a share of one, for CUDA slots; Ray picks which GPU)."""

    backend = "ray"
    _EVENT_WAIT = 1.0

    def __init__(self, specs: list[WorkerSpec], retries_on_death: int, ray, owns_ray: bool):
        super().__init__(specs, retries_on_death)
        self._ray = ray
        self._owns_ray = owns_ray
        self._actor_cls = ray.remote(RayWorker)
        self._refs: dict[Any, tuple[Slot, str, Actor]] = {}  # ref -> (slot, kind, transport)
        for slot in self._slots:
            self._spawn(slot)

    def _call(self, slot: Slot, kind: str, *args) -> None:
        ref = getattr(slot.transport.handle, kind).remote(*args)
        self._refs[ref] = (slot, kind, slot.transport)

    def _spawn(self, slot: Slot) -> None:
        handle = self._actor_cls.options(max_concurrency=3, **actor_options(slot.spec)).remote(slot.spec)
        slot.transport, slot.state, slot.pid = Actor(handle), "starting", None
        self._call(slot, "setup")

    def _send_task(self, slot: Slot) -> None:
        task = slot.task
        self._call(slot, "run", task.task_id, task.attempts, task.blob)
        slot.started = time.monotonic()
        self._poll_events(slot)

    def _poll_events(self, slot: Slot) -> None:
        if not slot.transport.polling:  # one at a time: each holds one of the actor's threads
            slot.transport.polling = True
            self._call(slot, "events", self._EVENT_WAIT)

    def _forget(self, slot: Slot) -> None:
        actor, slot.transport = slot.transport, None
        for ref in [r for r, (_, _, a) in self._refs.items() if a is actor]:
            del self._refs[ref]
        if actor is not None:
            self._ray.kill(actor.handle, no_restart=True)

    def _kill(self, slot: Slot) -> str:
        self._forget(slot)
        return "Ray actor killed"

    def _take(self, refs) -> None:
        # events before results, so that a task's progress precedes its outcome
        order = {"events": 0, "run": 1, "setup": 2}
        entries = sorted(((ref, *self._refs.pop(ref)) for ref in refs if ref in self._refs),
                         key=lambda e: order[e[2]])
        for ref, slot, kind, actor in entries:
            if actor is not slot.transport:
                continue  # from a worker already replaced
            if kind == "events":
                actor.polling = False
            try:
                reply = self._ray.get(ref)
            except self._ray.exceptions.RayError as exc:
                if kind != "events":  # the run or setup call tells the same story
                    self._forget(slot)
                    lines = str(exc).strip().splitlines()
                    self._on_death(slot, lines[0] if lines else type(exc).__name__)
                continue
            self._on_reply(slot, kind, reply)

    def _on_reply(self, slot: Slot, kind: str, reply) -> None:
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

    def _drain(self, slot: Slot) -> None:
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
                    slot.transport.handle.stop.remote()
                self._wait_for_workers(wait, lambda: any(s.started is not None for s in busy))
        finally:
            for slot in self._slots:
                if slot.transport is not None:
                    self._forget(slot)
            if self._owns_ray:
                self._ray.shutdown()
        return self._end_shutdown()


def open_ray_scheduler(make_specs: Callable[..., list[WorkerSpec]], retries_on_death: int) -> RayScheduler:
    """A RayScheduler on the running Ray, or on one started here (and stopped at its shutdown).
    ``make_specs(gpu_count=...)`` builds the specs: under Ray, ``"cuda"`` means every GPU of
    the cluster, and ``cuda:I`` names a slot, not a GPU."""
    try:
        import ray
    except ImportError as exc:
        raise ImportError(f"the ray backend needs Ray: {RAY_INSTALL_HINT}") from exc
    owns_ray = not ray.is_initialized()
    if owns_ray:
        ray.init(include_dashboard=False, log_to_driver=True,
                 runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    try:
        specs = make_specs(gpu_count=lambda: int(ray.cluster_resources().get("GPU", 0)))
        return RayScheduler(specs, retries_on_death, ray, owns_ray)
    except BaseException:
        if owns_ray:
            ray.shutdown()
        raise
