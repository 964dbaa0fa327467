"""What makes a search pay: short runs first (a trainer that stops and goes on), weight inheritance
(a child starts from its parent where the two agree), the winner trained to the end (final settings
and its record), on real debtags examples."""
import math
import os
import types

import pytest
import torch

from xmcnas_fast.candidate import inherit_from
from xmcnas_fast.config import make_config
from xmcnas_fast.contract import CandidateResult, ParentWeights
from xmcnas_fast.evolution import RegularizedEvolution
from xmcnas_fast.final import final_settings, final_wins, search_deadline, search_time_is_up, stretch
from xmcnas_fast.model import ModelConfig, build_model, inherit_weights
from xmcnas_fast.records import steps_to_reach
from xmcnas_fast.runs import Run
from xmcnas_fast.space import Genotype
from xmcnas_fast.train import TrainConfig, train_model

SMALL = dict(emb_dim=16, width=16, fc=[16])


@pytest.fixture(scope="module")
def data(debtags_slice, tmp_path_factory):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=48, valid=40, cache_dir=tmp_path_factory.mktemp("cache"))


def model_of(data, nodes, merge="sum", seed=0):
    cfg = ModelConfig(genotype=Genotype(tuple(map(tuple, nodes)), merge).to_dict(), **SMALL)
    return build_model(cfg, len(data.vocab), data.num_labels, seed=seed)


def tcfg(**kw):
    return TrainConfig(**{"max_steps": 12, "eval_every": 4, "batch_size": 16, "seed": 0, **kw})


# ---- short runs first ---------------------------------------------------------------------------

def test_a_short_run_that_does_not_reach_the_bar_stops_at_its_steps(data):
    seen = []
    res = train_model(model_of(data, [["conv3", 0]]), data, tcfg(), short_steps=4,
                      go_on=lambda p5: seen.append(p5) or False)
    rec = res.record
    assert rec["steps"] == 4 and rec["rung"] == 0
    assert rec["short"] == {"steps": 4, "P@5": seen[0], "promoted": False}
    assert rec["valid"]["P@5"] == seen[0] and rec["test"] is not None


def test_a_promoted_run_goes_on_in_the_same_epoch_to_the_same_end_as_one_run(data):
    full = train_model(model_of(data, [["conv3", 0]]), data, tcfg(max_steps=8)).record
    staged = train_model(model_of(data, [["conv3", 0]]), data, tcfg(max_steps=8), short_steps=4,
                         go_on=lambda p5: True).record
    assert staged["rung"] == 1 and staged["short"]["promoted"] and staged["steps"] == full["steps"] == 8
    assert staged["epochs"] == full["epochs"] == 1   # 8 steps of 16 of 160 documents: one epoch, not restarted
    assert staged["curve"] == full["curve"] and staged["test"] == full["test"]


def test_promotion_compares_short_figures_of_the_population_only():
    evo = RegularizedEvolution(population_size=4, cycles=4, sample_size=2, seed=0)
    assert evo.promotion_threshold(1 / 3) == -math.inf      # nothing to compare with yet: it goes on
    for fig in (0.30, 0.20, 0.25):
        c = evo.propose()
        evo.tell(c.id, fig, rung=0, short_fitness=fig)
    assert evo.promotion_threshold(1 / 3) == 0.30            # top ceil(3/3) = 1 of 3
    assert evo.promotion_threshold(2 / 3) == 0.25
    c = evo.propose()
    evo.tell(c.id, 0.26, rung=1, short_fitness=0.31)       # promoted: its full figure is not a short one
    assert evo.promotion_threshold(1 / 2) == 0.30


def test_a_full_budget_figure_ranks_above_any_short_one():
    evo = RegularizedEvolution(population_size=2, cycles=0, sample_size=2, seed=0)
    a, b = evo.propose(), evo.propose()
    evo.tell(a.id, 0.40, rung=0, short_fitness=0.40)
    evo.tell(b.id, 0.35, rung=1, short_fitness=0.33)
    assert evo.best() is b


