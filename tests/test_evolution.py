"""Regularized evolution on a cheap synthetic fitness."""
import random

import pytest

from xmcnas_fast.evolution import RandomSearch, RegularizedEvolution, make_strategy
from xmcnas_fast.space import MUTATIONS, Genotype


def fitness(g: Genotype) -> float:
    """Synthetic: rewards recurrent nodes and depth, with a deterministic per-architecture jitter."""
    rnn = sum(op in ("bilstm", "bigru") for op, _ in g.nodes)
    jitter = random.Random(g.hash()).random() * 0.1
    return rnn / 6 + 0.02 * g.depth + jitter


def run(strategy, workers=1, score=lambda c: fitness(c.genotype), proposed_after=None):
    """Drive a strategy with `workers` candidates in flight, finishing the oldest first.
    `proposed_after[id]`: how many candidates had been reported when `id` was proposed."""
    in_flight = []
    while not strategy.done:
        while len(in_flight) < workers:
            c = strategy.propose()
            if c is None:
                break
            if proposed_after is not None:
                proposed_after[c.id] = len(strategy.history)
            if c.reused_from is not None:
                strategy.tell(c.id, c.fitness)
            else:
                in_flight.append(c)
        if in_flight:
            c = in_flight.pop(0)
            strategy.tell(c.id, score(c))
    return strategy.history


def record_tournaments(evo):
    """Wrap the strategy's generator so that the S draws of each tournament can be read back:
    returns a list that holds the draws made since it was last cleared (the tournament's come first)."""
    draws = []
    choice = evo.rng.choice

    def recording_choice(seq):
        x = choice(seq)
        draws.append(x)
        return x

    evo.rng.choice = recording_choice
    return draws


def test_budget_population_and_aging():
    evo = RegularizedEvolution(population_size=8, cycles=30, sample_size=3, seed=1)
    history = run(evo)
    assert len(history) == 38 and evo.proposed == 38
    assert len(evo.population) == 8
    assert list(evo.population) == history[-8:]          # the survivors are the 8 youngest
    assert all(c.parent is None and c.mutation is None for c in history[:8])     # initial population: random
    # one worker: nothing is ever in flight when a child is bred, so every later candidate is a mutation
    assert all(c.parent is not None and c.mutation in MUTATIONS for c in history[8:])
    assert all(c.stands_in_for is None for c in history)


def test_parent_is_the_best_of_the_tournament():
    evo = RegularizedEvolution(population_size=10, cycles=40, sample_size=4, seed=2)
    draws = record_tournaments(evo)
    checked = 0
    while not evo.done:
        draws.clear()
        c = evo.propose()
        if c.parent is not None:
            sample = draws[:4]
            assert all(s in evo.population for s in sample)
            assert evo.candidates[c.parent].fitness == max(s.fitness for s in sample)
            checked += 1
        evo.tell(c.id, fitness(c.genotype) if c.reused_from is None else c.fitness)
    assert checked >= 35


def test_children_are_valid_single_mutations_of_their_parent():
    evo = RegularizedEvolution(population_size=10, cycles=60, sample_size=5, seed=3, max_depth=6)
    run(evo)
    for c in evo.history:
        c.genotype.validate(max_depth=6)
        if c.parent is not None:
            p = evo.candidates[c.parent].genotype
            assert c.genotype.hash() != p.hash()
            if c.mutation == "add":
                assert c.genotype.nodes[:-1] == p.nodes
            else:
                assert c.genotype.depth == p.depth
                assert sum(a != b for a, b in zip(c.genotype.nodes, p.nodes)) == 1


def test_same_seed_same_history_different_seed_different():
    def hashes(seed):
        return [c.genotype.hash() for c in run(RegularizedEvolution(10, 30, 4, seed=seed))]

    assert hashes(7) == hashes(7)
    assert hashes(7) != hashes(8)


def test_asynchronous_workers_keep_budget_and_breed_early():
    evo = RegularizedEvolution(population_size=6, cycles=20, sample_size=3, seed=4)
    proposed_after = {}
    history = run(evo, workers=4, proposed_after=proposed_after)
    assert len(history) == 26
    assert len({c.id for c in history}) == 26
    # breeding starts once the first candidates are back, not once the whole population is
    first_child = min(c.id for c in history if c.parent is not None)
    assert first_child == 6 and 1 <= proposed_after[first_child] < 6


def test_breeds_from_the_first_reported_member_and_waits_when_none_is_back():
    evo = RegularizedEvolution(population_size=3, cycles=5, sample_size=2, seed=0)
    initial = [evo.propose() for _ in range(3)]
    assert all(c.parent is None for c in initial)
    assert evo.propose() is None                         # the whole population is in flight
    evo.tell(initial[1].id, 0.3)
    child = evo.propose()
    assert child.id == 3 and child.parent == initial[1].id


