"""The search end to end on a slice of debtags, with weight inheritance, short runs first and the
final model: history, best bundle, resume after a kill -9."""
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest

from xmcnas_fast.cli import main
from xmcnas_fast.runs import JsonLog, Run, RunError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = ["--population", "3", "--cycles", "4", "--sample", "2", "--max-depth", "3",
        "--max-steps", "4", "--eval-every", "2", "--width", "8", "--emb-dim", "8", "--fc", "8",
        "--max-len", "24", "--valid", "60", "--backend", "inline", "--devices", "cpu", "--plain",
        "--inherit-weights", "--fidelity", "2", "--final-width", "16"]


def search_cli(base, data, name, *extra):
    """Start `xmcnas-fast search` on `data` with runs and cache under `base`: a new TINY search called
    `name`, or (name None) one with only the arguments `extra`."""
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "XMCNAS_CACHE": str(base / "cache")}
    args = [sys.executable, "-m", "xmcnas_fast.cli", "search", "--dataset", data, "--runs-dir", str(base / "runs")]
    args += list(extra) if name is None else ["--name", name, *TINY, *extra]
    return subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=base)


def candidates(run_dir):
    return JsonLog(os.path.join(run_dir, "history.jsonl")).records


@pytest.fixture(scope="module")
def finished(tmp_path_factory, debtags_slice):
    """One TINY search run to its end: (run directory, its history, what it printed)."""
    base = tmp_path_factory.mktemp("search")
    p = search_cli(base, debtags_slice, "full")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    run_dir = base / "runs" / "full"
    return run_dir, candidates(run_dir), out


def test_every_candidate_is_recorded_once(finished):
    _, recs, _ = finished
    assert len(recs) == 7 and len({r["id"] for r in recs}) == 7


def test_no_network_is_trained_twice(finished):
    _, recs, _ = finished
    trained = [r for r in recs if r["reused_from"] is None]
    assert len({r["hash"] for r in trained}) == len(trained)


def test_each_record_holds_its_metrics_and_layer_weights(finished):
    run_dir, recs, _ = finished
    lexical = json.loads((run_dir / "lexical.json").read_text())
    for r in recs:
        assert r["status"] == "ok", r
        assert 0 <= r["fitness"] <= 1 and r["fused"]["valid"]["P@5"] == r["fitness"]
        # the fusion is chosen on validation, over a grid that holds each model alone
        assert r["fitness"] >= r["valid"]["P@5"] and r["fitness"] >= lexical["valid"]["P@5"] - 1e-12
        assert set(r["test"]) >= {"P@1", "P@3", "P@5", "nDCG@1", "nDCG@3", "nDCG@5", "PSP@1", "PSP@3", "PSP@5"}
        assert len(r["layer_weights"]) == r["depth"] and r["params"] > 0


def test_the_population_is_random_then_every_child_has_a_parent(finished):
    _, recs, _ = finished
    assert all(r["parent"] is None and r["stands_in_for"] is None for r in recs[:3])
    # one worker: no child is ever replaced by a random stand-in
    assert all(r["parent"] is not None and r["stands_in_for"] is None for r in recs[3:])


def test_best_json_names_the_final_model_and_only_the_best_bundles_are_kept(finished):
    run_dir, recs, _ = finished
    best = json.loads((run_dir / "best.json").read_text())
    final = json.loads((run_dir / "final.json").read_text())
    ensemble = json.loads((run_dir / "ensemble.json").read_text())
    # the ensemble step tried the final model with the kept candidates; kept only on a 0.2-point gain
    assert ensemble["tried"][0] == "final" and ensemble["members"][0] == "final" and len(ensemble["tried"]) > 1
    assert ensemble["chosen"] == (len(ensemble["members"]) > 1)
    assert ensemble["chosen"] == (ensemble["fitness"] >= ensemble["fitness_alone"] + 0.002)
    assert ensemble["fitness_alone"] == pytest.approx(final["fused"]["valid"]["P@5"])
    if ensemble["chosen"]:
        assert best["id"] == "ensemble" and best["model_dir"] == str(run_dir / "models" / "ensemble")
        return
    assert best["id"] == final["id"] == "final" and best["model_dir"] == str(run_dir / "models" / "final")
    assert os.path.isfile(os.path.join(best["model_dir"], "weights.pt"))
    promoted = [r for r in recs if r["rung"] == 1]
    assert final["of"] == max(promoted or recs, key=lambda r: r["fitness"])["id"]   # full-budget figures first
    assert final["settings"]["model"]["width"] == 16 and final["status"] == "ok" and final["chosen"]
    # it starts from the candidate's weights where the networks agree: the embedding (8 wide in both)
    assert final["inherited"] == {"from": final["of"], "parts": ["embedding"]}
    # kept: the 3 best, the population (3: they may be parents) and the final model
    assert len(os.listdir(run_dir / "models")) <= 3 + 3 + 1


