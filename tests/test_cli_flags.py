"""The command line as a newcomer first meets it: a command with actions lists them when given none,
and every numeric flag of every command refuses a value it cannot run with while the command line is
read: one line naming the flag and what it takes, exit status 2, nothing created."""
import argparse
import json
import os
import subprocess
import sys

import pytest

from xmcnas_fast.cli import build_parser, main
from xmcnas_fast.cli import common

#: each numeric argument type: a value it refuses, and what the refusal says the flag takes
REFUSED = {
    common.positive_int: ("0", "a positive integer"),
    common.non_negative_int: ("-1", "an integer >= 0"),
    common.positive_float: ("0", "a number > 0"),
    common.non_negative_float: ("-0.5", "a number >= 0"),
    common.fraction: ("1.5", "a fraction in [0, 1]"),
    common.share: ("0", "a fraction in (0, 1]"),
    common.probability: ("1", "a probability in [0, 1)"),
    common.positive_int_list: ("64,0", "comma-separated positive integers (256 or 1024,512,256)"),
    common.count_or_fraction: ("0", "a count (200) or a fraction (0.1)"),
}
#: what each command needs besides the flag under test; nothing it names exists, so anything created
#: (a run directory, a bundle, a cache) would show in the otherwise empty working directory
COMMANDS = {
    "search": ["search", "--runs-dir", "runs", "--name", "s"],
    "train": ["train", "--arch", "attentionxml", "--out", "bundle"],
    "evaluate": ["evaluate", "bundle"],
    "predict": ["predict", "bundle", "some text"],
    "analyze": ["analyze", "run", "--out", "analysis"],
    "data show": ["data", "show"],
}


def subparsers(parser):
    return next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices


def commands() -> dict:
    """Every command that runs something, by its words on the command line, and its parser."""
    top = subparsers(build_parser())
    found = {name: p for name, p in top.items() if name != "data"}
    found.update({f"data {name}": p for name, p in subparsers(top["data"]).items()})
    return found


def numeric_flags():
    """(command, flag, type) of every option that takes a number."""
    for command, parser in commands().items():
        for action in parser._actions:
            if action.option_strings and action.type is not None:
                yield command, max(action.option_strings, key=len), action.type


def refuse(args, capsys) -> str:
    """Run the command line, which must be refused while it is read; its one line on stderr."""
    with pytest.raises(SystemExit) as e:
        main(args)
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    return lines[0]


def test_every_command_is_checked_with_its_required_arguments():
    assert set(COMMANDS) == set(commands())


def test_every_numeric_flag_has_a_checking_type():
    # a bare int or float lets 0 and -1 through to where they fail late, or not at all
    flags = list(numeric_flags())
    assert len(flags) >= 40
    unchecked = [(c, f) for c, f, t in flags if t not in REFUSED]
    assert unchecked == []


@pytest.mark.parametrize("command, flag, kind", list(numeric_flags()),
                         ids=[f"{c}{f}" for c, f, _ in numeric_flags()])
def test_a_numeric_flag_out_of_range_is_refused_in_one_line(tmp_path, monkeypatch, capsys, command, flag, kind):
    monkeypatch.chdir(tmp_path)
    value, takes = REFUSED[kind]
    line = refuse([*COMMANDS[command], f"{flag}={value}"], capsys)
    assert line == f"xmcnas-fast {command}: error: argument {flag}: expected {takes}, got '{value}'"
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("command, flag, value, takes", [
    # the case, and the counts and durations a newcomer tries first
    ("train", "--epochs", "-1", "a positive integer"),
    ("train", "--max-steps", "0", "a positive integer"),
    ("train", "--batch-size", "-40", "a positive integer"),
    ("train", "--eval-every", "0", "a positive integer"),
    ("train", "--patience", "0", "a positive integer"),
    ("train", "--max-minutes", "-1", "a number >= 0"),
    ("train", "--max-minutes", "nan", "a number >= 0"),
    ("train", "--lr", "0", "a number > 0"),
    ("train", "--valid", "1.5", "a count (200) or a fraction (0.1)"),
    ("train", "--fc", "", "comma-separated positive integers (256 or 1024,512,256)"),
    ("train", "--max-features", "many", "a positive integer"),
    ("search", "--population", "0", "a positive integer"),
    ("search", "--cycles", "-3", "an integer >= 0"),
    ("search", "--sample", "0", "a positive integer"),
    ("search", "--epochs", "0", "a positive integer"),
    ("search", "--candidate-minutes", "-1", "a number >= 0"),
    ("search", "--total-minutes", "0", "a number > 0"),
    ("search", "--final-min-minutes", "0", "a number > 0"),
    ("search", "--candidate-timeout", "0", "a number > 0"),
    ("search", "--promote", "1.2", "a fraction in (0, 1]"),
    ("search", "--dropout", "-0.1", "a probability in [0, 1)"),
    ("search", "--max-steps", "2.5", "a positive integer"),
    ("predict", "-k", "0", "a positive integer"),
    ("analyze", "--top", "-1", "an integer >= 0"),
])
def test_values_a_newcomer_tries_are_refused_before_anything_starts(tmp_path, monkeypatch, capsys, command, flag,
                                                                    value, takes):
    monkeypatch.chdir(tmp_path)
    line = refuse([*COMMANDS[command], flag, value], capsys)
    assert line == f"xmcnas-fast {command}: error: argument {flag}: expected {takes}, got '{value}'"
    assert os.listdir(tmp_path) == []


