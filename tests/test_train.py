"""The trainer on real debtags examples: repeatable by seed, learns, keeps its best weights, honours budgets."""
import dataclasses
import math
import time
from itertools import islice

import pytest
import torch
import torch.nn as nn

from xmcnas_fast.model import ModelConfig, build_model
from xmcnas_fast.space import Genotype
from xmcnas_fast.optim import GradientClipper
from xmcnas_fast.evolution import Candidate, RegularizedEvolution
from xmcnas_fast.fitness import fitness, ranked, record_tie, validation_figure
from xmcnas_fast.records import result_record
from xmcnas_fast.scheduler import TaskResult
from xmcnas_fast.train import BestWeights, Trainer, TrainConfig, evaluate, train_model

SMALL = dict(emb_dim=16, width=16, fc=[16])


@pytest.fixture(scope="module")
def data(debtags_slice, tmp_path_factory):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=48, valid=40, cache_dir=tmp_path_factory.mktemp("cache"))


def cfg_of(nodes, merge="sum", **kw):
    return ModelConfig(genotype=Genotype(tuple(map(tuple, nodes)), merge).to_dict(), **{**SMALL, **kw})


def run(data, mcfg, seed, **train):
    model = build_model(mcfg, len(data.vocab), data.num_labels, seed=seed)
    torch.manual_seed(1234 + seed * 7)          # the global state must not matter
    tcfg = TrainConfig(seed=seed, **{"max_steps": 12, "eval_every": 4, "batch_size": 16, **train})
    return model, train_model(model, data, tcfg)


@pytest.mark.parametrize("nodes", [[["avgpool3", 0]], [["conv3", 0], ["bigru", 1]]])
def test_same_seed_same_run_other_seed_other_run(data, nodes):
    mcfg = cfg_of(nodes)
    m1, r1 = run(data, mcfg, seed=3)
    m2, r2 = run(data, mcfg, seed=3)
    assert r1.record["curve"] == r2.record["curve"]
    assert r1.record["test"] == r2.record["test"]
    for (k, a), b in zip(m1.state_dict().items(), m2.state_dict().values()):
        assert torch.equal(a, b), k
    m3, _ = run(data, mcfg, seed=4)
    assert any(not torch.equal(a, b) for a, b in zip(m1.state_dict().values(), m3.state_dict().values()))


def test_initial_weights_depend_on_the_seed_alone(data):
    mcfg = cfg_of([["conv5", 0], ["bilstm", 1]])
    a = build_model(mcfg, len(data.vocab), data.num_labels, seed=9).state_dict()
    torch.rand(100)
    b = build_model(mcfg, len(data.vocab), data.num_labels, seed=9).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    state = torch.random.get_rng_state()
    build_model(mcfg, len(data.vocab), data.num_labels, seed=9)
    assert torch.equal(state, torch.random.get_rng_state())


def test_overfits_a_tiny_training_set(data):
    """Training loss falls and P@1 on the 24 documents it trained on reaches 1.0."""
    tiny = data.train.subset(range(24))
    small = dataclasses.replace(data, train=tiny, valid=tiny)
    model = build_model(cfg_of([["conv3", 0]], emb_dim=64, width=64, fc=[64], dropout=0.0, dropout_emb=0.0),
                        len(data.vocab), data.num_labels, seed=0)
    losses = []
    res = train_model(model, small, TrainConfig(max_steps=300, max_epochs=1000, eval_every=10, batch_size=8,
                                                lr=1e-2, patience=1000),
                      on_progress=lambda **f: losses.append(f["loss"]), evaluate_test=False)
    assert res.record["status"] == "ok" and res.record["steps"] == 300
    assert losses[-1] < 0.1 * losses[0]
    assert evaluate(model, tiny, data.num_labels)["P@1"] == 1.0


