"""The command line as a newcomer first meets it: a command with actions lists them when given none,
and a command line it cannot run is refused in one line, exit status 2."""
import os
import subprocess
import sys

import pytest

from xmcnas_fast.cli import main


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


def test_other_command_line_mistakes_are_one_line_too(capsys):
    assert refuse(["train"], capsys) == "xmcnas-fast train: error: the following arguments are required: --arch"
    assert refuse(["train", "--arch", "attentionxml", "--epoks", "3"], capsys) == \
        "xmcnas-fast: error: unrecognized arguments: --epoks 3"


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
