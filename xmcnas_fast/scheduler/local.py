"""The local backend, main process side: one spawned worker process per slot (the child runs
:mod:`.worker`), reached through a pipe; deaths noticed through the process sentinel."""
from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing.util
import pickle
import signal
import threading
import time
from multiprocessing.connection import wait as wait_any
from typing import Any

import torch

from .devices import WorkerSpec
from .pool import PoolScheduler, Slot
from .worker import worker_main


@contextlib.contextmanager
def sigint_ignored():
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


def describe_exit(code: int | None) -> str:
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


def end_processes(procs: dict) -> None:
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


@dataclasses.dataclass
class Process:
    """A slot's transport: its worker process and the main process's end of their pipe."""

    proc: Any
    conn: Any


class LocalScheduler(PoolScheduler):
    backend = "local"

    def __init__(self, specs: list[WorkerSpec], retries_on_death: int):
        super().__init__(specs, retries_on_death)
        self._mp = torch.multiprocessing.get_context("spawn")
        self._procs: dict[int, Any] = {}
        # Runs at interpreter exit before multiprocessing joins its children.
        self._finalizer = multiprocessing.util.Finalize(self, end_processes, args=(self._procs,),
                                                        exitpriority=10)
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot: Slot) -> None:
        parent_conn, child_conn = self._mp.Pipe(duplex=True)
        proc = self._mp.Process(target=worker_main, args=(child_conn, slot.spec),
                                name=f"xmcnas-worker[{slot.spec.label}]")
        with sigint_ignored():
            proc.start()
        child_conn.close()
        slot.transport, slot.pid, slot.state = Process(proc, parent_conn), proc.pid, "starting"
        self._procs[slot.index] = proc

    def _send(self, slot: Slot, msg: tuple) -> bool:
        try:
            slot.transport.conn.send_bytes(pickle.dumps(msg))
            return True
        except OSError:
            return False  # the worker is gone; its exit is noticed through its sentinel

    def _send_task(self, slot: Slot) -> None:
        task = slot.task
        if self._send(slot, ("task", task.task_id, task.attempts, task.blob)):
            slot.started = time.monotonic()

    def _drain(self, slot: Slot) -> None:
        while slot.transport is not None:
            try:
                if not slot.transport.conn.poll():
                    return
                msg = pickle.loads(slot.transport.conn.recv_bytes())
            except (EOFError, OSError):
                self._on_exit(slot)
                return
            self._handle(slot, msg)

    def _handle(self, slot: Slot, msg: tuple) -> None:
        kind = msg[0]
        if kind == "ready":
            self._on_ready(slot, msg[1])
        elif kind == "init_error":
            self._on_init_error(slot, msg[1])
        elif kind == "event":
            self._on_event(slot, *msg[1:])
        elif kind == "result":
            self._on_result(slot, *msg[1:])

    def _close(self, slot: Slot, kill: bool) -> int | None:
        proc, conn = slot.transport.proc, slot.transport.conn
        if kill:
            proc.kill()
        proc.join(1.0)
        if proc.is_alive():
            proc.kill()
            proc.join()
        conn.close()
        slot.transport = None
        self._procs.pop(slot.index, None)
        return proc.exitcode

    def _kill(self, slot: Slot) -> str:
        return describe_exit(self._close(slot, kill=True))

    def _on_exit(self, slot: Slot) -> None:
        """The worker process ended (or closed its pipe) without being asked to."""
        slot.dying = True
        conn = slot.transport.conn
        try:  # what it sent before it went still counts
            while conn.poll():
                self._handle(slot, pickle.loads(conn.recv_bytes()))
        except (EOFError, OSError):
            pass
        slot.dying = False
        self._on_death(slot, describe_exit(self._close(slot, kill=False)))

    def _receive(self, timeout: float | None) -> None:
        waitables = {}
        for slot in self._slots:
            if slot.transport is not None:
                waitables[slot.transport.conn] = slot
                waitables[slot.transport.proc.sentinel] = slot
        if not waitables:
            return
        for obj in wait_any(list(waitables), timeout):
            slot = waitables[obj]
            if slot.transport is None:
                continue  # ended while an earlier object was handled
            if obj is slot.transport.conn:
                self._drain(slot)
            elif obj == slot.transport.proc.sentinel:
                self._on_exit(slot)

    def shutdown(self, graceful=True, wait=5.0):
        if self._closing:
            return []
        self._begin_shutdown()
        try:
            for slot in self._slots:
                if slot.transport is None:
                    continue
                if slot.state != "ready":  # still importing: nothing of value there
                    if slot.task is not None:
                        self._unfinished.append(slot.task.task_id)
                        slot.task = None
                    self._close(slot, kill=True)
                    continue
                if graceful:
                    self._send(slot, ("stop",))
                    self._send(slot, ("quit",))
            if graceful:
                self._wait_for_workers(wait, lambda: any(s.transport is not None for s in self._slots))
        finally:
            for slot in self._slots:
                if slot.transport is not None:
                    slot.transport.conn.close()
                    slot.transport = None
            end_processes(self._procs)
            self._finalizer.cancel()
        return self._end_shutdown()
