"""Device specs: which workers a spec such as ``"cuda:0x4,cpu"`` asks for (parsed once, by
:func:`parse_request`, then resolved against the GPUs there are), what each worker is told (its
device, its share of the CPU cores), and :func:`bind`, which every backend's worker calls to take
its device and threads."""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Callable

import torch

FORMS = ('"cpu", "cpu:W" (W worker processes), "cuda" (every visible GPU), "cudaxN" (N workers '
         'on every visible GPU), "cuda:I", "cuda:IxN" (N workers on GPU I), or several of these '
         'separated by commas or given as a list')
_GPU_INDEX = "cuda:I takes a GPU index I (cuda:IxN: N workers on it)"


@dataclasses.dataclass(frozen=True)
class WorkerSpec:
    """What one worker is told; it travels to the worker process."""

    label: str          # shown in results and events: "cpu", "cpu#1", "cuda:0", "cuda:0#2"
    device: str         # torch device string: "cpu", "cuda:0"
    threads: int        # torch.set_num_threads in the worker; 0 leaves it alone
    init_fn: Callable | None
    init_args: tuple
    timeout: float | None
    report_interval: float
    share: int = 1      # how many workers share this device (Ray: each asks 1/share of a GPU)


def threads_each(workers: int, cores: int | None = None) -> int:
    """The torch CPU threads each of `workers` workers gets: the cores (default: those this
    process may use) split evenly, at least one each."""
    return max(1, (cores or visible_cores()) // max(1, workers))


def bind(device, threads: int = 0) -> torch.device:
    """Bind the calling process (its current thread, for the CUDA device) to `device` and `threads`
    torch CPU threads (0 leaves them alone): what every backend does before a worker runs a task.
    Returns the torch device."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    return device


def visible_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def cuda_count() -> int:
    # device_count() asks the driver or NVML; it creates no CUDA context.
    return torch.cuda.device_count() if torch.backends.cuda.is_built() else 0


def _workers_per_device(item: str) -> tuple[str, int]:
    """``"cuda:0x4"`` -> (``"cuda:0"``, 4); ``"cuda"`` -> (``"cuda"``, 1)."""
    head, sep, count = item.partition("x")
    if not sep:
        return head, 1
    if not re.fullmatch(r"cuda(:\d+)?", head):
        raise ValueError(f"bad device {item!r}: {_GPU_INDEX}")
    if count.isdigit() and int(count) >= 1:
        return head, int(count)
    raise ValueError(f"bad device {item!r}: xN takes a number of workers N >= 1 (e.g. cuda:0x4)")


def _cpu_workers(item: str, arg: str, sep: str) -> int:
    if not sep:
        return 1
    if arg.isdigit() and int(arg) >= 1:
        return int(arg)
    raise ValueError(f"bad device {item!r}: cpu:W takes a number of workers W >= 1")


def _items(devices) -> list[str]:
    if isinstance(devices, str):
        items = devices.split(",")
    elif isinstance(devices, (list, tuple)) and all(isinstance(d, str) for d in devices):
        items = list(devices)
    else:
        raise ValueError(f"devices must be a string or a list of strings, got {devices!r}")
    items = [item.strip().lower() for item in items]
    if not items or any(not item for item in items):
        raise ValueError(f"empty device in {devices!r}; use {FORMS}")
    return items


@dataclasses.dataclass(frozen=True)
class DeviceRequest:
    """A device spec, parsed (by :func:`parse_request`, the one parser of the text) but not yet
    placed on GPUs: which GPUs exist is known only where the workers run (this machine, or the Ray
    cluster), so :meth:`resolve` is told how many there are."""

    text: str                                   # as given, for messages
    gpus: tuple = ()                            # ((GPU index, or None for every GPU, workers on each), ...)
    cpu_workers: int = 0

    @property
    def wants_cuda(self) -> bool:
        return bool(self.gpus)

    def resolve(self, gpu_count: Callable[[], int] | None = None) -> list[tuple[str, str, int]]:
        """(label, torch device, workers on that device) per worker, GPUs first. ``gpu_count``
        counts the GPUs there are (default: those this process sees); it is asked only when a
        CUDA device is named."""
        count = (gpu_count or cuda_count)() if self.gpus else 0
        placed: dict[int, int] = {}             # GPU index -> workers on it, in the order given
        for index, per_device, item in self.gpus:
            if index is None and count == 0:
                raise ValueError(f"device {item!r}: no CUDA GPU is visible to this process")
            if index is not None and index >= count:
                seen = f"only {count} visible" if count else "none is visible"
                raise ValueError(f"device {item!r}: no such CUDA GPU ({seen})")
            for i in range(count) if index is None else [index]:
                if i in placed:
                    raise ValueError(f"GPU cuda:{i} given twice in {self.text!r}; "
                                     f"several workers on one GPU are written cuda:{i}x2")
                placed[i] = per_device
        out = []
        for index, n in placed.items():
            device = f"cuda:{index}"
            out.extend((device if n == 1 else f"{device}#{k}", device, n) for k in range(n))
        n = self.cpu_workers
        out.extend(("cpu" if n == 1 else f"cpu#{k}", "cpu", n) for k in range(n))
        return out


def parse_request(devices) -> DeviceRequest:
    """Parse a device spec (a string, a list of strings, or a request already parsed); ValueError
    names what is wrong. Needs no GPU: whether the GPUs named exist is :meth:`DeviceRequest.resolve`'s
    question."""
    if isinstance(devices, DeviceRequest):
        return devices
    cpu_workers = None
    gpus = []
    for item in _items(devices):
        head, per_device = _workers_per_device(item) if item.startswith("cuda") else (item, 1)
        kind, sep, arg = head.partition(":")
        if kind == "cpu":
            if cpu_workers is not None:
                raise ValueError(f"CPU workers given twice in {devices!r}; give them once, as cpu or cpu:W")
            cpu_workers = _cpu_workers(item, arg, sep)
        elif kind == "cuda":
            if sep and not arg.isdigit():
                raise ValueError(f"bad device {item!r}: {_GPU_INDEX}")
            gpus.append((int(arg) if sep else None, per_device, item))
        else:
            raise ValueError(f"unknown device {item!r}; use {FORMS}")
    text = devices if isinstance(devices, str) else ",".join(devices)
    return DeviceRequest(text, tuple(gpus), cpu_workers or 0)


def parse(devices, gpu_count: Callable[[], int] | None = None) -> list[tuple[str, str, int]]:
    """(label, torch device, workers on that device) per worker: the spec parsed and resolved."""
    return parse_request(devices).resolve(gpu_count)


def parse_devices(devices, gpu_count: Callable[[], int] | None = None) -> list[str]:
    """The worker labels a device spec gives, one per worker (ValueError when malformed).

    ``"cpu"`` -> ``["cpu"]``; ``"cpu:2"`` -> ``["cpu#0", "cpu#1"]``;
    ``"cuda"`` -> one per visible GPU; ``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]``;
    ``"cuda:0x2"`` -> ``["cuda:0#0", "cuda:0#1"]`` (two worker processes on GPU 0);
    ``"cudax2"`` -> two per visible GPU. ``gpu_count``: see :func:`parse`.
    """
    return [label for label, _, _ in parse(devices, gpu_count)]


def worker_specs(devices, init_fn, init_args, timeout, report_interval, *,
                 gpu_count: Callable[[], int] | None = None, cores: int | None = None) -> list[WorkerSpec]:
    """One spec per worker. The cores (default: those this process may use) are split evenly
    among all the workers, GPU workers included: each gets ``max(1, cores // workers)`` threads."""
    parsed = parse(devices, gpu_count)
    threads = threads_each(len(parsed), cores)
    return [WorkerSpec(label, device, threads, init_fn, tuple(init_args), timeout, report_interval, share)
            for label, device, share in parsed]
