"""The CLI: train, evaluate and predict on a bundle trained in the test; data show; clear errors."""
import json
import os
import re

import pytest

from xmcnas_fast.cli import main


@pytest.fixture(scope="module")
def bundle(tmp_path_factory, debtags_slice):
    out = tmp_path_factory.mktemp("models") / "tiny"
    genotype = tmp_path_factory.mktemp("arch") / "g.json"
    genotype.write_text(json.dumps({"nodes": [["conv3", 0], ["bigru", 1]], "merge": "sum"}))
    rc = main(["train", "--arch", str(genotype), "--dataset", debtags_slice, "--out", str(out),
               "--width", "16", "--emb-dim", "16", "--fc", "16", "--max-steps", "30", "--eval-every", "10",
               "--valid", "40", "--max-len", "32", "--device", "cpu", "--lr-schedule", "cosine", "--quiet"])
    assert rc == 0
    return str(out)


def test_train_writes_a_complete_bundle(bundle):
    assert sorted(os.listdir(bundle)) == ["config.json", "labels.json", "metrics.json", "vocab.json", "weights.pt"]
    metrics = json.load(open(os.path.join(bundle, "metrics.json")))
    assert metrics["status"] == "ok" and metrics["steps"] == 30
    assert set(metrics["test"]) >= {"P@1", "nDCG@5", "PSP@5"}
    assert len(metrics["layer_weights"]) == 2
    assert json.load(open(os.path.join(bundle, "config.json")))["train"]["lr_schedule"] == "cosine"


@pytest.mark.parametrize("named", [True, False])
def test_evaluate_reproduces_the_test_metrics(bundle, debtags_slice, capsys, named):
    # the bundle's own split, named or found from where the bundle was trained
    assert main(["evaluate", bundle, *(["--dataset", debtags_slice] if named else []), "--json"]) == 0
    captured = capsys.readouterr()
    got = json.loads(captured.out)                       # --json: stdout is the JSON line alone
    assert "P@1" in captured.err and "documents/s" in captured.err   # the table went to stderr
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
    assert main(["predict", bundle, "--input", str(src), "--output", str(tmp_path / "no" / "out.jsonl")]) == 2
    assert f"the folder {tmp_path / 'no'} does not exist (--output)" in capsys.readouterr().err


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


def test_data_show_says_which_split_each_figure_covers(debtags_slice, capsys, monkeypatch):
    import statistics
    from collections import Counter

    rows = [json.loads(x) for x in open(debtags_slice)]
    train_file = Counter(lab for r in rows if r["split"] == "train" for lab in r["labels"])
    every = Counter(lab for r in rows for lab in r["labels"])
    monkeypatch.setenv("TTY_COMPATIBLE", "1")
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["data", "show", debtags_slice, "--valid", "20"]) == 0
    out = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", capsys.readouterr().out)    # a terminal's styles, dropped
    lines = [x.strip("│┃ ") for x in out.splitlines()]

    def row(name):
        return [c.strip() for c in next(x for x in lines if x.startswith(name + " ")).split("│")][1:]

    assert row("train examples") == ["180"] and row("test examples") == ["200"]
    assert row("labels, training file") == [str(len(train_file))] and row("labels, all splits") == [str(len(every))]
    assert row("median") == [f"{statistics.median(train_file.values()):g}", f"{statistics.median(every.values()):g}"]
    assert row("max") == [f"{max(train_file.values()):,}", f"{max(every.values()):,}"]
    assert row("mean") == [f"{statistics.fmean(train_file.values()):.1f}", f"{statistics.fmean(every.values()):.1f}"]
    assert "training file (train + valid)" in out and "all splits" in out
    assert all(len(x) <= 80 for x in out.splitlines())                     # nothing wraps at 80 columns
    assert len([x for x in lines if x.startswith("90% of labels have at most")]) == 1


def test_csv_columns_from_the_command_line(tmp_path, capsys):
    src = tmp_path / "tags.csv"
    src.write_text("text,tags\n" + "".join(f"package {i} edits text,editor{' net' * (i % 2)}\n" for i in range(40)))
    assert main(["data", "show", str(src)]) == 2
    err = capsys.readouterr().err
    assert "no column 'summaries' (columns: 'text', 'tags')" in err and "--text-column, --labels-column" in err
    assert main(["data", "show", str(src), "--text-column", "text", "--labels-column", "tags", "--valid", "4"]) == 0
    assert "labels, training file" in capsys.readouterr().out
    out = tmp_path / "b"
    assert main(["train", "--arch", "tfidf-mlp", "--dataset", str(src), "--text-column", "text",
                 "--labels-column", "tags", "--valid", "4", "--hidden", "8", "--max-features", "50",
                 "--max-steps", "2", "--eval-every", "1", "--out", str(out), "--device", "cpu", "--quiet"]) == 0
    settings = json.load(open(out / "config.json"))["data"]["settings"]
    assert settings["text_column"] == "text" and settings["labels_column"] == "tags"
    capsys.readouterr()
    assert main(["evaluate", str(out), "--dataset", str(src), "--json"]) == 0  # read with the bundle's columns
    assert set(json.loads(capsys.readouterr().out)) >= {"P@1", "PSP@5"}


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


def test_train_starts_from_vectors_of_the_training_texts(debtags_slice, tmp_path, capsys, monkeypatch):
    import torch

    from xmcnas_fast import model as model_module
    from xmcnas_fast.data import corpus_vectors as cv

    genotype = tmp_path / "g.json"
    genotype.write_text(json.dumps({"nodes": [["conv3", 0]], "merge": "sum"}))
    seen = {}
    real = model_module.build_model

    def build(*args, **kwargs):                      # the embedding as built, before any step
        m = real(*args, **kwargs)
        seen["emb"] = m.embedding.weight.detach().clone()
        return m

    monkeypatch.setattr(model_module, "build_model", build)
    assert main(["train", "--arch", str(genotype), "--dataset", debtags_slice, "--out", str(tmp_path / "b"),
                 "--width", "8", "--emb-dim", "12", "--fc", "8", "--max-steps", "2", "--eval-every", "1",
                 "--valid", "40", "--max-len", "32", "--device", "cpu", "--vectors", "corpus"]) == 0
    assert "word vectors learned from the 160 training texts (PPMI + SVD): 12 dimensions" in capsys.readouterr().out
    from xmcnas_fast.data import load

    data = load(debtags_slice, max_len=32, valid=40)
    expected, _ = cv.corpus_vectors(data.train.token_ids, data.train.offsets, len(data.vocab), 12, seed=0)
    torch.testing.assert_close(seen["emb"], torch.from_numpy(expected))
