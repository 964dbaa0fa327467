"""The scheduler's arguments, and the inline backend: tasks run in the caller's process."""
import os
import subprocess
import sys

import pytest

import _sched_tasks as tasks
from xmcnas_fast.scheduler import TaskResult, make_scheduler


def test_bad_arguments():
    with pytest.raises(ValueError, match="unknown backend"):
        make_scheduler("threads", "cpu")
    with pytest.raises(ValueError, match="candidate_timeout"):
        make_scheduler("inline", "cpu", candidate_timeout=0)
    with pytest.raises(ValueError, match="retries_on_death"):
        make_scheduler("inline", "cpu", retries_on_death=-1)
    with pytest.raises(TypeError, match="init_fn"):
        make_scheduler("local", "cpu", init_fn=lambda: None)


def test_ray_backend_without_ray(monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)   # as if it were not installed
    with pytest.raises(ImportError, match=r"pip install 'xmcnas-fast\[ray\]'"):
        make_scheduler("ray", "cpu")


def test_ray_is_imported_only_when_asked_for():
    code = ("import sys; from xmcnas_fast.scheduler import make_scheduler; "
            "make_scheduler('inline', 'cpu').shutdown(); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] == 'ray' or m.endswith('ray_backend')))")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": root}, check=True).stdout
    assert out.strip() == "[]"


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
