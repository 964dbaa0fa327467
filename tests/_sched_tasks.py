"""Task functions for tests/test_scheduler.py.

They live in a module of their own because the spawned workers import them by
name (tests/ is on sys.path under pytest, and workers inherit sys.path).
"""
import os
import signal
import time
from pathlib import Path

import torch


def init_worker(directory, tag):
    """Counts its own calls: one line per call in a file named after the process."""
    with open(Path(directory) / f"init-{os.getpid()}.txt", "a") as f:
        f.write(tag + "\n")
    return {"tag": tag, "pid": os.getpid(), "threads": torch.get_num_threads()}


def failing_init(message):
    raise OSError(message)


def square(x, ctx):
    return {"x": x, "y": x * x, "pid": os.getpid(), "device": str(ctx.device), "shared": ctx.shared,
            "worker": ctx.worker, "task_id": ctx.task_id, "attempt": ctx.attempt}


def boom(x, ctx):
    raise ValueError(f"boom {x}")


def fake_oom(kind, ctx):
    if kind == "runtime":
        raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
    if kind == "torch":
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
    raise MemoryError()


def interrupt(_, ctx):
    raise KeyboardInterrupt


def return_unpicklable(_, ctx):
    return {"f": lambda: None}


def die_once(marker, ctx):
    """Kills its own worker on the first attempt (the marker file does not exist yet)."""
    marker = Path(marker)
    if not marker.exists():
        marker.write_text(str(os.getpid()))
        os.kill(os.getpid(), signal.SIGKILL)
    return {"pid": os.getpid(), "attempt": ctx.attempt}


def die_always(how, ctx):
    if how == "sigkill":
        os.kill(os.getpid(), signal.SIGKILL)
    os._exit(3)


def sleep(seconds, ctx):
    """Not cooperative: ignores should_stop."""
    ctx.report(pid=os.getpid(), started=True)
    time.sleep(seconds)
    return {"slept": seconds}


def wait_for_stop(seconds, ctx):
    """Cooperative: returns as soon as the scheduler asks it to stop."""
    ctx.report(pid=os.getpid(), started=True)
    end = time.monotonic() + seconds
    while not ctx.should_stop() and time.monotonic() < end:
        time.sleep(0.01)
    return {"stopped": ctx.should_stop(), "time_left": ctx.time_left()}


def chatty(n, ctx):
    for step in range(n):
        ctx.report(step=step)
        time.sleep(0.01)
    return {"steps": n}


def report_three(_, ctx):
    ctx.report(a=1)
    ctx.report(b=2)
    ctx.report(a=3)
    return None


def cuda_info(_, ctx):
    return {"device": str(ctx.device), "current": torch.cuda.current_device(), "pid": os.getpid(),
            "tensor_device": str(torch.ones(1, device=ctx.device).device)}