def test_children_record_what_they_inherited_and_short_runs_their_budget(finished):
    _, recs, _ = finished
    by_id = {r["id"]: r for r in recs}
    for r in recs:
        assert r["short"]["steps"] == 2 and r["rung"] == int(r["short"]["promoted"])
        assert r["steps"] == (4 if r["rung"] else 2)
        assert r["fitness"] == (r["fused"]["valid"]["P@5"] if r["rung"] else r["short"]["P@5"])
    children = [r for r in recs if r["parent"] is not None]
    assert children and all(r["inherited"]["from"] == r["parent"] for r in children)
    assert all("embedding" in r["inherited"]["parts"] for r in children)     # the parent was kept to inherit from
    assert all("inherited" not in r for r in recs if r["parent"] is None)
    for r in children:
        if r["steps_to_parent"] is not None:
            assert [row[-1] for row in r["curve"] if row[0] == r["steps_to_parent"]][0] >= by_id[r["parent"]]["fitness"]


def test_the_summary_draws_the_best_architecture_and_shows_both_models(finished):
    _, _, out = finished
    assert "best architecture" in out and "0 embedding" in out
    assert "(search)" in out and "final, width 16" in out and "training the best architecture" in out
    # fused with the lexical stage: the result, its network alone and the stage alone, each a row
    assert "fused with the lexical stage" in out and "its network alone" in out and "lexical stage alone" in out
    assert "test figures with the lexical stage are its serving stage's" in out


def test_the_best_bundle_serves_the_fused_model(finished):
    import numpy as np

    from xmcnas_fast.bundle import load_bundle
    from xmcnas_fast.lexical import LexicalStage

    run_dir, _, _ = finished
    best = json.loads((run_dir / "best.json").read_text())
    result = json.loads((run_dir / ("ensemble.json" if best["id"] == "ensemble" else "final.json")).read_text())
    b = load_bundle(best["model_dir"])
    assert b.lexical is not None and b.fusion.to_dict() == result["fused"]["fusion"]
    assert b.lexical.folder == os.path.join(best["model_dir"], "lexical")
    # it carries the serving stage (fitted on every training document: it has no validation lists), whose
    # test lists the result was tested with; the search's own stage chose the fusion
    lexical = json.loads((run_dir / "lexical.json").read_text())
    assert lexical["serving"] != lexical["folder"] and "selection_test" in lexical
    with open(os.path.join(b.lexical.folder, "lexical.json")) as f:
        assert list(json.load(f)["splits"]) == ["test"]
    assert np.array_equal(b.lexical.split_topk("test")[0], LexicalStage.load(lexical["serving"]).split_topk("test")[0])


@pytest.mark.parametrize("min_gain", [-1.0, 1.0])
def test_the_ensemble_step_keeps_an_ensemble_only_on_its_gain_and_once(finished, tmp_path, min_gain, monkeypatch,
                                                                      capsys):
    """Run again on a copy of the finished run: with a gain every network reaches (-1) the ensemble takes
    3 members, is saved whole and becomes the result; with one none reaches (1) the final model stays."""
    from xmcnas_fast.bundle import load_bundle
    from xmcnas_fast.ensemble import Ensemble, run_ensemble
    from xmcnas_fast.search import _Silent, load_data

    run_dir, _, _ = finished
    copy = tmp_path / "run"
    shutil.copytree(run_dir, copy, ignore=shutil.ignore_patterns("ensemble", "ensemble.json", ".lock"))
    cfg = json.loads((copy / "config.json").read_text())
    cfg["final"]["ensemble_min_gain"] = min_gain
    (copy / "config.json").write_text(json.dumps(cfg))
    (copy / "best.json").write_text((run_dir / "final.json").read_text())
    monkeypatch.setenv("XMCNAS_CACHE", str(run_dir.parent.parent / "cache"))
    run = Run.open(str(copy))
    rec = run_ensemble(run, load_data(cfg["data"]), {**run.lexical(), "residual": False}, _Silent())
    best = run.best()
    if min_gain > 0:
        assert rec["members"] == ["final"] and not rec["chosen"] and best["id"] == "final"
        assert not (copy / "models" / "ensemble").exists()
        return
    assert rec["chosen"] and len(rec["members"]) == 3 and rec["members"][0] == "final"
    assert best["id"] == "ensemble" and best["model_dir"] == str(copy / "models" / "ensemble")
    b = load_bundle(best["model_dir"])
    assert isinstance(b.model, Ensemble) and len(b.model.members) == 3 and b.lexical is not None
    assert b.fusion.to_dict() == rec["fused"]["fusion"]
    assert set(rec["fused"]["test"]) >= {"P@1", "P@5"} and rec["fused"]["valid"]["P@5"] == rec["fitness"]
    assert main(["evaluate", best["model_dir"]]) == 0                 # a column for the 3 networks, one fused
    table = capsys.readouterr().out
    assert "3 networks" in table and "fused (served)" in table and "lexical" in table
    # once: a resumed search finds the record and only points best.json at it again
    (copy / "best.json").write_text((run_dir / "final.json").read_text())
    assert run_ensemble(run, None, {**run.lexical(), "residual": False}, _Silent()) == rec
    assert run.best()["id"] == "ensemble"


