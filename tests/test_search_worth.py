"""The evolution-against-random benchmark on a tiny budget: every arm and seed is a real search, the
table's figures are those the runs recorded, and the verdict says when seeds are too few."""
import importlib.util
import json
import os

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def worth():
    spec = importlib.util.spec_from_file_location("search_worth", os.path.join(ROOT, "benchmarks", "search_worth.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


TINY = ["search.population=2", "search.cycles=1", "search.sample=2", "search.max_depth=2", "train.max_steps=4",
        "train.eval_every=2", "train.max_len=24", "model.width=8", "model.emb_dim=8", "model.fc=[8]",
        "data.max_len=24", "data.valid=60", "final.width=8", "final.emb_dim=8", "final.fc=[8]", "final.max_steps=4"]


def test_two_arms_two_seeds_report_what_their_runs_recorded(worth, debtags_slice, tmp_path, capsys):
    out = tmp_path / "worth.json"
    args = ["--arms", "evolution,random", "--seeds", "0", "1", "--dataset", debtags_slice, "--backend", "inline",
            "--devices", "cpu", "--runs-dir", str(tmp_path / "runs"), "--out", str(out)]
    for s in TINY:
        args += ["--set", s]
    assert worth.main(args) == 0
    printed = capsys.readouterr().out
    saved = json.loads(out.read_text())
    assert [(r["arm"], r["seed"]) for r in saved["results"]] == [("evolution", 0), ("random", 0),
                                                                ("evolution", 1), ("random", 1)]
    from xmcnas_fast.runs import Run

    for r in saved["results"]:
        run = Run.open(r["run"])
        assert run.config["search"]["strategy"] == r["arm"] and run.config["search"]["seed"] == r["seed"]
        assert r["best valid P@5"] == max(h["fitness"] for h in run.history.records)
        assert r["final test P@5"] == run.final()["fused"]["test"]["P@5"]     # the served model's: fused
        assert r["lexical test P@1"] == run.lexical()["test"]["P@1"]
        if run.final()["chosen"]:
            assert r["result network test P@1"] == run.final()["test"]["P@1"]
    evo = [r["best valid P@5"] for r in saved["results"] if r["arm"] == "evolution"]
    mean, sd = saved["summary"]["evolution"]["best valid P@5"]
    assert mean == pytest.approx(sum(evo) / 2)
    assert f"| evolution | 2 | {100 * mean:.2f} ± {100 * sd:.2f} |" in printed
    assert "best valid P@5: evolution - random = " in printed


def test_the_verdict_needs_two_seeds_and_names_the_noise(worth):
    rows = [{"arm": a, "x": x} for a, x in [("e", 0.30), ("e", 0.32), ("r", 0.29), ("r", 0.31)]]
    assert "within the noise" in worth.verdict(rows, "e", "r", "x")
    far = [{"arm": a, "x": x} for a, x in [("e", 0.40), ("e", 0.41), ("r", 0.29), ("r", 0.30)]]
    assert "e is ahead beyond the noise" in worth.verdict(far, "e", "r", "x")
    assert "too few seeds" in worth.verdict(rows[:1] + rows[2:3], "e", "r", "x")
    with pytest.raises(SystemExit):
        worth.parse_set(["cycles=4"])
