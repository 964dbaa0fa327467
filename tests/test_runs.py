"""A search's directory: file modes, the lock's life, history records of deleted bundles, taking over
a run that never started."""
import json
import os
import stat

import pytest

from xmcnas_fast.runs import JsonLog, Run, RunError


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_config_and_best_are_readable_like_any_file_the_user_writes(tmp_path, umask_022):
    run = Run.create(str(tmp_path / "r"), {"x": 1})
    run.set_best({"id": 0, "fitness": 0.5, "genotype": {}, "model_dir": None})
    assert mode(tmp_path / "r" / "config.json") == 0o644
    assert mode(tmp_path / "r" / "best.json") == 0o644


def test_the_lock_file_is_gone_when_the_search_ends_and_the_lock_still_excludes(tmp_path):
    run = Run.create(str(tmp_path / "r"), {"x": 1}).lock()
    lock = tmp_path / "r" / ".lock"
    assert lock.read_text() == str(os.getpid())
    with pytest.raises(RunError, match="in use by another running search"):
        Run.open(str(tmp_path / "r")).lock()
    run.unlock()
    assert not lock.exists()
    again = Run.open(str(tmp_path / "r")).lock()
    with pytest.raises(RunError, match="in use"):
        Run.open(str(tmp_path / "r")).lock()
    again.unlock()
    assert not lock.exists()


def test_history_forgets_the_model_dir_of_deleted_bundles(tmp_path):
    run = Run.create(str(tmp_path / "r"), {"x": 1})
    for i in range(3):
        os.makedirs(run.model_dir(i))
        run.history.append({"id": i, "fitness": i / 10, "model_dir": run.model_dir(i)})
    run.history.append({"id": 3, "fitness": None})
    run.keep_models({1, 2})
    assert sorted(os.listdir(run.models_dir)) == ["cand-1", "cand-2"]
    on_disk = JsonLog(run.history.path).records
    assert [r.get("model_dir") for r in on_disk] == [None, run.model_dir(1), run.model_dir(2), None]
    assert [r["id"] for r in on_disk] == [0, 1, 2, 3] and on_disk == run.history.records
    assert not [f for f in os.listdir(run.path) if f.startswith(".tmp-")]


def test_a_run_that_never_proposed_a_candidate_is_taken_over(tmp_path):
    path = str(tmp_path / "r")
    Run.create(path, {"dataset": "missing.jsonl"})
    run = Run.create(path, {"dataset": "debtags"})           # nothing ran: the name can be used again
    assert json.load(open(os.path.join(path, "config.json"))) == {"dataset": "debtags"}
    run.lock()
    with pytest.raises(RunError, match="already holds a search"):  # one is running there now
        Run.create(path, {"dataset": "other"})
    run.unlock()
    run.proposals.append({"id": 0})
    with pytest.raises(RunError, match=f"resume it with --resume {path}"):
        Run.create(path, {"dataset": "other"})


def test_keep_models_never_deletes_the_final_model_nor_a_bundle_being_written(tmp_path):
    run = Run.create(str(tmp_path / "r"), {"x": 1})
    models = tmp_path / "r" / "models"
    for name in ("final", "cand-1", "cand-2", ".tmp-bundle-x1"):
        (models / name).mkdir()
    run.keep_models({2})     # every candidate saves a bundle when inheriting: a worker may be writing one now
    assert sorted(p.name for p in models.iterdir()) == [".tmp-bundle-x1", "cand-2", "final"]
    run.remove_stray_files()     # at the start of a search, before any worker: what a kill left half-written
    assert sorted(p.name for p in models.iterdir()) == ["cand-2", "final"]
    assert run.final() is None
    run.set_final({"id": "final", "of": 2})
    assert Run.open(run.path).final() == {"id": "final", "of": 2}


def test_keep_models_says_which_records_lost_their_bundle(tmp_path):
    run = Run.create(str(tmp_path / "r"), {"x": 1})
    for i in (1, 2):
        (tmp_path / "r" / "models" / f"cand-{i}").mkdir()
        run.history.append({"id": i, "model_dir": run.model_dir(i)})
    assert run.keep_models({2}) == [1] and run.keep_models({2}) == []
    assert [r.get("model_dir") for r in JsonLog(run.history.path).records] == [None, run.model_dir(2)]
