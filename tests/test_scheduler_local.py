"""Local worker processes and the world outside: no orphans after Ctrl-C or a killed parent;
CUDA workers on their own device, one or several per GPU."""
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

import _sched_tasks as tasks
from _sched_helpers import run, wait_gone
from xmcnas_fast.scheduler import make_scheduler

ROOT = Path(__file__).resolve().parent.parent


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
        assert wait_gone(pids)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


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


@pytest.mark.cuda
def test_several_workers_share_one_gpu():
    s = make_scheduler("local", "cuda:0x2")
    try:
        assert s.devices == ["cuda:0#0", "cuda:0#1"]
        results, _ = run(s, tasks.cuda_info, [None] * 4, "shared-gpu")
        for r in results:
            assert r.status == "ok", r.error
            assert r.device in s.devices
            assert r.value["device"] == r.value["tensor_device"] == "cuda:0" and r.value["current"] == 0
        assert len({r.value["pid"] for r in results}) == 2   # a process each
        assert not torch.cuda.is_initialized()
    finally:
        s.shutdown()