def test_no_architecture_is_trained_twice():
    # a tiny space (one layer: 8 networks) forces collisions: they are redrawn, then reused
    evo = RegularizedEvolution(population_size=3, cycles=20, sample_size=2, seed=5, max_depth=1, max_redraws=5)
    history = run(evo)
    trained = [c.genotype.hash() for c in history if c.reused_from is None]
    assert len(trained) == len(set(trained))
    reused = [c for c in history if c.reused_from is not None]
    assert reused, "with 8 possible networks and 23 candidates some must be reused"
    for c in reused:
        prior = evo.candidates[c.reused_from]
        assert prior.genotype.hash() == c.genotype.hash() and c.fitness == prior.fitness


def test_constraint_keeps_first_node_in_constrained_lineages():
    evo = RegularizedEvolution(population_size=10, cycles=40, sample_size=3, seed=6,
                               constraint=("bilstm", 0), constraint_fraction=0.5)
    run(evo)
    constrained = [c for c in evo.history if c.constrained]
    assert 0 < len([c for c in evo.history[:10] if c.constrained]) < 10
    assert all(c.genotype.nodes[0] == ("bilstm", 0) for c in constrained)


def test_a_failed_candidate_wins_only_a_tournament_of_failed_ones():
    # two candidates in three fail: both cases come up, failed members losing to a trained one and
    # tournaments drawn from failed members alone (a sample is drawn with replacement, so this happens)
    evo = RegularizedEvolution(population_size=5, cycles=40, sample_size=2, seed=0)
    draws = record_tournaments(evo)
    lost, won = 0, 0
    while not evo.done:
        draws.clear()
        c = evo.propose()
        if c.parent is not None:
            sample, parent = draws[:2], evo.candidates[c.parent]
            if parent.fitness is None:
                assert all(s.fitness is None for s in sample)
                won += 1
            lost += any(s.fitness is None for s in sample) and parent.fitness is not None
        ok = c.id % 3 == 0
        evo.tell(c.id, c.fitness if c.reused_from is not None else fitness(c.genotype) if ok else None)
    assert lost > 0 and won > 0


def test_evolution_beats_random_search_on_the_synthetic_fitness():
    def best(strategy):
        run(strategy)
        return strategy.best().fitness

    seeds = range(8)
    evo = sum(best(RegularizedEvolution(10, 60, 5, seed=s)) for s in seeds) / len(seeds)
    rnd = sum(best(RandomSearch(10, 60, seed=s)) for s in seeds) / len(seeds)
    assert evo > rnd


def test_random_strategy_and_errors():
    rs = make_strategy("random", population_size=4, cycles=6, seed=0)
    history = run(rs)
    assert len(history) == 10 and all(c.parent is None for c in history)
    assert rs.population == history
    assert rs.parents == []     # every draw is random: no bundle is kept for a child to come
    with pytest.raises(ValueError):
        make_strategy("annealing")
    with pytest.raises(ValueError, match="told twice"):
        rs.tell(history[0].id, 0.5)


def test_misspelled_or_inapplicable_settings_are_refused():
    with pytest.raises(TypeError, match="sampel_size"):
        make_strategy("evolution", population_size=4, cycles=2, sampel_size=2)
    with pytest.raises(TypeError, match="sample_size"):
        make_strategy("random", population_size=4, cycles=2, sample_size=2)


@pytest.mark.parametrize("sample", [0, 5])
def test_sample_must_fit_the_population(sample):
    with pytest.raises(ValueError, match=f"sample size \\({sample}\\).*population \\(4\\)"):
        RegularizedEvolution(population_size=4, cycles=2, sample_size=sample)
    RegularizedEvolution(population_size=4, cycles=2, sample_size=4)


def test_a_child_whose_mutations_are_all_in_flight_is_a_recorded_random_stand_in():
    # one parent, and nothing reported after it: its children stay in flight until its whole
    # neighbourhood (at most 23 networks for max_depth 2) is taken, then random draws stand in
    evo = RegularizedEvolution(population_size=1, cycles=40, sample_size=1, seed=0, max_depth=2)
    first = evo.propose()
    evo.tell(first.id, 0.5)
    proposed = [evo.propose() for _ in range(30)]
    children = [c for c in proposed if c.parent is not None]
    stand_ins = [c for c in proposed if c.stands_in_for is not None]
    assert len(children) + len(stand_ins) == 30 and len(stand_ins) >= 30 - 23
    assert all(c.parent == first.id and c.reused_from is None for c in children)
    assert all(c.stands_in_for == first.id and c.parent is None and c.mutation is None for c in stand_ins)
    assert len({c.genotype.hash() for c in [first, *proposed]}) == 31     # nothing proposed twice


def test_stand_ins_keep_the_budget_under_many_workers():
    evo = RegularizedEvolution(population_size=4, cycles=40, sample_size=2, seed=3, max_depth=2, max_redraws=3)
    history = run(evo, workers=8)
    assert len(history) == 44 and len({c.id for c in history}) == 44
    stand_ins = [c for c in history if c.stands_in_for is not None]
    assert stand_ins, "a small space and eight workers must collide with candidates in flight"
    assert all(c.parent is None and c.mutation is None and c.stands_in_for < c.id for c in stand_ins)
