"""Regularized evolution on a cheap synthetic fitness."""
import random

import pytest

from xmcnas_fast.evolution import RandomSearch, RegularizedEvolution, make_strategy
from xmcnas_fast.space import Genotype


def fitness(g: Genotype) -> float:
    """Synthetic: rewards recurrent nodes and depth, with a deterministic per-architecture jitter."""
    rnn = sum(op in ("bilstm", "bigru") for op, _ in g.nodes)
    jitter = random.Random(g.hash()).random() * 0.1
    return rnn / 6 + 0.02 * g.depth + jitter


def run(strategy, workers=1):
    """Drive a strategy with `workers` candidates in flight, finishing the oldest first."""
    in_flight = []
    while not strategy.done:
        while len(in_flight) < workers:
            c = strategy.propose()
            if c is None:
                break
            if c.reused_from is not None:
                strategy.report(c.id, c.fitness)
            else:
                in_flight.append(c)
        if in_flight:
            c = in_flight.pop(0)
            strategy.report(c.id, fitness(c.genotype))
    return strategy.history


def test_budget_population_and_aging():
    evo = RegularizedEvolution(population_size=8, cycles=30, sample_size=3, seed=1)
    history = run(evo)
    assert len(history) == 38 and evo.proposed == 38
    assert len(evo.population) == 8
    assert list(evo.population) == history[-8:]          # the survivors are the 8 youngest
    assert all(c.parent is None for c in history[:8])     # initial population: random
    assert all(c.parent is not None or c.reused_from is not None or c.mutation is None for c in history[8:])


def test_parent_is_the_best_of_the_tournament():
    evo = RegularizedEvolution(population_size=10, cycles=40, sample_size=4, seed=2)
    draws = []
    choice = evo.rng.choice

    def recording_choice(seq):
        x = choice(seq)
        draws.append(x)
        return x

    evo.rng.choice = recording_choice
    in_flight = None
    checked = 0
    while not evo.done:
        draws.clear()
        c = evo.propose()
        if c.parent is not None:
            sample = draws[:4]                                # the tournament's 4 draws come first
            assert all(s in evo.population for s in sample)
            assert evo.candidates[c.parent].fitness == max(s.fitness for s in sample)
            checked += 1
        evo.report(c.id, fitness(c.genotype) if c.reused_from is None else c.fitness)
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
    history = run(evo, workers=4)
    assert len(history) == 26
    assert len({c.id for c in history}) == 26


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


def test_failed_candidates_are_never_parents_while_others_exist():
    evo = RegularizedEvolution(population_size=5, cycles=20, sample_size=5, seed=9)
    failed = set()
    while not evo.done:
        c = evo.propose()
        if c.parent is not None:
            assert c.parent not in failed or all(p.fitness is None for p in evo.population)
        ok = c.id % 3 != 0
        if not ok:
            failed.add(c.id)
        evo.report(c.id, fitness(c.genotype) if ok else None)


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
    with pytest.raises(ValueError):
        make_strategy("annealing")
    with pytest.raises(ValueError):
        rs.report(history[0].id, 0.5)
