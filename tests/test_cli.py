"""The CLI: train, evaluate and predict on a bundle trained in the test; data show; clear errors."""
import json
import os

import pytest

from xmcnas_fast.cli import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, debtags_slice):
    out = tmp_path_factory.mktemp("models") / "tiny"
    genotype = tmp_path_factory.mktemp("arch") / "g.json"
    genotype.write_text(json.dumps({"nodes": [["conv3", 0], ["bigru", 1]], "merge": "sum"}))
    rc = main(["train", "--arch", str(genotype), "--dataset", debtags_slice, "--out", str(out),
               "--width", "16", "--emb-dim", "16", "--fc", "16", "--max-steps", "30", "--eval-every", "10",
               "--valid", "40", "--max-len", "32", "--device", "cpu", "--quiet"])
    assert rc == 0
    return str(out)


def test_train_writes_a_complete_bundle(bundle):
    assert sorted(os.listdir(bundle)) == ["config.json", "labels.json", "metrics.json", "vocab.json", "weights.pt"]
    metrics = json.load(open(os.path.join(bundle, "metrics.json")))
    assert metrics["status"] == "ok" and metrics["steps"] == 30
    assert set(metrics["test"]) >= {"P@1", "nDCG@5", "PSP@5"}
    assert len(metrics["layer_weights"]) == 2


def test_evaluate_reproduces_the_test_metrics(bundle, debtags_slice, capsys):
    assert main(["evaluate", bundle, "--dataset", debtags_slice, "--json"]) == 0  # the bundle's own split
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    saved = json.load(open(os.path.join(bundle, "metrics.json")))["test"]
    for k, v in got.items():
        assert v == pytest.approx(saved[k], abs=1e-6), k


def test_predict_text_and_jsonl(bundle, tmp_path, capsys):
    assert main(["predict", bundle, "a library for parsing xml in python", "-k", "3", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip())
    labels = json.load(open(os.path.join(bundle, "labels.json")))
    assert len(line["labels"]) == 3 and all(n in labels for n, _ in line["labels"])
    scores = [s for _, s in line["labels"]]
    assert scores == sorted(scores, reverse=True) and all(0 <= s <= 1 for s in scores)

    src = tmp_path / "in.jsonl"
    src.write_text('{"id": "a", "text": "an editor"}\n\n{"id": "b", "text": ""}\n')
    dst = tmp_path / "out.jsonl"
    assert main(["predict", bundle, "--input", str(src), "--output", str(dst)]) == 0
    rows = [json.loads(x) for x in dst.read_text().splitlines()]
    assert [r["id"] for r in rows] == ["a", "b"] and all(len(r["labels"]) == 5 for r in rows)


def test_predict_bad_input_names_file_and_line(bundle, tmp_path, capsys):
    src = tmp_path / "bad.jsonl"
    src.write_text('{"text": "fine"}\n{"text": oops}\n')
    assert main(["predict", bundle, "--input", str(src)]) == 2
    assert f"{src}:2: invalid JSON" in capsys.readouterr().err


def test_bad_arch_and_missing_bundle(tmp_path, capsys):
    assert main(["train", "--arch", "transformer"]) == 2
    assert "unknown preset" in capsys.readouterr().err
    bad = tmp_path / "g.json"
    bad.write_text('{"nodes": [["conv3", 4]]}')
    assert main(["train", "--arch", str(bad)]) == 2
    assert "outside its window" in capsys.readouterr().err
    assert main(["predict", str(tmp_path), "text"]) == 2
    assert "config.json: missing" in capsys.readouterr().err


def test_tfidf_mlp_sizes_from_the_command_line(debtags_slice, tmp_path, capsys):
    out = tmp_path / "tfidf"
    assert main(["train", "--arch", "tfidf-mlp", "--dataset", debtags_slice, "--out", str(out), "--hidden", "24,12",
                 "--max-features", "300", "--max-steps", "6", "--eval-every", "3", "--valid", "40",
                 "--device", "cpu", "--quiet"]) == 0
    cfg = json.load(open(out / "config.json"))["model"]
    assert cfg["hidden"] == [24, 12] and cfg["max_features"] == 300
    assert main(["predict", str(out), "an editor for the terminal", "-k", "2", "--json"]) == 0
    assert len(json.loads(capsys.readouterr().out.strip())["labels"]) == 2
    assert main(["train", "--arch", "attentionxml", "--hidden", "64"]) == 2
    assert "only tfidf-mlp takes --hidden" in capsys.readouterr().err
    assert main(["train", "--arch", "tfidf-mlp", "--max-features", "0"]) == 2
    assert "--max-features: expected a positive count" in capsys.readouterr().err


def test_data_show(debtags_slice, capsys):
    assert main(["data", "show", debtags_slice, "--valid", "20"]) == 0
    out = capsys.readouterr().out
    assert "train" in out and "labels" in out


def test_help_explains_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("search", "train", "evaluate", "predict", "analyze", "data"):
        assert cmd in out
    with pytest.raises(SystemExit):
        main(["search", "--help"])
    out = capsys.readouterr().out
    for flag in ("--budget", "--resume", "--population", "--cycles", "--devices", "--strategy", "--candidate-timeout"):
        assert flag in out
