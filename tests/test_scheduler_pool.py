"""The pool's logic (slots, dispatch, retries, timeouts, replacing workers) through a
transport simulated in this process: device names such as cuda:0 are only labels here,
so several slots on one GPU are tested without a GPU."""
import itertools
import pickle
import time

import pytest

import _sched_helpers as helpers
import _sched_tasks as tasks
from xmcnas_fast.scheduler.devices import worker_specs
from xmcnas_fast.scheduler.pool import MAX_EARLY_DEATHS, PoolScheduler

PIDS = itertools.count(1000)


class FakeWorker:
    def __init__(self):
        self.pid = next(PIDS)
        self.inbox = []


class FakePool(PoolScheduler):
    """Each _receive lets every worker do one thing: get ready, or handle one task. The
    payload of tasks.square says what the worker does: a number is squared; "die" ends the
    worker; "die-once" ends it on the first attempt; "hang" never answers."""

    backend = "fake"

    def __init__(self, specs, retries_on_death=1, *, early_deaths=None, init_fails=()):
        super().__init__(specs, retries_on_death)
        self.spawned, self.killed = [], []
        self.early_deaths = dict(early_deaths or {})  # label -> how many of its spawns die before ready
        self.init_fails = set(init_fails)         # labels whose init_fn fails
        for slot in self._slots:
            self._spawn(slot)

    def _spawn(self, slot):
        slot.transport, slot.state = FakeWorker(), "starting"
        slot.pid = slot.transport.pid
        self.spawned.append((slot.spec.label, slot.pid))

    def _send_task(self, slot):
        slot.transport.inbox.append(slot.task)
        slot.started = time.monotonic()

    def _kill(self, slot):
        self.killed.append(slot.transport.pid)
        slot.transport = None
        return "killed by the test"

    def shutdown(self, graceful=True, wait=5.0):
        self._begin_shutdown()
        for slot in self._slots:
            slot.transport = None
        return self._end_shutdown()

    def _die(self, slot, how):
        slot.transport = None
        self._on_death(slot, how)

    def _receive(self, timeout):
        for slot in self._slots:
            worker = slot.transport
            if worker is None:
                continue
            if slot.state == "starting":
                if self.early_deaths.get(slot.spec.label):
                    self.early_deaths[slot.spec.label] -= 1
                    self._die(slot, "exit code 1")
                elif slot.spec.label in self.init_fails:
                    slot.transport = None
                    self._on_init_error(slot, "OSError: no such dataset")
                else:
                    self._on_ready(slot, worker.pid)
            elif worker.inbox:
                self._work(slot, worker, worker.inbox.pop(0))
        time.sleep(min(timeout or 0.0, 0.01))

    def _work(self, slot, worker, task):
        _, what = pickle.loads(task.blob)
        if what == "die" or (what == "die-once" and task.attempts == 1):
            self._die(slot, "killed by SIGKILL")
        elif what != "hang":
            value = {"y": what * what if isinstance(what, int) else what, "pid": worker.pid,
                     "device": slot.spec.device}
            self._on_event(slot, task.task_id, {"step": 1}, time.time())
            self._on_result(slot, task.task_id, "ok", pickle.dumps(value), None, 0.0)


def specs(devices, timeout=None, gpus=1):
    return worker_specs(devices, None, (), timeout, 0.1, gpu_count=lambda: gpus, cores=8)


def run(pool, payloads, prefix):
    """What the simulated workers do with each payload: see FakePool."""
    return helpers.run(pool, tasks.square, payloads, prefix)[0]


def collect(pool, ids):
    return helpers.collect(pool, ids, limit=10.0)[0]


def pids_by_label(pool):
    return dict(pool.worker_pids())


