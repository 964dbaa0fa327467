"""Run functions on devices and hand back their results.

The scheduler knows nothing of what it runs: a task is ``fn(payload, ctx)``,
run in a worker bound to one device, and its outcome comes back as a
:class:`TaskResult`; progress the task reports on the way comes back as
:class:`Event` objects.

Devices (:func:`parse_devices`): ``cpu``, ``cpu:W`` (W workers), ``cuda``
(one worker per visible GPU), ``cuda:I``, and several workers per GPU for
candidates too small to fill one: ``cuda:IxN`` (N workers on GPU I, labelled
``cuda:I#0`` ... ``cuda:I#N-1``, each its own process and slot, all on torch
device ``cuda:I``) or ``cudaxN`` (N on every GPU). The machine's cores are
split evenly among all the workers.

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
    One worker process per slot (``torch.multiprocessing``, spawn method).
    A task past ``candidate_timeout`` has its worker killed and replaced; a
    worker that dies (segfault, ``os._exit``, a signal, the OOM killer) is
    replaced and its task run again up to ``retries_on_death`` times.
``ray``
    One Ray actor per slot, with the same failure handling as ``local``;
    only when ``ray`` is installed (``pip install 'xmcnas-fast[ray]'``).
    ``"cuda"`` means every GPU of the Ray cluster; a CUDA slot asks Ray for
    one GPU (``1/N`` of one when written ``cuda:IxN``) and Ray picks which
    (``cuda:I`` then names the slot, not the GPU). If Ray is not running,
    it is started on this machine and stopped at shutdown; to use a
    cluster, call ``ray.init`` first, with a ``runtime_env`` that makes the
    task modules importable.

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
zombies). No CUDA context is created in the main process: every backend's worker binds itself
to its device and threads (:func:`.devices.bind`) before ``init_fn``.

Modules, by the process their code runs in: :mod:`.interface` (the main process: results,
events, the Scheduler interface), :mod:`.api` (:func:`make_scheduler`), :mod:`.devices` (device
specs, parsed once and resolved where the workers run; :func:`.devices.bind`),
:mod:`.task` (a task and its execution, in any process), :mod:`.inline`,
:mod:`.pool` (slots, retries, timeouts: every backend with workers),
:mod:`.worker` (the local backend's child process alone), :mod:`.local` (the
local backend's main-process side), :mod:`.ray_backend` (imported only when
the ray backend is asked for).
"""
from .api import make_scheduler
from .devices import parse_devices
from .interface import Event, Scheduler, TaskResult
from .task import WorkerContext

__all__ = [
    "Event",
    "Scheduler",
    "TaskResult",
    "WorkerContext",
    "make_scheduler",
    "parse_devices",
]