def test_the_installed_command_refuses_a_negative_epoch_count_and_creates_nothing(tmp_path):
    done = subprocess.run([sys.executable, "-m", "xmcnas_fast.cli", "train", "--arch", "attentionxml",
                           "--epochs", "-1"], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr == "xmcnas-fast train: error: argument --epochs: expected a positive integer, got '-1'\n"
    assert os.listdir(tmp_path) == []


def test_other_command_line_mistakes_are_one_line_too(capsys):
    assert refuse(["train"], capsys) == "xmcnas-fast train: error: the following arguments are required: --arch"
    assert refuse(["train", "--arch", "attentionxml", "--epoks", "3"], capsys) == \
        "xmcnas-fast: error: unrecognized arguments: --epoks 3"


def help_text(capsys, *command) -> str:
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    return " ".join(capsys.readouterr().out.split())


@pytest.mark.parametrize("command, says", [
    ("train", "--max-minutes MAX_MINUTES training time budget in minutes (default and 0: no limit, the epochs or "
              "steps end it)"),
    ("train", "do): a budget that grows with the data where a step takes longer (0: no such floor)"),
    ("train", "--warmup-steps WARMUP_STEPS linear learning-rate warm-up steps (0: none)"),
    ("search", "--candidate-minutes CANDIDATE_MINUTES training time budget of one candidate (minutes; 0: no limit, "
               "its epochs or steps end it)"),
    ("search", "--cycles CYCLES C: children trained after the initial population (0: the population alone)"),
    ("search", "(0: no such floor)"),
    ("analyze", "--top TOP best architectures to draw (default 3; 0: none)"),
])
def test_help_says_what_0_means_where_it_is_taken(capsys, command, says):
    assert says in help_text(capsys, command)


def test_0_minutes_trains_without_a_time_limit(tmp_path, debtags_slice):
    out = tmp_path / "b"
    assert main(["train", "--arch", "tfidf-mlp", "--dataset", debtags_slice, "--out", str(out), "--hidden", "8",
                 "--max-features", "200", "--max-steps", "3", "--eval-every", "3", "--valid", "40",
                 "--max-minutes", "0", "--device", "cpu", "--quiet"]) == 0
    metrics = json.load(open(out / "metrics.json"))
    assert metrics["status"] == "ok" and metrics["steps"] == 3
    assert json.load(open(out / "config.json"))["train"]["max_minutes"] == 0


def test_data_alone_lists_its_actions_as_the_program_alone_lists_its_commands(capsys):
    assert main([]) == 0
    commands_listed = capsys.readouterr().out
    assert "    data " in commands_listed and "inspect a dataset" in commands_listed
    assert main(["data"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: xmcnas-fast data [-h] ACTION ...")
    lines = [" ".join(x.split()) for x in out.splitlines()]
    actions = lines[lines.index("actions:") + 1:]
    assert "show statistics of a dataset" in actions


def test_the_installed_command_lists_the_data_actions(tmp_path):
    done = subprocess.run([sys.executable, "-m", "xmcnas_fast.cli", "data"], cwd=tmp_path, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0 and done.stderr == ""
    assert any(x.split() == ["show", "statistics", "of", "a", "dataset"] for x in done.stdout.splitlines())
    assert os.listdir(tmp_path) == []
