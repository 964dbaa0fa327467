"""Installing from a copy of the source tree as a user does (`pip install .`): nothing left in the
tree, and the installed command's hints run as printed when it is not on the PATH."""
import os
import shlex
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOT_SOURCES = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__", "*.so",
                                     "_build_info.json", "tests", "benchmarks", ".pytest_cache", "runs", ".cache")


@pytest.mark.slow
def test_pip_install_leaves_no_build_dir_and_the_commands_hints_run_as_printed(tmp_path, debtags_slice):
    src, prefix = tmp_path / "src", tmp_path / "prefix"
    shutil.copytree(ROOT, src, ignore=NOT_SOURCES)
    env = {**os.environ, "XMCNAS_NO_CUDA": "1", "MAX_JOBS": os.environ.get("MAX_JOBS", "2")}
    env.pop("PYTHONPATH", None)
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation", "--no-deps",
                    "--prefix", str(prefix), str(src)], check=True, env=env, timeout=1800)
    assert not (src / "build").exists()

    site = next(prefix.glob("lib/python*/site-packages"))
    script = prefix / "bin" / "xmcnas-fast"
    run_env = {**env, "PYTHONPATH": str(site), "PATH": os.path.dirname(sys.executable) + os.pathsep + "/usr/bin:/bin",
               "XMCNAS_CACHE": str(tmp_path / "cache")}
    search = subprocess.run([str(script), "search", "--dataset", debtags_slice, "--runs-dir", str(tmp_path / "runs"),
                             "--name", "t", "--population", "2", "--cycles", "1", "--max-steps", "2", "--eval-every", "1",
                             "--width", "8", "--emb-dim", "8", "--fc", "8", "--max-len", "16", "--valid", "40",
                             "--backend", "inline", "--devices", "cpu", "--plain"],
                            env=run_env, cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert search.returncode == 0, search.stdout + search.stderr
    lines = search.stdout.splitlines()
    hint = lines[lines.index("predict with:") + 1].strip()
    assert hint.startswith(f"{script} predict ")              # not on the PATH: named by its path
    predicted = subprocess.run(shlex.split(hint), env=run_env, cwd=tmp_path, capture_output=True, text=True,
                               timeout=300)
    assert predicted.returncode == 0, predicted.stderr
    assert "some text" in predicted.stdout
