"""The scheduler: results, failures, worker deaths, timeouts, events, shutdown.

Local workers are spawned processes that import torch (seconds each), so the
schedulers that survive their tests are shared per module.
"""
import multiprocessing
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import _sched_tasks as tasks
from xmcnas_fast.scheduler import Event, TaskResult, make_scheduler

try:
    import ray  # noqa: F401
    POOLS = ["local", "ray"]
except ImportError:
    POOLS = ["local"]  # the ray backend is tested where ray is installed

TIMEOUT = 3.0        # candidate_timeout of the shared schedulers; every ordinary task takes milliseconds
WAIT_LIMIT = 90.0    # a test that waits longer than this for its results has hung
ROOT = Path(__file__).resolve().parent.parent


def collect(sched, expected_ids, limit=WAIT_LIMIT):
    """Poll until a result for every id has arrived; returns (results by id, events in arrival order)."""
    results, events = {}, []
    end = time.monotonic() + limit
    while not set(expected_ids) <= set(results):
        assert time.monotonic() < end, f"no result for {set(expected_ids) - set(results)} after {limit} s"
        for item in sched.poll(timeout=1.0):
            if isinstance(item, TaskResult):
                assert item.task_id not in results, f"two results for {item.task_id}"
                results[item.task_id] = item
            else:
                assert isinstance(item, Event)
                events.append(item)
    return results, events


def run(sched, fn, payloads, prefix):
    ids = [f"{prefix}-{i}" for i in range(len(payloads))]
    for task_id, payload in zip(ids, payloads):
        sched.submit(task_id, fn, payload)
    results, events = collect(sched, ids)
    return [results[i] for i in ids], events