def test_best_weights_are_kept_and_budgets_honoured(data):
    model, res = run(data, cfg_of([["conv1", 0], ["maxpool3", 1]]), seed=0, max_steps=10, eval_every=4)
    rec = res.record
    assert rec["status"] == "ok" and rec["steps"] == 10
    assert [c[0] for c in rec["curve"]] == [4, 8, 10]           # the last steps are evaluated too
    best = max(rec["curve"], key=lambda c: c[3])
    assert rec["best_step"] == best[0] and rec["valid"]["P@5"] == pytest.approx(best[3], abs=1e-6)
    again = evaluate(model, data.valid, data.num_labels, batch_size=TrainConfig().eval_batch_size)
    assert again["P@5"] == pytest.approx(rec["valid"]["P@5"], abs=1e-9)  # the model holds the best weights
    assert set(rec["test"]) >= {"P@1", "P@3", "P@5", "nDCG@5", "PSP@5"}
    _, res = run(data, cfg_of([["conv1", 0]]), seed=0, max_steps=None, max_epochs=1, eval_every=1000)
    assert res.record["epochs"] == 1 and res.record["steps"] == -(-len(data.train) // 16)


class _Diverges(nn.Module):
    """A bag of embeddings whose scores turn NaN from its fourth training step on."""

    def __init__(self, vocab_size, num_labels):
        super().__init__()
        self.emb = nn.EmbeddingBag(vocab_size, num_labels, mode="mean")
        self.calls = 0

    def forward(self, tokens, mask):
        self.calls += self.training
        out = self.emb(tokens)
        return out * float("nan") if self.calls > 3 else out


def test_a_diverging_run_is_recorded_not_raised(data):
    res = train_model(_Diverges(len(data.vocab), data.num_labels), data,
                      TrainConfig(max_steps=20, eval_every=2, batch_size=16))
    assert res.record["status"] == "nan"
    assert "non-finite training loss at step 4" in res.record["error"]


def test_patience_ends_training_after_that_many_evaluations_without_gain(data):
    # lr 1e-12: steps far below float32 resolution leave the weights as they are, so validation P@5
    # never beats its first value
    _, res = run(data, cfg_of([["conv3", 0]]), seed=0, lr=1e-12, max_steps=60, eval_every=2, patience=3)
    rec = res.record
    assert rec["status"] == "ok" and rec["steps"] == 8
    assert [c[0] for c in rec["curve"]] == [2, 4, 6, 8] and rec["best_step"] == 2


def test_a_cooperative_stop_is_recorded_and_its_best_weights_tested(data):
    polls = []
    model = build_model(cfg_of([["conv1", 0]]), len(data.vocab), data.num_labels, seed=0)
    res = train_model(model, data, TrainConfig(max_steps=50, eval_every=4, batch_size=16),
                      should_stop=lambda: polls.append(1) or len(polls) >= 6)
    rec = res.record
    assert rec["status"] == "stopped" and rec["steps"] == 6 and len(polls) == 6
    assert [c[0] for c in rec["curve"]] == [4, 6]                # the steps since the last evaluation count
    assert set(rec["test"]) >= {"P@1", "P@5"}


def test_warm_up_ramps_the_learning_rate_linearly(data):
    from xmcnas_fast.data import iterate_batches

    model = build_model(cfg_of([["conv1", 0]]), len(data.vocab), data.num_labels, seed=0)
    trainer = Trainer(model, data, TrainConfig(lr=1e-3, warmup_steps=4, batch_size=16), torch.device("cpu"))
    lrs = []
    for batch in islice(iterate_batches(data.train, data.num_labels, 16, shuffle=False), 6):
        assert trainer.train_step(batch)
        lrs.append(trainer.opts[0].param_groups[0]["lr"])
    assert lrs == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert trainer.step == 6 and trainer.docs == 96 and len(trainer.running_loss) == 6


def test_the_cosine_schedule_goes_down_to_zero_at_the_end_of_the_step_budget(data):
    from xmcnas_fast.data import iterate_batches

    model = build_model(cfg_of([["conv1", 0]]), len(data.vocab), data.num_labels, seed=0)
    cfg = TrainConfig(lr=1e-3, warmup_steps=2, max_steps=8, lr_schedule="cosine", batch_size=16)
    trainer = Trainer(model, data, cfg, torch.device("cpu"))
    lrs = []
    for batch in islice(iterate_batches(data.train, data.num_labels, 16, shuffle=False), 8):
        assert trainer.train_step(batch)
        lrs.append(trainer.opts[0].param_groups[0]["lr"])
    cosine = [1e-3 * 0.5 * (1 + math.cos(math.pi * k / 8)) for k in range(2, 8)]
    assert lrs == pytest.approx([5e-4, 1e-3] + cosine)      # the warm-up, then from step 3 the cosine
    assert all(sparse["lr"] == lrs[-1] for opt in trainer.opts for sparse in opt.param_groups)


def test_the_cosine_schedule_follows_the_time_budget_when_it_is_further_along(data):
    model = build_model(cfg_of([["conv1", 0]]), len(data.vocab), data.num_labels, seed=0)
    trainer = Trainer(model, data, TrainConfig(lr=1e-3, max_epochs=1000, max_minutes=1.0, lr_schedule="cosine"),
                      torch.device("cpu"))
    now = time.monotonic()
    trainer.start, trainer.deadline = now - 30.0, now + 30.0   # half the minute gone, no step taken
    assert trainer.budget_used() == pytest.approx(0.5, abs=0.01)
    trainer.set_lr()
    assert trainer.opts[0].param_groups[0]["lr"] == pytest.approx(5e-4, rel=0.05)
    with pytest.raises(ValueError, match="unknown lr_schedule 'linear'"):
        TrainConfig.from_dict({"lr_schedule": "linear"})


@pytest.mark.parametrize("min_steps, steps", [(None, 1), (6, 6)])
def test_the_time_limit_ends_no_training_before_min_steps(data, min_steps, steps):
    model = build_model(cfg_of([["conv1", 0]]), len(data.vocab), data.num_labels, seed=0)
    cfg = TrainConfig(max_minutes=1e-6, min_steps=min_steps, max_steps=20, eval_every=3, batch_size=16)
    rec = train_model(model, data, cfg, evaluate_test=False).record
    assert rec["steps"] == steps and rec["status"] == "ok"     # the time was up from the first step


def test_best_weights_are_a_copy_and_only_a_strictly_better_p5_replaces_them():
    model = nn.Linear(3, 1)
    best = BestWeights()
    best.update(model, {"P@1": 0.5, "P@5": 0.2}, step=1, epoch=1)
    kept = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    best.update(model, {"P@1": 0.9, "P@5": 0.2}, step=2, epoch=1)       # as good is not better
    assert (best.step, best.stale) == (1, 1) and torch.equal(best.state["weight"], kept)
    best.update(model, {"P@1": 0.1, "P@5": 0.3}, step=3, epoch=2)
    assert (best.step, best.stale, best.figure) == (3, 0, 0.3) and torch.equal(best.state["weight"], model.weight)
    assert best.curve == [[1, 1, 0.5, 0.2], [2, 1, 0.9, 0.2], [3, 2, 0.1, 0.3]] and best.evaluated_at(3)


def test_a_tie_of_the_fused_figure_goes_to_the_better_network():
    """Where the lexical model leaves the network nothing to add, the fused P@5 stays at the lexical
    model's own: the weights kept are then those of the better network, not the first evaluated."""
    model = nn.Linear(3, 1)
    best = BestWeights()
    best.update(model, {"P@1": 0.4, "P@5": 0.22, "fused": {"P@5": 0.7}}, step=1, epoch=1)
    with torch.no_grad():
        model.weight.add_(1.0)
    best.update(model, {"P@1": 0.6, "P@5": 0.30, "fused": {"P@5": 0.7}}, step=2, epoch=1)
    assert (best.step, best.stale, best.figure) == (2, 0, 0.7) and torch.equal(best.state["weight"], model.weight)
    best.update(model, {"P@1": 0.7, "P@5": 0.35, "fused": {"P@5": 0.69}}, step=3, epoch=1)   # the fused one rules
    best.update(model, {"P@1": 0.5, "P@5": 0.25, "fused": {"P@5": 0.7}}, step=4, epoch=1)
    assert (best.step, best.stale) == (2, 2)


def test_the_search_ranks_a_fused_tie_by_the_network_alone():
    flat = {"status": "ok", "rung": 1, "fused": {"valid": {"P@5": 0.7}}}
    weak, strong = ({**flat, "id": i, "fitness": 0.7, "valid": {"P@5": p}} for i, p in ((1, 0.22), (2, 0.31)))
    better_fused = {**flat, "id": 3, "fitness": 0.71, "valid": {"P@5": 0.05}}
    assert [r["id"] for r in ranked([weak, better_fused, strong])] == [3, 2, 1]
    evo = RegularizedEvolution(population_size=2, cycles=0, sample_size=2, seed=0)
    a, b = evo.propose(), evo.propose()
    evo.tell(a.id, 0.7, rung=1, tie=record_tie(weak))
    evo.tell(b.id, 0.7, rung=1, tie=record_tie(strong))
    assert evo.best() is b
    unfused = {"status": "ok", "rung": 1, "fitness": 0.3, "valid": {"P@5": 0.3}}
    assert record_tie(unfused) is None and record_tie({**weak, "short": {"P@5": 0.6}, "rung": 0}) is None


def test_the_network_judge_keeps_the_best_network_and_breaks_its_ties_by_the_fused_figure():
    """--lexical-fitness network: the weights kept are those of the best network alone, whatever the
    fused figure says, and a tie of the network's figure goes to the better fused one."""
    model = nn.Linear(3, 1)
    best = BestWeights(judge="network")
    best.update(model, {"P@1": 0.4, "P@5": 0.22, "fused": {"P@5": 0.71}}, step=1, epoch=1)
    best.update(model, {"P@1": 0.6, "P@5": 0.30, "fused": {"P@5": 0.69}}, step=2, epoch=1)
    assert (best.step, best.figure) == (2, 0.30)
    best.update(model, {"P@1": 0.6, "P@5": 0.30, "fused": {"P@5": 0.70}}, step=3, epoch=1)
    best.update(model, {"P@1": 0.6, "P@5": 0.30, "fused": {"P@5": 0.65}}, step=4, epoch=1)
    assert (best.step, best.stale, best.figure) == (3, 1, 0.30)
    fused_judge = BestWeights()
    for step, v in enumerate([{"P@1": 0.4, "P@5": 0.22, "fused": {"P@5": 0.71}},
                              {"P@1": 0.6, "P@5": 0.30, "fused": {"P@5": 0.69}}], 1):
        fused_judge.update(model, v, step=step, epoch=1)
    assert (fused_judge.step, fused_judge.figure) == (1, 0.71)


def test_a_network_judged_record_ranks_by_the_network_and_ties_by_the_fused_figure():
    genotype = Genotype([("conv1", 0)])
    trained = {"status": "ok", "valid": {"P@5": 0.31}, "fused": {"valid": {"P@5": 0.46}}, "rung": 1}
    cands = [Candidate(i, genotype) for i in range(3)]
    recs = [result_record(c, TaskResult(str(c.id), "ok", None, None, "cpu", 1.0, 1), None, None, "network")
            for c in cands]
    for rec, (net, fused) in zip(recs, ((0.31, 0.46), (0.31, 0.47), (0.35, 0.44))):
        rec.update({**trained, "valid": {"P@5": net}, "fused": {"valid": {"P@5": fused}}})
        rec["fitness"] = fitness(rec, "network")
    assert [r["judge"] for r in recs] == ["network"] * 3 and [r["fitness"] for r in recs] == [0.31, 0.31, 0.35]
    assert [r["id"] for r in ranked(recs)] == [2, 1, 0]          # by the network, a tie by the fused figure
    assert record_tie(recs[1]) == 0.47 and fitness(recs[1]) == 0.47   # the fused judge would take the fused one
    assert validation_figure({"P@5": 0.3, "fused": {"P@5": 0.5}}, "network") == 0.3


def test_gradient_clipping_follows_the_recent_norms_as_attentionxml_does():
    """Clip to factor x the largest of the last 5 norms (each bounded by 1): none of the first 5 is
    clipped, since the queue starts with infinity; the sixth is clipped to 5 x 1."""
    w = nn.Parameter(torch.zeros(4))
    clip = GradientClipper(5.0)
    norms = []
    for _ in range(6):
        w.grad = torch.full((4,), 5.0)                               # norm 10
        norms.append(clip([w]))
        assert norms[-1] == pytest.approx(10.0)
    assert float(w.grad.norm()) == pytest.approx(5.0)
    w.grad = torch.full((4,), 5.0)
    assert math.isnan(GradientClipper(None)([w])) and float(w.grad.norm()) == 10.0    # off: untouched