# ---- weight inheritance -------------------------------------------------------------------------

def test_a_child_inherits_embedding_head_and_unchanged_nodes_only(data):
    parent = model_of(data, [["conv3", 0], ["avgpool3", 1]], seed=1)
    child = model_of(data, [["conv3", 0], ["conv5", 1]], seed=2)       # node 2's operation mutated
    fresh = {k: v.clone() for k, v in child.state_dict().items()}
    parts = inherit_weights(child, parent.state_dict(), parent.genotype)
    assert parts == ["embedding", "node1", "head"]
    p, c = parent.state_dict(), child.state_dict()
    for k in c:
        inherited = k.startswith(("embedding.", "encoder.nodes.0.", "head."))
        assert torch.equal(c[k], p[k] if inherited else fresh[k]), k


def test_a_changed_input_and_a_head_of_another_width_stay_fresh(data):
    parent = model_of(data, [["conv3", 0], ["conv3", 0]], merge="concat", seed=1)
    child = model_of(data, [["conv3", 0], ["conv3", 1], ["conv1", 2]], merge="concat", seed=2)
    assert inherit_weights(child, parent.state_dict(), parent.genotype) == ["embedding", "node1"]


def test_the_worker_records_what_it_inherited_and_trains_from_it(data, tmp_path):
    from xmcnas_fast.bundle import save_bundle

    parent = model_of(data, [["conv3", 0]], seed=1)
    train_model(parent, data, tcfg())
    save_bundle(str(tmp_path / "cand-0"), parent, parent.cfg, data)
    child = model_of(data, [["conv3", 0], ["conv1", 1]], seed=2)
    got = inherit_from(child, ParentWeights(0, parent.genotype.to_dict(), str(tmp_path / "cand-0")))
    assert got == {"from": 0, "parts": ["embedding", "node1", "head"]}
    assert torch.equal(child.encoder.nodes[0].conv.weight, parent.encoder.nodes[0].conv.weight)
    gone = inherit_from(child, ParentWeights(3, parent.genotype.to_dict(), str(tmp_path / "x")))
    assert gone == {"from": 3, "parts": []} and inherit_from(child, None) is None


def test_steps_to_reach_a_parents_figure_are_read_off_the_curve():
    curve = [[4, 1, 0.5, 0.20], [8, 1, 0.6, 0.31], [12, 1, 0.6, 0.35]]
    assert steps_to_reach(curve, 0.30) == 8 and steps_to_reach(curve, 0.20) == 4
    assert steps_to_reach(curve, 0.40) is None and steps_to_reach(curve, None) is None


# ---- the winner trained to the end --------------------------------------------------------------

def test_the_final_training_gets_what_is_left_of_the_total_time_and_its_own_sizes():
    cfg = make_config("demo")
    model, train = final_settings(cfg, elapsed=240.0, seed=7)
    assert model["width"] == 64 and model["emb_dim"] == 64 and model["fc"] == [64]   # the search's: it goes on
    assert train["max_minutes"] == pytest.approx(cfg["final"]["total_minutes"] - 4.0)
    assert train["max_epochs"] == 10 and train["seed"] == 7 and train["max_len"] == cfg["train"]["max_len"]
    _, late = final_settings(cfg, elapsed=3600.0, seed=7)
    assert late["max_minutes"] == cfg["final"]["min_minutes"] == 4.0   # a search that overran keeps its share
    del cfg["final"]["min_minutes"]
    _, late = final_settings(cfg, elapsed=3600.0, seed=7)
    assert late["max_minutes"] == 0.5                          # without a share: half a minute
    paper = make_config("paper")
    pm, pt = final_settings(paper, elapsed=1e6, seed=0)
    assert pm["width"] == 512 and pt["max_epochs"] == 30 and pt["max_minutes"] is None


def test_no_candidate_starts_once_only_the_final_trainings_share_is_left():
    assert search_deadline(make_config("demo")) == 60 * (9.0 - 4.0)
    assert search_deadline(make_config("paper")) is None                     # no total time: no deadline
    assert search_deadline(make_config("demo", overrides={"final": {"enabled": False}})) is None
    assert search_deadline(make_config("demo", overrides={"final": {"min_minutes": 12.0}})) == 0.0


