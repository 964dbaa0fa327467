"""The search from the command line as a new user meets it: a search that cannot start leaves nothing
behind, hints run as printed and stay whole at 80 columns, a run is accepted where a bundle is
expected, and what a finished search leaves in its directory."""
import json
import os
import re
import sys

import pytest

from xmcnas_fast.cli import main
from xmcnas_fast.cli.cmd_search import header, print_summary
from xmcnas_fast.cli.common import console, program
from xmcnas_fast.runs import JsonLog, Run
from xmcnas_fast.config import make_config

TINY = ["--population", "3", "--cycles", "2", "--sample", "2", "--max-depth", "2", "--max-steps", "4",
        "--eval-every", "2", "--width", "8", "--emb-dim", "8", "--fc", "8", "--max-len", "24", "--valid", "60",
        "--backend", "inline", "--devices", "cpu", "--plain", "--quiet"]
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory, debtags_slice):
    runs = tmp_path_factory.mktemp("runs")
    assert main(["search", "--dataset", debtags_slice, "--runs-dir", str(runs), "--name", "tiny", *TINY]) == 0
    return str(runs / "tiny")


def broken_inputs(tmp_path):
    jsonl = tmp_path / "broken.jsonl"
    jsonl.write_text('{"text": "an editor", "labels": ["a"]}\n{"text": "cut', encoding="utf-8")
    csv = tmp_path / "nolabels.csv"
    csv.write_text("summaries,other\nan editor,x\n", encoding="utf-8")
    return {"missing": (str(tmp_path / "nowhere.jsonl"), "no such file or directory"),
            "broken": (str(jsonl), "broken.jsonl:2: invalid JSON"),
            "no label column": (str(csv), "no column 'terms'")}


@pytest.mark.parametrize("case", ["missing", "broken", "no label column"])
def test_a_search_that_cannot_start_creates_nothing(tmp_path, capsys, case):
    dataset, message = broken_inputs(tmp_path)[case]
    runs = tmp_path / "runs"
    assert main(["search", "--dataset", dataset, "--runs-dir", str(runs), "--name", "bad1", *TINY]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1
    assert not runs.exists()


def test_bad_devices_are_refused_before_the_run_is_created(tmp_path, debtags_slice, capsys):
    runs = tmp_path / "runs"
    args = ["search", "--dataset", debtags_slice, "--runs-dir", str(runs), "--name", "x", *TINY]
    assert main([*args, "--devices", "tpu:3"]) == 2
    assert "tpu" in capsys.readouterr().err and not runs.exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_with_ray_is_placed_on_the_clusters_gpus_not_refused_for_this_machines(tmp_path, debtags_slice,
                                                                                     capsys, monkeypatch):
    """This machine has no GPU: `--devices cuda` is refused with the local backend, but with Ray the
    workers run on the cluster's GPUs, so the spec reaches the scheduler, which places it there."""
    import importlib.util

    from xmcnas_fast.scheduler import ray_backend

    runs = tmp_path / "runs"
    args = ["search", "--dataset", debtags_slice, "--runs-dir", str(runs), *TINY, "--devices", "cuda"]
    assert main([*args, "--name", "local", "--backend", "local"]) == 2
    assert "--devices cuda: device 'cuda': no CUDA GPU is visible" in capsys.readouterr().err
    assert not runs.exists()

    class ClusterReached(Exception):
        pass

    placed = []

    def open_on_a_cluster_of_two_gpus(make_specs, retries_on_death):
        placed.extend(make_specs(gpu_count=lambda: 2))
        raise ClusterReached

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: object() if name == "ray" else real(name, *a))
    monkeypatch.setattr(ray_backend, "open_ray_scheduler", open_on_a_cluster_of_two_gpus)
    with pytest.raises(ClusterReached):
        main([*args, "--name", "ray", "--backend", "ray"])
    assert [(s.label, s.device, s.share) for s in placed] == [("cuda:0", "cuda:0", 1), ("cuda:1", "cuda:1", 1)]


