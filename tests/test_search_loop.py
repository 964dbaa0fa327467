"""The search loop without training: a scheduler stand-in that scores each network at once, so that
many workers, stand-ins for children in flight, a stop and a resume take milliseconds."""
import functools
import json
import random
import types

import numpy as np
import pytest

from xmcnas_fast import search
from xmcnas_fast.config import make_config, strategy_of
from xmcnas_fast.contract import CandidateResult
from xmcnas_fast.evolution import make_strategy
from xmcnas_fast.runs import Run
from xmcnas_fast.scheduler import TaskResult
from xmcnas_fast.search import run_search
from xmcnas_fast.search_loop import replay, training_seed
from xmcnas_fast.space import Genotype


def score(genotype: dict) -> float:
    """A synthetic validation P@5, fixed per network."""
    return random.Random(Genotype.from_dict(genotype).hash()).random()


class ScoringScheduler:
    """Runs nothing: `workers` slots, finished first in first out, one per poll; after `stop_after`
    results a poll raises KeyboardInterrupt (a Ctrl-C)."""

    def __init__(self, workers: int, stop_after=None):
        self.workers, self.stop_after, self.returned = workers, stop_after, 0
        self.devices = [f"cpu#{k}" for k in range(workers)]
        self.queue: list = []
        self.seeds: dict = {}      # candidate id -> the training seed its task asked for

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def free_slots(self):
        return self.workers - len(self.queue)

    def submit(self, task_id, fn, task):
        self.queue.append((task_id, task))
        self.seeds[task_id] = task.train.seed

    def running(self):
        return {task_id: "cpu" for task_id, _ in self.queue}

    def poll(self, timeout=None):
        if self.stop_after is not None and self.returned >= self.stop_after:
            raise KeyboardInterrupt
        task_id, task = self.queue.pop(0)
        self.returned += 1
        result = CandidateResult("ok", valid={"P@5": score(task.model.genotype)})
        return [TaskResult(task_id, "ok", value=result, device="cpu")]


def search_with(monkeypatch, tmp_path, name, workers, stop_after=None, run=None):
    """A search of 40 candidates in a space of about a hundred networks, whose strategy gives up
    redrawing a child after two collisions (so that children in flight are often stood in for)."""
    cfg = make_config("demo", overrides={"search": {"population": 4, "cycles": 36, "sample": 2, "max_depth": 2},
                                         "lexical": {"enabled": False}, "data": {"vectors": "none"}})
    run = run or Run.create(str(tmp_path / name), cfg)
    monkeypatch.setattr(search, "load_data", lambda data_cfg: types.SimpleNamespace(cache_path=None, num_labels=10))
    sched = ScoringScheduler(workers, stop_after)
    monkeypatch.setattr(search, "make_scheduler", lambda *a, **kw: sched)
    monkeypatch.setattr(search, "make_strategy", functools.partial(make_strategy, max_redraws=2))
    return run, run_search(run), sched


def test_the_whole_budget_is_recorded_with_stand_ins_under_many_workers(monkeypatch, tmp_path):
    run, outcome, _ = search_with(monkeypatch, tmp_path, "r", workers=8)
    recs = run.history.records
    assert not outcome.interrupted and outcome.finished == outcome.total == 40
    assert sorted(r["id"] for r in recs) == list(range(40))
    stand_ins = [r for r in recs if r["stands_in_for"] is not None]
    assert stand_ins, "eight workers in a space of about a hundred networks collide with children in flight"
    assert all(r["parent"] is None and r["mutation"] is None for r in stand_ins)
    proposals = {p["id"]: p for p in run.proposals.records}
    assert all(proposals[r["id"]]["stands_in_for"] == r["stands_in_for"] for r in recs)


def test_each_candidate_trains_with_its_own_seed(monkeypatch, tmp_path):
    run, _, sched = search_with(monkeypatch, tmp_path, "r", workers=3)
    seeds = {int(k): v for k, v in sched.seeds.items() if k != "final"}
    trained = [r["id"] for r in run.history.records if r["reused_from"] is None]
    assert sorted(seeds) == sorted(trained) and len(set(seeds.values())) == len(seeds)
    assert all(seed == training_seed(0, cand_id) for cand_id, seed in seeds.items())


def test_replay_brings_a_fresh_strategy_to_the_state_of_the_stopped_one(monkeypatch, tmp_path):
    run, outcome, _ = search_with(monkeypatch, tmp_path, "r", workers=8, stop_after=25)
    assert outcome.interrupted and outcome.finished >= 25
    a, b = (strategy_of(run.config, functools.partial(make_strategy, max_redraws=2)) for _ in range(2))
    unfinished = replay(a, Run.open(run.path))
    assert len(unfinished) == len(run.proposals.records) - len(run.history.records) > 0
    replay(b, Run.open(run.path))
    assert a.rng.getstate() == b.rng.getstate() and a.proposed == b.proposed == len(run.proposals.records)
    assert [c.id for c in a.population] == [r["id"] for r in run.history.records][-4:]
    for p in run.proposals.records:
        c = a.candidates[p["id"]]
        assert (c.genotype.hash(), c.parent, c.stands_in_for, c.reused_from) == \
            (p["hash"], p["parent"], p["stands_in_for"], p["reused_from"])