def test_no_candidate_starts_that_would_end_past_the_deadline():
    cfg = make_config("demo")                                        # deadline: minute 5
    took = [{"seconds": s, "fitness": 0.4, "reused_from": None, "steps": 581} for s in (20.0, 40.0, 90.0)]
    assert not search_time_is_up(cfg, 250.0, took)                   # 250 + 40 < 300
    assert search_time_is_up(cfg, 265.0, took)                       # 265 + 40 >= 300: it would overrun
    assert not search_time_is_up(cfg, 299.0, [])                     # nothing recorded yet: the first starts
    reused = [{"seconds": 0.0, "fitness": 0.4, "reused_from": 1}]
    assert not search_time_is_up(cfg, 299.0, reused) and search_time_is_up(cfg, 300.0, reused)
    assert not search_time_is_up(make_config("paper"), 10**6, took)  # no total time: no deadline


def test_the_total_time_stretches_as_the_candidates_step_floor_outlasts_their_time_limit():
    cfg = make_config("demo")                        # 0.5 minutes, at least 800 steps a candidate
    slow = [{"seconds": s, "fitness": 0.3, "reused_from": None} for s in (80.0, 90.0, 100.0)]
    assert stretch(cfg, slow) == 3.0                 # the median candidate took 3 of its half minutes
    assert stretch(cfg, [{"seconds": 20.0, "fitness": 0.3}]) == 1.0         # within the limit: no stretch
    assert stretch(cfg, [{"seconds": 0.0, "fitness": 0.3, "reused_from": 2}]) == 1.0 and stretch(cfg) == 1.0
    assert search_deadline(cfg, slow) == 3 * 60 * 5.0
    _, train = final_settings(cfg, elapsed=60 * 10.0, seed=0, records=slow)
    assert train["max_minutes"] == pytest.approx(3 * 9.0 - 10.0) and train["min_steps"] is None
    _, late = final_settings(cfg, elapsed=60 * 40.0, seed=0, records=slow)
    assert late["max_minutes"] == 3 * 4.0
    cfg["train"]["min_steps"] = None                 # without a step floor the limit is the limit
    assert stretch(cfg, slow) == 1.0


def test_candidates_that_their_epochs_end_before_the_step_floor_stretch_nothing():
    """debtags at the demo budget: an epoch is 581 steps, under the floor of 800, so the epoch ends every
    candidate; slow ones (a BiGRU at 50 s against its half minute) must not stretch the 9 minutes."""
    cfg = make_config("demo")
    epoch_bound = [{"seconds": s, "fitness": 0.46, "reused_from": None, "steps": 581} for s in (22.0, 39.0, 50.0)]
    assert stretch(cfg, epoch_bound) == 1.0
    floor_bound = [{"seconds": s, "fitness": 0.3, "reused_from": None, "steps": 800} for s in (80.0, 90.0, 100.0)]
    assert stretch(cfg, floor_bound) == 3.0
    assert stretch(cfg, epoch_bound[:1] + floor_bound) == pytest.approx((80.0 + 90.0) / 2 / 30.0)


def test_the_final_model_is_the_result_only_when_it_does_at_least_as_well_as_its_candidate():
    cand = {"id": 4, "fitness": 0.40}
    assert final_wins({"fitness": 0.41, "model_dir": "m"}, cand)
    assert final_wins({"fitness": 0.40, "model_dir": "m"}, cand)             # a tie: the model trained longer
    assert not final_wins({"fitness": 0.39, "model_dir": "m"}, cand)
    assert not final_wins({"fitness": None, "model_dir": "m"}, cand)         # it failed
    assert not final_wins({"fitness": 0.50, "model_dir": None}, cand)        # nothing saved to serve