def test_the_ray_backend_without_ray_is_one_line_before_anything_is_created(tmp_path, debtags_slice, capsys,
                                                                          monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    runs = tmp_path / "runs"
    args = [a for a in TINY if a not in ("--backend", "inline")]
    rc = main(["search", "--dataset", debtags_slice, "--runs-dir", str(runs), "--name", "r", *args, "--backend", "ray"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "--backend ray needs Ray" in err and "pip install 'xmcnas-fast[ray]'" in err
    assert not runs.exists()


def test_a_search_without_napkinxc_is_one_line_before_anything_is_created(tmp_path, debtags_slice, capsys,
                                                                          monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "napkinxc" else real(name, *a))
    runs = tmp_path / "runs"
    rc = main(["search", "--dataset", debtags_slice, "--runs-dir", str(runs), "--name", "r", *TINY])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert "needs napkinXC" in err and "pip install napkinxc==0.7.2" in err and "--no-lexical" in err
    assert not runs.exists()


def test_a_missing_vectors_file_is_one_line_naming_the_choices_before_anything_is_created(tmp_path, debtags_slice,
                                                                                          capsys):
    runs = tmp_path / "runs"
    missing = tmp_path / "glove.txt"
    rc = main(["search", "--dataset", debtags_slice, "--runs-dir", str(runs), "--name", "r", *TINY,
               "--vectors", str(missing)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.count("\n") == 0
    assert f"{missing}: no such file" in err and "'corpus' or 'none'" in err
    assert not runs.exists()


def test_analyze_of_a_run_without_a_finished_candidate_says_so(tmp_path, capsys):
    path = str(tmp_path / "bad1")
    Run.create(path, make_config("demo"))
    assert main(["analyze", path]) == 2
    assert "no candidate has finished successfully (0 recorded): nothing to analyze" in capsys.readouterr().err
    assert not os.path.exists(os.path.join(path, "analysis"))


def test_resume_names_the_flags_it_refuses(tmp_path, capsys):
    path = str(tmp_path / "r")
    Run.create(path, make_config("demo"))
    assert main(["search", "--resume", path, "--epochs", "3", "--cycles", "10"]) == 2   # cycles: the saved value
    err = capsys.readouterr().err
    assert "drop --epochs (or start" in err and "max_epochs" not in err and "--cycles" not in err


def test_program_is_named_as_it_can_be_typed_again(tmp_path, monkeypatch):
    script = tmp_path / "venv" / "bin" / "xmcnas-fast"
    script.parent.mkdir(parents=True)
    script.write_text("#!/bin/sh\n")
    script.chmod(0o755)
    monkeypatch.setattr(sys, "argv", [str(script), "search"])
    monkeypatch.setenv("PATH", "/nonexistent")
    assert program() == str(script)                          # not on the PATH: the path it was started by
    monkeypatch.setenv("PATH", str(script.parent))
    assert program() == "xmcnas-fast"                        # the shell finds this very script
    import xmcnas_fast.cli

    monkeypatch.setattr(sys, "argv", [os.path.join(os.path.dirname(xmcnas_fast.cli.__file__), "__main__.py"), "x"])
    monkeypatch.setattr(sys, "orig_argv", [".venv/bin/python", "-m", "xmcnas_fast.cli", "search"], raising=False)
    assert program() == ".venv/bin/python -m xmcnas_fast.cli"
    monkeypatch.setattr(sys, "argv", ["/venv/lib/pytest/__main__.py"])     # another program's __main__
    assert program() == "xmcnas-fast"


def test_summary_hints_stay_whole_on_an_80_column_terminal(tiny_run, monkeypatch, capsys):
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    run = Run.open(tiny_run)
    best = run.best()
    out = console()
    assert out.is_terminal and out.width == 80
    for line in header(run, "cpu"):
        out.print(line, soft_wrap=True)
    print_summary(out, run)
    lines = ANSI.sub("", capsys.readouterr().out).splitlines()
    assert f"  xmcnas-fast predict {best['model_dir']} \"some text\"" in lines
    assert f"  xmcnas-fast analyze {run.path}" in lines
    assert "  per candidate: width 8, at most 1 epochs and 0.5 min, inheriting weights" in lines   # one line
    assert "  then the best to the end: width 8, at most 10 epochs, until minute 9.0" in lines
    assert "  (no candidate starts after minute 5.0: the final training keeps 4.0 min)" in lines
    assert all(len(x) <= 80 for x in lines if "/" not in x)                    # only paths may run longer


def test_predict_and_evaluate_accept_a_run(tiny_run, debtags_slice, capsys):
    assert main(["predict", tiny_run, "a text editor for the terminal", "-k", "2", "--json"]) == 0
    captured = capsys.readouterr()
    best = Run.open(tiny_run).best()["model_dir"]
    assert f"using the run's best model: {best}" in captured.err
    assert len(json.loads(captured.out)["labels"]) == 2
    assert main(["evaluate", tiny_run, "--dataset", debtags_slice, "--json"]) == 0
    assert "P@5" in json.loads(capsys.readouterr().out)


def test_predict_names_the_bundle_to_pass_for_a_run_without_one(tmp_path, capsys):
    path = str(tmp_path / "r")
    Run.create(path, make_config("demo"))
    assert main(["predict", path, "text"]) == 2
    assert "is a search run with no saved model yet" in capsys.readouterr().err


def test_a_finished_search_leaves_no_lock_and_no_record_of_a_deleted_bundle(tiny_run):
    assert not os.path.exists(os.path.join(tiny_run, ".lock"))
    recs = JsonLog(os.path.join(tiny_run, "history.jsonl")).records
    kept = [r["model_dir"] for r in recs if r.get("model_dir")]
    assert kept and all(os.path.isdir(d) for d in kept)
    assert sorted(os.listdir(os.path.join(tiny_run, "models"))) == sorted([*(os.path.basename(d) for d in kept),
                                                                            "final"])


def test_analyze_prints_a_render_command_that_names_a_real_file(tiny_run, capsys, tmp_path):
    assert main(["analyze", tiny_run, "--out", str(tmp_path / "a")]) == 0
    line = next(x for x in capsys.readouterr().out.splitlines() if x.strip().startswith("dot -Tpng"))
    dot = line.split()[2]
    assert os.path.isfile(dot) and dot.startswith(str(tmp_path / "a"))


def test_a_search_reads_a_csv_by_the_columns_given(tmp_path, capsys):
    src = tmp_path / "tags.csv"
    src.write_text("text,tags\n" + "".join(f"package {i} edits text,editor{' net' * (i % 2)}\n" for i in range(80)))
    runs = tmp_path / "runs"
    rc = main(["search", "--dataset", str(src), "--text-column", "text", "--labels-column", "tags",
               "--runs-dir", str(runs), "--name", "csv", *TINY])
    assert rc == 0, capsys.readouterr().err
    assert json.load(open(runs / "csv" / "config.json"))["data"]["text_column"] == "text"


def test_help_explains_the_flags_that_make_the_search_pay(capsys):
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    for f in ("--inherit-weights, --no-inherit-weights", "--fidelity STEPS", "--promote FRACTION", "--no-final",
              "--final-width", "--final-epochs", "--final-minutes", "--total-minutes", "--final-min-minutes MINUTES",
              "--final-inherit, --no-final-inherit"):
        assert f in out, f
    assert "what was inherited" in out and "never compared" in out and "what the candidates left" in out
    assert "No candidate starts once less than this is left" in out


def test_no_final_leaves_the_best_candidate_as_the_result(tmp_path, debtags_slice, capsys):
    runs = tmp_path / "runs"
    args = [a for a in TINY if a != "--quiet"]
    rc = main(["search", "--dataset", debtags_slice, "--runs-dir", str(runs), "--name", "nf", *args, "--no-final",
               "--no-inherit-weights"])
    out = capsys.readouterr().out
    assert rc == 0 and not (runs / "nf" / "final.json").exists() and "final, width" not in out
    run = Run.open(str(runs / "nf"))
    assert isinstance(run.best()["id"], int) and "(search)" in out
    assert all("inherited" not in r for r in run.history.records)
    assert main(["search", "--resume", str(runs / "nf"), "--final-width", "32"]) == 2
    assert "drop --final-width" in capsys.readouterr().err
    assert main(["search", "--resume", str(runs / "nf"), "--no-final-inherit"]) == 2   # the saved run's: on
    assert "drop --no-final-inherit (or" in capsys.readouterr().err


def test_resume_names_a_switch_that_turns_a_setting_off_as_it_is_typed(tiny_run, capsys):
    assert main(["search", "--resume", tiny_run, "--no-final"]) == 2
    assert "drop --no-final (or" in capsys.readouterr().err


def test_the_final_model_chooses_its_fusion_among_weight_and_ranker_and_serves_it(tiny_run):
    from xmcnas_fast.bundle import load_bundle
    from xmcnas_fast.lexical import Fusion

    run = Run.open(tiny_run)
    assert run.config["lexical"]["ranker"] is True
    final = run.final()
    tried = final["fused"]["tried"]
    assert len(tried) == 12 and any(k.startswith("ranker") for k in tried)
    assert final["fused"]["valid"]["P@5"] == max(tried.values()) == final["fitness"]
    candidate_fusions = {r["fused"]["fusion"]["method"] for r in run.history.records if r.get("fused")}
    assert candidate_fusions == {"weighted"} and not any("tried" in r["fused"] for r in run.history.records
                                                         if r.get("fused"))
    bundle = load_bundle(final["model_dir"])
    assert bundle.fusion == Fusion.from_dict(final["fused"]["fusion"])


def test_no_lexical_ranker_keeps_the_weight(tmp_path, debtags_slice):
    runs = tmp_path / "runs"
    assert main(["search", "--dataset", debtags_slice, "--runs-dir", str(runs), "--name", "w", *TINY,
                 "--no-lexical-ranker"]) == 0
    run = Run.open(str(runs / "w"))
    assert run.config["lexical"]["ranker"] is False
    assert "tried" not in run.final()["fused"] and run.final()["fused"]["fusion"]["method"] == "weighted"