def test_the_best_bundle_labels_raw_text(finished):
    from xmcnas_fast.bundle import load_bundle

    run_dir, _, _ = finished
    b = load_bundle(json.loads((run_dir / "best.json").read_text())["model_dir"])
    preds = b.predict(["a command line tool written in c to edit text files"], k=3)
    assert len(preds[0]) == 3 and all(name in b.label_names for name, _ in preds[0])


def test_analysis_of_the_run_draws_its_graphs(finished, capsys):
    run_dir, _, _ = finished
    assert main(["analyze", str(run_dir)]) == 0
    assert "fused with the lexical stage (the network alone:" in capsys.readouterr().out
    assert any(f.endswith(".dot") for f in os.listdir(run_dir / "analysis"))


def test_analysis_without_matplotlib_names_the_extra_to_install(finished, tmp_path, capsys, monkeypatch):
    run_dir, _, _ = finished
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    assert main(["analyze", str(run_dir), "--out", str(tmp_path / "no-plots")]) == 0
    assert "pip install 'xmcnas-fast[plot]'" in capsys.readouterr().out    # the brackets survive Rich markup


def test_kill_9_at_a_random_moment_then_resume_gives_the_same_candidates(tmp_path, debtags_slice, finished):
    expected = sorted(r["hash"] for r in finished[1])      # the same search, run without a stop

    p = search_cli(tmp_path, debtags_slice, "killed")
    run_dir = tmp_path / "runs" / "killed"
    rng = random.Random(int(time.time()))
    target = rng.randint(1, 4)   # kill once `target` candidates are recorded, at a random moment after
    # (a TINY candidate takes a few tens of milliseconds: the moment is drawn within about one)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if (run_dir / "history.jsonl").exists() and len(candidates(run_dir)) >= target:
            break
        time.sleep(0.01)
    time.sleep(rng.uniform(0, 0.02))
    p.send_signal(signal.SIGKILL)
    p.wait()
    before = len(candidates(run_dir))
    assert 1 <= before < 7, "the kill must land mid-search"

    r = search_cli(tmp_path, debtags_slice, None, "--resume", str(run_dir), "--plain")
    out, _ = r.communicate(timeout=600)
    assert r.returncode == 0, out
    recs = candidates(run_dir)
    assert len(recs) == 7 and len({x["id"] for x in recs}) == 7      # none lost, none counted twice
    assert sorted(x["hash"] for x in recs) == expected
    assert [x.get("inherited") for x in recs] == [x.get("inherited") for x in finished[1]]
    assert [x["rung"] for x in recs] == [x["rung"] for x in finished[1]]
    final = json.loads((run_dir / "final.json").read_text())
    assert final["of"] == json.loads((finished[0] / "final.json").read_text())["of"]
    assert json.loads((run_dir / "best.json").read_text())["model_dir"] == str(run_dir / "models" / "final")


def test_kill_9_during_the_final_training_then_resume_trains_it_once(tmp_path, debtags_slice):
    p = search_cli(tmp_path, debtags_slice, "killed", "--final-epochs", "50")
    run_dir = tmp_path / "runs" / "killed"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if (run_dir / "history.jsonl").exists() and len(candidates(run_dir)) == 7:
            break
        time.sleep(0.01)
    time.sleep(0.5)
    p.send_signal(signal.SIGKILL)
    p.wait()
    assert not (run_dir / "final.json").exists(), "the kill must land in the final training"
    r = search_cli(tmp_path, debtags_slice, None, "--resume", str(run_dir), "--plain")
    out, _ = r.communicate(timeout=600)
    assert r.returncode == 0, out
    assert len(candidates(run_dir)) == 7 and out.count("training the best architecture") == 1
    final = json.loads((run_dir / "final.json").read_text())
    assert final["status"] == "ok"
    # the result is the final model where it does at least as well as the candidate it retrains (how
    # well each does on this slice varies with torch's build), else that candidate
    assert json.loads((run_dir / "best.json").read_text())["id"] == ("final" if final["chosen"] else final["of"])


