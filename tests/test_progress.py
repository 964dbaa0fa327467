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


def test_eta_from_finished_durations_and_workers_in_flight():
    from xmcnas_fast.progress import eta_seconds

    assert eta_seconds([], [5.0], 16, 2) is None                    # nothing finished: no estimate
    # 2 of 16 done in 60 s each, 2 workers that just started the next two: 7 rounds of 60 s
    assert eta_seconds([60.0, 60.0], [0.0, 0.0], 14, 2) == 420.0
    # 14 done; the last two have run 39 s of their expected 45: 6 s left, not 45
    assert eta_seconds([30.0, 60.0], [39.0, 39.0], 2, 2) == 6.0
    # one worker: the running one's rest, then each queued one after the other
    assert eta_seconds([10.0], [4.0], 3, 1) == 26.0
    # a candidate running past the mean is expected any moment; the queue still counts
    assert eta_seconds([10.0], [25.0, 0.0], 3, 2) == 10.0      # the third starts on the first worker free
    assert eta_seconds([10.0], [], 0, 2) == 0.0


def test_panel_eta_uses_the_estimate(monkeypatch):
    import xmcnas_fast.progress as progress

    clock = [1000.0]
    monkeypatch.setattr(progress.time, "monotonic", lambda: clock[0])
    p = SearchProgress(16, ["cpu#0", "cpu#1"], console=Console(file=io.StringIO()), live=False)

    def panel():
        text = Console(file=io.StringIO(), width=120, record=True)
        text.print(p._render())
        return text.export_text()

    p.started(0, "cpu#0", "a")
    p.started(1, "cpu#1", "b")
    assert "ETA -:--:--" in panel()
    clock[0] += 60
    p.finished(0, "cpu#0", "ok", 0.3, 60.0, "a")
    p.finished(1, "cpu#1", "ok", 0.3, 60.0, "b")
    p.started(2, "cpu#0", "c")
    p.started(3, "cpu#1", "d")
    assert "2/16" in panel() and "ETA 0:07:00" in panel()
    clock[0] += 15
    assert "ETA 0:06:45" in panel()


def test_the_best_candidate_keeps_one_line_at_80_columns():
    label = "1:bilstm<0 2:maxpool3<1 3:bilstm<1 4:bigru<2"
    p = SearchProgress(4, ["cpu#0", "cpu#1"], console=Console(file=io.StringIO()), live=False)
    p.started(0, "cpu#0", label)
    p.finished(0, "cpu#0", "ok", 0.2518, 5.0, label, population=[0.2518])
    text = Console(file=io.StringIO(), width=80, record=True)
    text.print(p._render())
    assert any(f"best P@5 25.18  (#0 {label})" in line for line in text.export_text().splitlines())


def test_the_final_model_shows_on_its_worker_and_leaves_it_idle():
    p = SearchProgress(2, ["cpu#0", "cpu#1"], console=Console(file=io.StringIO()), live=False)
    p.started("final", "cpu#1", "(#3) 1:conv5<0")
    p.progress("final", "cpu#1", {"epoch": 2, "step": 700, "valid_p5": 0.39})

    def panel():
        text = Console(file=io.StringIO(), width=120, record=True)
        text.print(p._render())
        return text.export_text()

    assert "#final (#3) 1:conv5<0" in panel() and "39.00" in panel()
    p.ended("final", "cpu#1", "final model: ok")
    assert "#final (#3)" not in panel() and panel().count("idle") == 2 and "final model: ok" in panel()
    assert p.done == 0          # not one of the candidates
