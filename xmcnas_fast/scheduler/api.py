"""The public entry (main process): :func:`make_scheduler`, which picks a backend and gives it its
workers. The backends are imported when asked for; they and this module share :mod:`.interface`."""
from __future__ import annotations

import pickle
from typing import Callable

from .devices import worker_specs
from .interface import Scheduler


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
