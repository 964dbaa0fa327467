"""Files written by the previous layouts are read by this one: a run (config version 1) and a bundle
(format 1) written by xmcnas-fast before where a training runs stopped being saved as a setting
(tests/fixtures/run-v1: a tiny search on 120 debtags texts, its best candidate's bundle kept)."""
import json
import os
import shutil

import pytest

from xmcnas_fast.bundle import FORMAT, load_bundle, migrate_bundle_config
from xmcnas_fast.config import CONFIG_VERSION, make_config, migrate, strategy_of
from xmcnas_fast.runs import Run, RunError
from xmcnas_fast.search_loop import replay
from xmcnas_fast.train import TrainConfig

FIXTURE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "run-v1")


@pytest.fixture
def old_run(tmp_path):
    path = tmp_path / "run-v1"
    shutil.copytree(FIXTURE, path)
    return str(path)


def test_an_old_run_opens_in_the_present_layout_and_replays_to_the_same_state(old_run):
    with open(os.path.join(old_run, "config.json")) as f:
        written = json.load(f)
    assert written["version"] == 1 and "device" in written["train"]     # what the fixture holds
    run = Run.open(old_run)
    cfg = run.config
    assert cfg["version"] == CONFIG_VERSION == 6
    assert cfg["lexical"]["enabled"] is False and cfg["lexical"]["ovr"] == "off" and cfg["lexical"]["refit"] is False
    assert cfg["lexical"]["fitness"] == "fused" and cfg["lexical"]["ranker"] is False
    assert "device" not in cfg["train"] and "threads" not in cfg["train"]
    assert set(cfg) == set(make_config("demo"))
    assert set(cfg["train"]) == set(make_config("demo")["train"])
    assert {k: v for k, v in cfg["train"].items()} == {k: v for k, v in written["train"].items()
                                                       if k not in ("device", "threads")}
    strategy = strategy_of(cfg)
    assert replay(strategy, run) == [] and strategy.done
    assert [c.genotype.to_dict() for c in strategy.history] == [r["genotype"] for r in run.history.records]
    assert strategy.best().id == run.best()["id"]
    with open(os.path.join(old_run, "config.json")) as f:
        assert json.load(f) == written                                   # the file is left as written


def test_an_old_bundle_loads_and_predicts(old_run):
    bundle_dir = os.path.join(old_run, "models", "cand-1")
    with open(os.path.join(bundle_dir, "config.json")) as f:
        assert json.load(f)["format"] == 1
    b = load_bundle(bundle_dir)
    assert b.config["format"] == FORMAT == 3 and "device" not in b.config["train"]
    assert TrainConfig.from_dict(b.config["train"]).seed == 1 and b.precision == "auto"
    [top] = b.predict(["a command line text editor"], k=3)
    assert len(top) == 3 and all(name in b.label_names for name, _ in top)


def test_a_version_2_run_keeps_its_lexical_stage_without_the_one_vs_rest_model():
    cfg = make_config("demo")
    cfg["version"] = 2
    del cfg["lexical"]["ovr"], cfg["lexical"]["refit"], cfg["lexical"]["fitness"], cfg["lexical"]["ranker"]
    cfg["lexical"]["trees"] = 3
    now = migrate(cfg)
    assert now["version"] == 6 and now["lexical"] == {**make_config("demo")["lexical"], "trees": 3, "ovr": "off",
                                                      "refit": False, "fitness": "fused", "ranker": False}
    assert make_config("demo")["lexical"]["ovr"] == "auto"


def test_a_version_3_run_keeps_the_stage_it_tested_with():
    cfg = make_config("demo")
    cfg["version"] = 3
    del cfg["lexical"]["refit"], cfg["lexical"]["fitness"], cfg["lexical"]["ranker"]
    now = migrate(cfg)
    assert now["version"] == 6 and now["lexical"] == {**make_config("demo")["lexical"], "refit": False,
                                                      "fitness": "fused", "ranker": False}
    assert make_config("demo")["lexical"]["refit"] is True


def test_a_version_4_run_judges_its_candidates_as_it_did():
    cfg = make_config("demo")
    cfg["version"] = 4
    del cfg["lexical"]["fitness"], cfg["lexical"]["ranker"]
    now = migrate(cfg)
    assert now["version"] == 6 and now["lexical"] == {**make_config("demo")["lexical"], "fitness": "fused",
                                                      "ranker": False}


def test_a_version_5_run_fuses_its_final_model_as_it_did():
    cfg = make_config("demo")
    cfg["version"] = 5
    del cfg["lexical"]["ranker"]
    now = migrate(cfg)
    assert now["version"] == 6 and now["lexical"] == {**make_config("demo")["lexical"], "ranker": False}
    assert make_config("demo")["lexical"]["ranker"] is True


def test_newer_layouts_are_refused_by_name(tmp_path):
    cfg = make_config("demo")
    cfg["version"] = CONFIG_VERSION + 1
    Run.create(str(tmp_path / "new"), cfg)
    with pytest.raises(RunError, match=rf"config.json: config version {CONFIG_VERSION + 1} is newer"):
        Run.open(str(tmp_path / "new"))
    with pytest.raises(ValueError, match=f"bundle format {FORMAT + 1} is not one this xmcnas-fast reads"):
        migrate_bundle_config({"format": FORMAT + 1})


def test_a_v1_config_gets_what_reproduces_its_run():
    old = {"version": 1, "search": {"population": 2}, "train": {"amp": False, "device": "cuda:0", "threads": 4}}
    cfg = migrate(old)
    assert cfg["final"]["enabled"] is False                  # written before the final phase existed
    assert cfg["search"]["inherit"] is False and cfg["search"]["fidelity"] is None
    assert cfg["train"]["precision"] == "fp32" and "amp" not in cfg["train"]
    assert cfg["run"]["keep_models"] == 3 and old["train"]["device"] == "cuda:0"   # the input is not changed
    assert migrate(cfg) == cfg
