"""Helpers for the scheduler's tests: wait for results, check that processes are gone."""
import time
from pathlib import Path

from xmcnas_fast.scheduler import Event, TaskResult

WAIT_LIMIT = 90.0    # a test that waits longer than this for its results has hung


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
