"""The worker process of the local backend (this code runs in the child alone): it takes
orders from the main process through a pipe, runs tasks and sends back events and results."""
from __future__ import annotations

import os
import pickle
import queue
import signal
import threading
from typing import Any

import torch

from .devices import WorkerSpec, bind
from .task import Merger, deadline_after, describe, execute


def init_worker(spec: WorkerSpec, device: torch.device) -> Any:
    """Set up this worker process (:func:`.devices.bind`: threads, current CUDA device); returns
    ``init_fn``'s result."""
    bind(device, spec.threads)
    return spec.init_fn(*spec.init_args) if spec.init_fn is not None else None


class Outbox:
    """The worker's sending side: events from a background thread (merged, never blocking
    the task), results from the task's thread, always in order."""

    def __init__(self, conn, interval: float):
        self._conn = conn
        self._merger = Merger(interval)
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


def read_orders(conn, inbox: queue.SimpleQueue, stop: threading.Event) -> None:
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


def worker_main(conn, spec: WorkerSpec) -> None:
    # SIGINT is already ignored (inherited from the parent at spawn); make sure.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    inbox: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()
    threading.Thread(target=read_orders, args=(conn, inbox, stop), name="xmcnas-orders",
                     daemon=True).start()
    device = torch.device(spec.device)
    try:
        shared = init_worker(spec, device)
    except BaseException as exc:
        conn.send_bytes(pickle.dumps(("init_error", describe(exc))))
        return
    outbox = Outbox(conn, spec.report_interval)
    outbox.send(("ready", os.getpid()))
    while (order := inbox.get()) is not None:
        task_id, attempt, blob = order
        outcome = execute(blob, device, shared=shared, task_id=task_id, worker=spec.label,
                          attempt=attempt, deadline=deadline_after(spec.timeout), emit=outbox.report,
                          stopped=stop.is_set)
        outbox.send(("result", task_id, *outcome))