def test_a_stopped_search_resumes_to_the_same_history(monkeypatch, tmp_path):
    ref, _, _ = search_with(monkeypatch, tmp_path, "ref", workers=8)
    run, _, _ = search_with(monkeypatch, tmp_path, "stopped", workers=8, stop_after=25)
    _, outcome, _ = search_with(monkeypatch, tmp_path, None, workers=8, run=Run.open(run.path))
    assert not outcome.interrupted and outcome.finished == 40
    key = ("id", "hash", "parent", "stands_in_for", "reused_from", "fitness")
    assert [[r[k] for k in key] for r in Run.open(run.path).history.records] == \
        [[r[k] for k in key] for r in ref.history.records]


def test_a_sample_larger_than_the_population_is_refused_before_anything_is_written():
    with pytest.raises(ValueError, match=r"sample size \(7\).*population \(6\)"):
        make_config("demo", overrides={"search": {"sample": 7}})
    assert make_config("demo", overrides={"search": {"strategy": "random", "sample": 7}})


def test_word_vector_coverage_is_shown_at_every_start(tmp_path, debtags_slice):
    from xmcnas_fast.data import load

    data = load(debtags_slice, max_len=24, valid=60, cache_dir=str(tmp_path / "cache"))
    words = [w for w in data.vocab.itos[2:] if w.isalpha()]
    found = words[: len(words) // 4]
    vectors = tmp_path / "vectors.txt"
    vectors.write_text("".join(f"{w} 0.5 -0.25 1.0\n" for w in found))
    cfg = make_config("demo", dataset=debtags_slice)
    cfg["data"]["vectors"] = str(vectors)
    run = Run.create(str(tmp_path / "r"), cfg)
    notes = types.SimpleNamespace(lines=[])
    notes.note = notes.lines.append
    path = search._prepare_vectors(run, cfg, data, notes)
    path_again = search._prepare_vectors(run, cfg, data, notes)   # a resumed search reads what was kept
    assert path == path_again and notes.lines[0] == notes.lines[1]
    share = json.loads((tmp_path / "r" / "vectors.json").read_text())["coverage"]
    assert share == pytest.approx(len(found) / (len(data.vocab) - 2), abs=0.02)
    assert f"{100 * share:.1f}% of the vocabulary" in notes.lines[0]


def test_corpus_vectors_are_learned_once_from_the_training_texts_and_kept_in_the_run(tmp_path, debtags_slice):
    from xmcnas_fast.data import load
    from xmcnas_fast.data import corpus_vectors as cv

    data = load(debtags_slice, max_len=24, valid=60, cache_dir=str(tmp_path / "cache"))
    cfg = make_config("demo", dataset=debtags_slice)
    cfg["data"]["vectors"] = "corpus"
    run = Run.create(str(tmp_path / "r"), cfg)
    notes = types.SimpleNamespace(lines=[])
    notes.note = notes.lines.append
    path = search._prepare_vectors(run, cfg, data, notes)
    kept = np.load(path)
    expected, learned = cv.corpus_vectors(data.train.token_ids, data.train.offsets, len(data.vocab),
                                          cfg["model"]["emb_dim"], seed=cfg["data"]["seed"])
    np.testing.assert_array_equal(kept, expected)
    assert search._prepare_vectors(run, cfg, data, notes) == path and notes.lines[0] == notes.lines[1]
    assert notes.lines[0].startswith(f"word vectors learned from the {len(data.train):,} training texts")
    assert f"{cfg['model']['emb_dim']} dimensions" in notes.lines[0]
    share = json.loads((tmp_path / "r" / "vectors.json").read_text())["coverage"]
    assert share == pytest.approx(learned[2:].mean())      # the words that got a learned vector, not a random one


def test_the_demo_starts_from_corpus_vectors_and_none_turns_them_off(tmp_path, debtags_slice):
    from xmcnas_fast.data import load

    assert make_config("demo")["data"]["vectors"] == "corpus" and make_config("paper")["data"]["vectors"] is None
    data = load(debtags_slice, max_len=24, valid=60, cache_dir=str(tmp_path / "cache"))
    cfg = make_config("demo", dataset=debtags_slice, overrides={"data": {"vectors": "none"}})
    run = Run.create(str(tmp_path / "r"), cfg)
    notes = types.SimpleNamespace(lines=[])
    notes.note = notes.lines.append
    assert search._prepare_vectors(run, cfg, data, notes) is None
    assert notes.lines == [] and not (tmp_path / "r" / "vectors.npy").exists()