def alive(pid):
    """True while the process exists and is not a zombie."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def wait_gone(pids, limit=30.0):
    """True once none of the processes is alive (waits up to ``limit`` s: Ray ends its workers
    asynchronously; local workers are joined by shutdown, so they must be gone at once)."""
    end = time.monotonic() + limit
    while any(alive(pid) for pid in pids) and time.monotonic() < end:
        time.sleep(0.1)
    return not any(alive(pid) for pid in pids)


@pytest.fixture(scope="module")
def init_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("init")


def worker_children():
    return {p for p in multiprocessing.active_children() if p.name.startswith("xmcnas-worker")}


def shared_scheduler(backend, devices, init_dir):
    s = make_scheduler(backend, devices, init_fn=tasks.init_worker, init_args=(str(init_dir), backend),
                       candidate_timeout=TIMEOUT)
    yield s
    pids = set(s.worker_pids().values())
    assert s.shutdown() == []
    if backend != "inline":
        assert pids and os.getpid() not in pids  # a Ray actor still starting has no pid yet
        assert wait_gone(pids, limit=0 if backend == "local" else 30)
    assert s.worker_pids() == {}


@pytest.fixture(scope="module")
def inline(init_dir):
    yield from shared_scheduler("inline", "cpu", init_dir)


@pytest.fixture(scope="module")
def local(init_dir):
    yield from shared_scheduler("local", "cpu:2", init_dir)


@pytest.fixture(scope="module")
def ray_cluster():
    """Ray started by the caller, as on a cluster: the scheduler then uses it and leaves it up.
    Logical CPUs to spare, so that a test's own scheduler fits beside the shared one."""
    import ray
    ray.init(num_cpus=8, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def ray_pool(ray_cluster, init_dir):
    yield from shared_scheduler("ray", "cpu:2", init_dir)


@pytest.fixture(params=POOLS)
def backend(request):
    if request.param == "ray":
        request.getfixturevalue("ray_cluster")
    return request.param


FIXTURES = {"inline": "inline", "local": "local", "ray": "ray_pool"}


@pytest.fixture(scope="module", params=["inline"] + POOLS)
def sched(request):
    return request.getfixturevalue(FIXTURES[request.param])


@pytest.fixture(scope="module", params=POOLS)
def pool(request):
    """The backends with worker processes."""
    return request.getfixturevalue(FIXTURES[request.param])


# -- arguments ---------------------------------------------------------------

def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend"):
        make_scheduler("threads", "cpu")
    with pytest.raises(ValueError, match="candidate_timeout"):
        make_scheduler("inline", "cpu", candidate_timeout=0)
    with pytest.raises(ValueError, match="retries_on_death"):
        make_scheduler("inline", "cpu", retries_on_death=-1)
    with pytest.raises(TypeError, match="init_fn"):
        make_scheduler("local", "cpu", init_fn=lambda: None)


# -- both backends -------------------------------------------------------------

def test_results_values_and_free_slots(sched):
    workers = len(sched.devices)
    assert sched.free_slots() == workers
    results, _ = run(sched, tasks.square, list(range(7)), "sq")
    for x, r in enumerate(results):
        assert (r.status, r.error, r.attempts) == ("ok", None, 1)
        assert (r.value["x"], r.value["y"], r.value["task_id"]) == (x, x * x, f"sq-{x}")
        assert r.device in sched.devices and r.value["worker"] == r.device
        assert r.value["device"] == "cpu"
        assert r.seconds >= 0
    assert sched.free_slots() == workers and sched.running() == {} and sched.queued() == []

    sched.submit("fs-0", tasks.square, 0)
    assert sched.free_slots() == workers - 1
    assert list(sched.running()) == ["fs-0"]
    for i in range(1, workers + 1):
        sched.submit(f"fs-{i}", tasks.square, i)
    assert sched.free_slots() == 0
    assert sched.queued() == [f"fs-{workers}"]
    collect(sched, [f"fs-{i}" for i in range(workers + 1)])
    assert sched.free_slots() == workers
    assert not torch.cuda.is_initialized()


def test_init_runs_once_per_worker(sched, init_dir):
    results, _ = run(sched, tasks.square, list(range(2 * len(sched.devices) + 2)), "init")
    for r in results:
        shared = r.value["shared"]
        assert shared["pid"] == r.value["pid"] and shared["tag"] == sched.backend
        calls = (init_dir / f"init-{r.value['pid']}.txt").read_text().splitlines()
        assert calls == [sched.backend]
    if sched.backend == "inline":
        assert results[0].value["pid"] == os.getpid()
    else:
        assert os.getpid() not in {r.value["pid"] for r in results}
        # cpu:2 -> each worker gets half the cores
        assert {r.value["shared"]["threads"] for r in results} == {max(1, len(os.sched_getaffinity(0)) // 2)}


def test_error_then_worker_goes_on(sched):
    before = {r.value["pid"] for r in run(sched, tasks.square, [1, 2], "pre")[0]}
    errors, _ = run(sched, tasks.boom, [7, 8], "boom")
    for x, r in zip((7, 8), errors):
        assert r.status == "error" and r.value is None
        assert r.error.splitlines()[0] == f"ValueError: boom {x}"
        assert "Traceback" in r.error and "in boom" in r.error
    after, _ = run(sched, tasks.square, [3, 4, 5], "post")
    assert all(r.status == "ok" for r in after)
    if sched.backend != "inline":  # nobody was replaced
        assert {r.value["pid"] for r in after} <= before


@pytest.mark.parametrize("kind", ["runtime", "torch", "memory"])
def test_out_of_memory(sched, kind):
    [r], _ = run(sched, tasks.fake_oom, [kind], f"oom-{kind}")
    assert r.status == "oom"
    assert r.error.splitlines()[0].split(":")[0] in ("RuntimeError", "OutOfMemoryError", "MemoryError")
    [ok], _ = run(sched, tasks.square, [3], f"after-oom-{kind}")
    assert ok.status == "ok"


def test_unpicklable_value_is_an_error(sched):
    [r], _ = run(sched, tasks.return_unpicklable, [None], "unpicklable")
    assert r.status == "error" and "cannot be pickled" in r.error


def test_submit_checks(sched):
    with pytest.raises(TypeError, match="top-level function"):
        sched.submit("lambda", lambda x, ctx: x, 1)
    sched.submit("dup", tasks.square, 1)
    with pytest.raises(ValueError, match="already submitted"):
        sched.submit("dup", tasks.square, 1)
    collect(sched, ["dup"])


def test_events(sched):
    results, events = run(sched, tasks.chatty, [40], "chatty")
    assert results[0].status == "ok"
    assert events and all(e.task_id == "chatty-0" and e.device == results[0].device for e in events)
    steps = [e.data["step"] for e in events]
    assert steps == sorted(steps) and steps[-1] == 39   # the last report is never lost
    assert len(steps) < 40                               # close reports were merged
    assert all(isinstance(e.time, float) for e in events)


def test_events_arrive_before_their_result(sched):
    sched.submit("order", tasks.chatty, 5)
    seen = []
    end = time.monotonic() + WAIT_LIMIT
    while not seen or not isinstance(seen[-1], TaskResult):
        assert time.monotonic() < end
        seen.extend(i for i in sched.poll(1.0) if i.task_id == "order")
    assert [type(i) for i in seen[:-1]] == [Event] * (len(seen) - 1) and len(seen) >= 2


# -- inline only -----------------------------------------------------------------

def test_inline_merges_close_reports():
    s = make_scheduler("inline", "cpu", report_interval=100.0)
    s.submit("r", tasks.report_three, None)
    items = s.poll()
    # the first report goes out at once; the two within the interval are merged, sent before the result
    assert [i.data for i in items[:-1]] == [{"a": 1}, {"b": 2, "a": 3}]
    assert isinstance(items[-1], TaskResult) and items[-1].status == "ok"


def test_inline_timeout_is_cooperative():
    s = make_scheduler("inline", "cpu", candidate_timeout=0.3)
    s.submit("slow", tasks.wait_for_stop, 30)
    s.submit("next", tasks.square, 2)
    assert s.running() == {"slow": "cpu"} and s.queued() == ["next"]
    [r] = [i for i in s.poll() if isinstance(i, TaskResult)]
    assert r.status == "timeout" and r.value is None and "candidate_timeout=0.3" in r.error
    assert 0.3 <= r.seconds < 10
    [nxt] = [i for i in s.poll() if isinstance(i, TaskResult)]
    assert nxt.status == "ok" and nxt.value["y"] == 4
    s.submit("left", tasks.square, 1)
    assert s.shutdown() == ["left"]
    with pytest.raises(RuntimeError, match="shut down"):
        s.submit("late", tasks.square, 1)


def test_inline_lets_ctrl_c_through():
    s = make_scheduler("inline", "cpu")
    s.submit("interrupted", tasks.interrupt, None)
    with pytest.raises(KeyboardInterrupt):
        s.poll()
    assert s.running() == {"interrupted": "cpu"}
    assert s.shutdown() == ["interrupted"]


# -- backends with worker processes ---------------------------------------------------

def test_worker_killed_once_is_replaced_and_task_rerun(pool, tmp_path):
    marker = tmp_path / "killed"
    [r], _ = run(pool, tasks.die_once, [str(marker)], "die-once")
    assert (r.status, r.attempts, r.value["attempt"]) == ("ok", 2, 2)
    killed_pid = int(marker.read_text())
    assert r.value["pid"] != killed_pid and wait_gone([killed_pid])
    results, _ = run(pool, tasks.square, [1, 2, 3, 4], "after-death")
    assert all(r.status == "ok" for r in results)


def test_worker_dying_twice_is_died(pool):
    results, _ = run(pool, tasks.die_always, ["sigkill", "exit"], "die-always")
    kill, exit_ = results
    assert (kill.status, kill.attempts, exit_.status, exit_.attempts) == ("died", 2, "died", 2)
    if pool.backend == "local":
        assert "killed by SIGKILL" in kill.error
        assert "exit code 3" in exit_.error
    results, _ = run(pool, tasks.square, [1, 2], "after-died")
    assert all(r.status == "ok" for r in results)


def test_waiting_does_not_spin(pool):
    """poll() sleeps in the OS while tasks run: a busy loop would burn about as much CPU as wall time."""
    collect(pool, [])
    pool.submit("nap", tasks.sleep, 1.5)
    wall, cpu = time.monotonic(), time.process_time()
    collect(pool, ["nap"])
    wall, cpu = time.monotonic() - wall, time.process_time() - cpu
    assert wall >= 1.5 and cpu < 0.2 * wall


def test_timeout_kills_and_replaces_the_worker(pool):
    pool.submit("sleepy", tasks.sleep, 60)
    pool.submit("next", tasks.square, 5)
    results, events = collect(pool, ["sleepy", "next"])
    r = results["sleepy"]
    assert r.status == "timeout" and r.value is None
    assert f"candidate_timeout={TIMEOUT:g}" in r.error and "killed" in r.error
    assert TIMEOUT <= r.seconds < TIMEOUT + 30
    [pid] = [e.data["pid"] for e in events if e.task_id == "sleepy"]
    assert wait_gone([pid])
    assert results["next"].status == "ok" and results["next"].value["y"] == 25


def test_init_failure_is_reported(backend):
    s = make_scheduler(backend, "cpu", init_fn=tasks.failing_init, init_args=("no such dataset",))
    try:
        s.submit("t", tasks.square, 1)
        r = collect(s, ["t"])[0]["t"]
        assert r.status == "error"
        assert "init_fn failed" in r.error and "OSError: no such dataset" in r.error
        with pytest.raises(RuntimeError, match="no worker is left"):
            s.submit("u", tasks.square, 1)
    finally:
        assert s.shutdown() == []


def test_shutdown_with_tasks_in_flight(backend):
    before = worker_children()
    s = make_scheduler(backend, "cpu:2")
    s.submit("stubborn", tasks.sleep, 60)          # ignores should_stop
    s.submit("polite", tasks.wait_for_stop, 60)    # returns when asked to stop
    s.submit("waiting", tasks.square, 1)           # never gets a worker
    pids = {}
    end = time.monotonic() + WAIT_LIMIT
    while len(pids) < 2:
        assert time.monotonic() < end
        pids.update((e.task_id, e.data["pid"]) for e in s.poll(1.0) if isinstance(e, Event))
    assert set(s.running()) == {"stubborn", "polite"} and s.queued() == ["waiting"]

    t0 = time.monotonic()
    unfinished = s.shutdown(graceful=True, wait=1.0)
    assert sorted(unfinished) == ["stubborn", "waiting"]
    assert time.monotonic() - t0 < 15
    [polite] = s.poll()                             # its result came in during shutdown
    assert polite.task_id == "polite" and polite.status == "ok" and polite.value["stopped"] is True
    assert worker_children() <= before
    assert wait_gone(pids.values(), limit=0 if backend == "local" else 30)
    assert s.shutdown() == [] and s.free_slots() == 0 and s.running() == {}
    with pytest.raises(RuntimeError, match="shut down"):
        s.submit("late", tasks.square, 1)


SCRIPT = textwrap.dedent("""
    import sys
    from xmcnas_fast.scheduler import Event, make_scheduler
    import _sched_tasks as tasks

    if __name__ == "__main__":
        s = make_scheduler("local", "cpu:2")
        try:
            s.submit("a", tasks.wait_for_stop, 120)
            s.submit("b", tasks.wait_for_stop, 120)
            pids = set()
            while len(pids) < 2:
                pids.update(e.data["pid"] for e in s.poll(1.0) if isinstance(e, Event))
            print("PIDS", *pids, flush=True)
            while True:
                s.poll(1.0)
        except KeyboardInterrupt:
            unfinished = s.shutdown(wait=10)
            done = sorted((r.task_id, r.status, r.value["stopped"]) for r in s.poll())
            print("INTERRUPTED", unfinished, done, flush=True)
""")


@pytest.mark.parametrize("how", ["ctrl-c", "parent-killed"])
def test_no_orphans(tmp_path, how):
    """Ctrl-C reaches the whole process group: workers ignore it, the parent shuts them down.
    A parent killed outright: its workers notice and exit by themselves."""
    script = tmp_path / "main.py"
    script.write_text(SCRIPT)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), str(ROOT / "tests")]))
    proc = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env, start_new_session=True)
    try:
        line = proc.stdout.readline()
        assert line.startswith("PIDS"), line + proc.stderr.read()
        pids = [int(p) for p in line.split()[1:]]
        if how == "ctrl-c":
            os.killpg(proc.pid, signal.SIGINT)
            out, err = proc.communicate(timeout=60)
            assert "INTERRUPTED [] [('a', 'ok', True), ('b', 'ok', True)]" in out, out + err
        else:
            proc.kill()
            proc.wait(timeout=60)
        end = time.monotonic() + 30
        while any(alive(pid) for pid in pids) and time.monotonic() < end:
            time.sleep(0.1)
        assert not any(alive(pid) for pid in pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def test_ray_backend_without_ray():
    try:
        import ray  # noqa: F401
    except ImportError:
        with pytest.raises(ImportError, match=r"pip install 'xmcnas-fast\[ray\]'"):
            make_scheduler("ray", "cpu")
    else:
        pytest.skip("ray is installed")


@pytest.mark.cuda
def test_cuda_workers_use_their_device():
    s = make_scheduler("local", "cuda")
    try:
        results, _ = run(s, tasks.cuda_info, [None] * (2 * len(s.devices)), "cuda")
        for r in results:
            assert r.status == "ok", r.error
            assert r.value["device"] == r.device == r.value["tensor_device"]
            assert r.value["current"] == int(r.device.split(":")[1])
        assert not torch.cuda.is_initialized()  # no CUDA context in the main process
    finally:
        s.shutdown()
