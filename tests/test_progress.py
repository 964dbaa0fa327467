"""The search display: plain one-line events off a terminal, a live panel on one."""
import io

from rich.console import Console

from xmcnas_fast.progress import SearchProgress


def feed(p):
    p.started(0, "cpu#0", "1:conv3<0 [sum]")
    p.progress(0, "cpu#0", {"epoch": 1, "step": 100, "valid_p5": 0.31})
    p.started(1, "cpu#1", "1:bilstm<0 [sum]")
    p.finished(0, "cpu#0", "ok", 0.3125, 12.0, "1:conv3<0 [sum]", population=[0.3125])
    p.finished(1, "cpu#1", "timeout", None, 60.0, "1:bilstm<0 [sum]", population=[0.3125, None])


def test_plain_lines_when_not_a_terminal():
    out = io.StringIO()
    with SearchProgress(4, ["cpu#0", "cpu#1"], console=Console(file=out, width=200), live=False) as p:
        feed(p)
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert "start  #0 on cpu#0" in lines[0]
    assert "done   #0 [1/4] P@5 31.25" in lines[2]
    assert "TIMEOUT" in lines[3]


def test_live_panel_shows_workers_best_and_events():
    out = io.StringIO()
    console = Console(file=out, width=160, force_terminal=True, color_system=None)
    with SearchProgress(4, ["cpu#0", "cpu#1"], console=console, live=True) as p:
        feed(p)
        text = Console(file=io.StringIO(), width=160, record=True)
        text.print(p._render())
        panel = text.export_text()
    assert "cpu#0" in panel and "cpu#1" in panel and "idle" in panel
    assert "31.25" in panel and "#0 1:conv3<0" in panel        # the best so far
    assert "2/4" in panel                                        # the progress bar over candidates
    assert "TIMEOUT" in panel                                    # the last events


def test_quiet_prints_nothing():
    out = io.StringIO()
    with SearchProgress(2, ["cpu"], console=Console(file=out), live=False, quiet=True) as p:
        feed(p)
    assert out.getvalue() == ""