class _OneTask:
    """A scheduler that runs nothing: the final training's result is the one given."""

    def __init__(self, value):
        self.value, self.task = value, None

    def submit(self, task_id, fn, task):
        self.task = task

    def running(self):
        return {"final": "cpu#0"}

    def poll(self, timeout):
        from xmcnas_fast.scheduler import TaskResult

        return [TaskResult("final", "ok", value=self.value, device="cpu#0", seconds=1.0)]


def _search_with_one_candidate(tmp_path, fitness):
    from xmcnas_fast import search

    run = Run.create(str(tmp_path / "r"), make_config("demo"))
    strategy = RegularizedEvolution(population_size=2, cycles=0, sample_size=2, seed=0)
    c = strategy.propose()
    strategy.tell(c.id, fitness)
    os.makedirs(run.model_dir(c.id))
    rec = {"id": c.id, "genotype": c.genotype.to_dict(), "fitness": fitness, "model_dir": run.model_dir(c.id),
           "valid": {"P@5": fitness}, "elapsed": 200.0}
    run.history.append(rec)
    run.set_best(rec)
    return search, run, strategy, c


@pytest.mark.parametrize("final_p5, result", [(0.30, "candidate"), (0.36, "final")])
def test_a_final_model_below_its_candidate_is_recorded_but_not_made_the_result(tmp_path, final_p5, result):
    search, run, strategy, c = _search_with_one_candidate(tmp_path, 0.35)
    sched = _OneTask(CandidateResult("ok", valid={"P@5": final_p5}, test={"P@5": final_p5}, steps=9,
                                     model_dir=run.final_dir()))
    out = search.run_final(run, strategy, sched, search._Silent(), threads=2)
    assert sched.task.parent == ParentWeights(c.id, c.genotype.to_dict(), run.model_dir(c.id))
    assert sched.task.threads == 2 and sched.task.model_dir == run.final_dir()
    assert out["chosen"] == (result == "final") and run.final()["chosen"] == out["chosen"]
    assert out["of"] == c.id and out["candidates"] == 1 and out["fitness"] == final_p5
    assert run.best()["id"] == ("final" if result == "final" else c.id)
    # on resume the recorded final training is not run again, and the result stays what it was
    again = search.run_final(run, strategy, None, search._Silent())
    assert again == out and run.best()["id"] == ("final" if result == "final" else c.id)


def test_an_old_run_without_a_final_section_has_no_final_phase(monkeypatch, tmp_path):
    from xmcnas_fast import search

    cfg = make_config("demo")
    del cfg["final"]
    cfg["version"] = 1          # as written before the final phase existed
    run = Run.create(str(tmp_path / "old"), cfg)
    strategy = types.SimpleNamespace(best=lambda: types.SimpleNamespace(id=0))
    assert search.run_final(Run.open(run.path), strategy, sched=None, progress=None) is None


def test_short_run_settings_no_search_can_use_are_refused_up_front():
    with pytest.raises(ValueError, match="at least 1 step"):
        make_config("demo", overrides={"search": {"fidelity": 0}})
    with pytest.raises(ValueError, match=r"in \(0, 1\]"):
        make_config("demo", overrides={"search": {"fidelity": 100, "promote": 1.5}})
    assert make_config("demo", overrides={"search": {"fidelity": 100, "promote": 0.5}})["search"]["promote"] == 0.5


def test_the_evaluations_still_due_count_inside_the_time_budget(data):
    import time

    from xmcnas_fast.train import Trainer

    model = model_of(data, [["conv3", 0]])
    trainer = Trainer(model, data, tcfg(), torch.device("cpu"))
    trainer.deadline = time.monotonic() + 3600.0
    assert not trainer.should_end(None)
    docs = len(data.valid) + len(data.test)
    trainer.eval_seconds_per_doc = 7200.0 / docs     # a last validation and the test split: two hours
    assert trainer.evaluations_due() == pytest.approx(7200.0)
    assert trainer.should_end(None)                  # an hour left is not enough: stop training now
    trainer.validate()                                # measures what an evaluation costs here
    assert 0 < trainer.eval_seconds_per_doc < 7200.0 / docs