def test_several_slots_on_one_gpu_each_take_a_task():
    pool = FakePool(specs("cuda:0x3"))
    assert pool.devices == ["cuda:0#0", "cuda:0#1", "cuda:0#2"] and pool.free_slots() == 3
    for i in range(3):
        pool.submit(f"t{i}", tasks.square, i)
    assert pool.free_slots() == 0 and sorted(pool.running().values()) == pool.devices
    pool.submit("t3", tasks.square, 3)
    assert pool.queued() == ["t3"]
    results = collect(pool, ["t0", "t1", "t2", "t3"])
    assert [results[f"t{i}"].value["y"] for i in range(4)] == [0, 1, 4, 9]
    assert {r.device for r in results.values()} == set(pool.devices)
    assert {r.value["device"] for r in results.values()} == {"cuda:0"}
    assert pool.free_slots() == 3 and pool.shutdown() == []


def test_a_dead_worker_is_replaced_and_its_task_run_again():
    pool = FakePool(specs("cuda:0x2,cuda:1", gpus=2))
    collect(pool, [])
    pool.submit("once", tasks.square, "die-once")
    before = pids_by_label(pool)
    r = collect(pool, ["once"])["once"]
    assert (r.status, r.attempts) == ("ok", 2)
    after = pids_by_label(pool)
    replaced = [label for label in after if after[label] != before[label]]
    assert len(replaced) == 1 and len(pool.spawned) == 4
    assert all(r.status == "ok" for r in run(pool, [1, 2, 3], "after"))


@pytest.mark.parametrize("retries", [0, 1, 2])
def test_a_task_that_kills_every_worker_is_died_after_its_retries(retries):
    pool = FakePool(specs("cuda:0x2"), retries)
    pool.submit("deadly", tasks.square, "die")
    pool.submit("fine", tasks.square, 5)
    results = collect(pool, ["deadly", "fine"])
    r = results["deadly"]
    assert (r.status, r.attempts, r.value) == ("died", retries + 1, None)
    assert "on cuda:0#" in r.error and "killed by SIGKILL" in r.error and "no retries left" in r.error
    assert results["fine"].status == "ok" and results["fine"].value["y"] == 25
    assert len(pool.spawned) == 2 + retries + 1           # every dead worker replaced
    assert pool.free_slots() == 2


def test_a_timeout_kills_the_worker_and_the_slot_goes_on():
    pool = FakePool(specs("cuda:0x2", timeout=0.05))
    pool.submit("stuck", tasks.square, "hang")
    pool.submit("quick", tasks.square, 3)
    results = collect(pool, ["stuck", "quick"])
    r = results["stuck"]
    assert r.status == "timeout" and "candidate_timeout=0.05" in r.error and "killed by the test" in r.error
    assert len(pool.killed) == 1 and len(pool.spawned) == 3
    assert r.device in pool.devices and pool.killed[0] not in pids_by_label(pool).values()
    [again] = run(pool, [4], "again")
    assert again.status == "ok" and again.value["y"] == 16


def test_a_worker_that_keeps_dying_before_it_is_ready_is_given_up():
    pool = FakePool(specs("cuda:0x2"), early_deaths={"cuda:0#1": MAX_EARLY_DEATHS})
    results = run(pool, [2, 3, 4], "t")
    assert all(r.status == "ok" and r.device == "cuda:0#0" for r in results)
    assert pool.free_slots() == 1 and list(pool.worker_pids()) == ["cuda:0#0"]   # cuda:0#1 retired
    assert [label for label, _ in pool.spawned].count("cuda:0#1") == MAX_EARLY_DEATHS


def test_no_worker_left_fails_the_queue_with_the_reason():
    pool = FakePool(specs("cuda:0x2"), init_fails={"cuda:0#0", "cuda:0#1"})
    pool.submit("t", tasks.square, 1)
    r = collect(pool, ["t"])["t"]
    assert r.status == "error" and "init_fn failed in the worker on cuda:0#0" in r.error
    with pytest.raises(RuntimeError, match="no worker is left"):
        pool.submit("u", tasks.square, 1)


def test_an_init_failure_leaves_the_other_slots_on_the_gpu_working():
    pool = FakePool(specs("cuda:0x3"), init_fails={"cuda:0#1"})
    results = run(pool, list(range(5)), "t")
    assert all(r.status == "ok" for r in results)
    assert {r.device for r in results} == {"cuda:0#0", "cuda:0#2"}
    assert set(pool.worker_pids()) == {"cuda:0#0", "cuda:0#2"}