def test_once_only_the_final_share_of_the_time_is_left_no_candidate_starts_and_resume_agrees(tmp_path, debtags_slice):
    # the deadline is minute 0.5 - 0.5 = 0: once one candidate is recorded (one at a time inline), none starts
    p = search_cli(tmp_path, debtags_slice, "late", "--total-minutes", "0.5", "--final-min-minutes", "0.5",
                   "--final-epochs", "1")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    run_dir = tmp_path / "runs" / "late"
    recs = candidates(run_dir)
    final = json.loads((run_dir / "final.json").read_text())
    assert len(recs) == 1 and final["candidates"] == 1 and final["of"] == recs[0]["id"] and final["status"] == "ok"
    assert final["settings"]["train"]["max_minutes"] == 0.5               # its guaranteed share
    assert "the search's time is up" in out and "time was up after 1 of 7 candidates" in out
    assert json.loads((run_dir / "closed.json").read_text())["candidates"] == 1
    r = search_cli(tmp_path, debtags_slice, None, "--resume", str(run_dir), "--plain")
    again, _ = r.communicate(timeout=600)
    assert r.returncode == 0, again
    assert len(candidates(run_dir)) == 1 and "training the best architecture" not in again


def test_resume_refuses_new_settings_and_a_second_search_in_one_directory(tmp_path):
    run = Run.create(str(tmp_path / "r"), {"x": 1})
    run.lock()
    with pytest.raises(RunError):
        Run.create(str(tmp_path / "r"), {"x": 1})
    with pytest.raises(RunError, match="in use"):
        Run.open(str(tmp_path / "r")).lock()
    run.unlock()
    Run.open(str(tmp_path / "r")).lock().unlock()
    assert main(["search", "--resume", str(tmp_path / "r"), "--population", "5"]) == 2


def test_torn_last_line_is_dropped(tmp_path):
    log = JsonLog(str(tmp_path / "h.jsonl"))
    log.append({"id": 0})
    log.append({"id": 1})
    with open(tmp_path / "h.jsonl", "a") as f:
        f.write('{"id": 2, "sta')                      # killed mid-write
    again = JsonLog(str(tmp_path / "h.jsonl"))
    assert [r["id"] for r in again.records] == [0, 1]
    again.append({"id": 2})
    assert [r["id"] for r in JsonLog(str(tmp_path / "h.jsonl")).records] == [0, 1, 2]


def test_a_search_judged_by_the_network_alone_still_serves_the_fused_model(tmp_path, debtags_slice):
    from xmcnas_fast.bundle import load_bundle

    p = search_cli(tmp_path, debtags_slice, "by-network", "--lexical-fitness", "network")
    out, _ = p.communicate(timeout=600)
    assert p.returncode == 0, out
    run = Run.open(str(tmp_path / "runs" / "by-network"))
    assert run.config["lexical"]["fitness"] == "network"
    recs = [r for r in run.history.records if r["fitness"] is not None]
    assert len(recs) >= 5
    for r in [*recs, run.final()]:
        assert r["judge"] == "network" and r["fitness"] == r["valid"]["P@5"] and r["fused"]["valid"]["P@5"] > 0
    best = load_bundle(run.best()["model_dir"])
    assert best.lexical is not None and best.fusion is not None      # the result is still the fused model


def test_ctrl_c_stops_cleanly_and_resume_finishes(tmp_path, debtags_slice):
    p = search_cli(tmp_path, debtags_slice, "interrupted")
    run_dir = tmp_path / "runs" / "interrupted"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and p.poll() is None:
        if (run_dir / "history.jsonl").exists() and candidates(run_dir):
            break
        time.sleep(0.01)
    p.send_signal(signal.SIGINT)
    out, _ = p.communicate(timeout=120)
    assert p.returncode == 130, out
    assert f"--resume {run_dir}" in out
    assert not (run_dir / ".lock").exists() or Run.open(str(run_dir)).lock()  # the directory is free again
    r = search_cli(tmp_path, debtags_slice, None, "--resume", str(run_dir), "--plain")
    out, _ = r.communicate(timeout=600)
    assert r.returncode == 0, out
    recs = candidates(run_dir)
    assert len(recs) == 7 and len({x["id"] for x in recs}) == 7
