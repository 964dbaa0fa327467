import json
import random

import pytest

from xmcnas_fast.space import (OPERATIONS, Genotype, input_window, mutate, random_genotype)


def draws(n=3000, seed=0, max_depth=6):
    rng = random.Random(seed)
    return [random_genotype(rng, max_depth) for _ in range(n)], rng


def test_random_genotypes_respect_window_and_depth():
    gs, _ = draws()
    depths = {g.depth for g in gs}
    assert depths == set(range(1, 7))
    ops = {op for g in gs for op, _ in g.nodes}
    assert ops == set(OPERATIONS)
    for g in gs:
        for j, (op, i) in enumerate(g.nodes, start=1):
            assert max(0, j - 5) <= i <= j - 1
    # node 6 can read nodes 1..5 but never the embedding
    assert all(g.nodes[5][1] >= 1 for g in gs if g.depth == 6)
    assert {g.nodes[5][1] for g in gs if g.depth == 6} == {1, 2, 3, 4, 5}


@pytest.mark.parametrize("bad", [
    {"nodes": []},
    {"nodes": [["conv3", 1]]},                     # reads itself
    {"nodes": [["conv2", 0]]},                     # unknown op
    {"nodes": [["conv3", 0]] * 6 + [["conv3", 0]]},  # node 7 cannot read node 0 (window of 5)
    {"nodes": [["conv3", 0]], "merge": "max"},
])
def test_invalid_genotypes_are_refused(bad):
    with pytest.raises(ValueError):
        Genotype.from_dict(bad)


def test_mutations_are_valid_and_never_noops():
    gs, rng = draws(2000, seed=1)
    kinds = set()
    for g in gs:
        child, kind = mutate(g, rng, max_depth=6)
        kinds.add(kind)
        child.validate(max_depth=6)
        assert child.canonical() != g.canonical()
        if kind == "add":
            assert child.depth == g.depth + 1 and child.nodes[:-1] == g.nodes
        else:
            assert child.depth == g.depth
            diff = [j for j in range(g.depth) if child.nodes[j] != g.nodes[j]]
            assert len(diff) == 1
            (j,) = diff
            if kind == "input":
                assert child.nodes[j][0] == g.nodes[j][0] and child.nodes[j][1] != g.nodes[j][1]
            else:
                assert child.nodes[j][1] == g.nodes[j][1] and child.nodes[j][0] != g.nodes[j][0]
    assert kinds == {"input", "operation", "add"}


def test_mutation_at_max_depth_never_adds():
    rng = random.Random(3)
    g = Genotype(tuple(("conv3", j - 1) for j in range(1, 7)))
    for _ in range(200):
        child, kind = mutate(g, rng, max_depth=6)
        assert kind != "add" and child.depth == 6


def test_mutation_respects_frozen_first_node():
    rng = random.Random(4)
    g = Genotype((("bilstm", 0), ("conv3", 1)))
    for _ in range(300):
        child, _ = mutate(g, rng, frozen=1)
        assert child.nodes[0] == ("bilstm", 0)


def test_single_conv_node_can_only_change_op_or_grow():
    rng = random.Random(5)
    g = Genotype((("conv3", 0),))
    seen = {mutate(g, rng)[1] for _ in range(100)}
    assert seen == {"operation", "add"}  # node 1's only possible input is the embedding


def test_canonical_hash_identifies_isomorphic_networks():
    a = Genotype((("conv3", 0), ("bilstm", 0), ("maxpool3", 1)))
    b = Genotype((("bilstm", 0), ("conv3", 0), ("maxpool3", 2)))    # nodes renumbered
    c = Genotype((("conv3", 0), ("bilstm", 0), ("maxpool3", 2)))    # pool reads the LSTM instead
    assert a.hash() == b.hash()
    assert a.hash() != c.hash()
    # the sharing pattern matters: two pools on one conv != one pool on each of two convs
    d = Genotype((("conv3", 0), ("conv3", 0), ("maxpool3", 1), ("maxpool3", 1)))
    e = Genotype((("conv3", 0), ("conv3", 0), ("maxpool3", 1), ("maxpool3", 2)))
    assert d.hash() != e.hash()
    assert Genotype(a.nodes, "concat").hash() != a.hash()


def test_canonical_hash_matches_tree_isomorphism_on_random_draws():
    """Relabelling the nodes of a genotype by any valid topological order keeps its hash."""
    gs, rng = draws(1000, seed=6)
    for g in gs:
        ch = g.children()
        order, frontier = [], list(ch[0])
        while frontier:  # a random topological order of the tree
            v = frontier.pop(rng.randrange(len(frontier)))
            order.append(v)
            frontier += ch[v]
        new_id = {0: 0, **{v: n for n, v in enumerate(order, start=1)}}
        nodes = [None] * g.depth
        for v in order:
            op, i = g.nodes[v - 1]
            nodes[new_id[v] - 1] = (op, new_id[i])
        try:
            h = Genotype(tuple(nodes), g.merge)
        except ValueError:
            continue  # the relabelling broke the window of 5: not in the space
        assert h.hash() == g.hash()


def test_json_round_trip():
    gs, _ = draws(500, seed=7)
    for g in gs:
        again = Genotype.from_json(json.dumps(json.loads(g.to_json())))
        assert again == g and again.hash() == g.hash()


def test_draw_names_every_node_and_weight():
    g = Genotype((("conv3", 0), ("bilstm", 0), ("maxpool3", 1)))
    text = g.draw([0.5, -0.25, 1.0])
    assert text.splitlines()[0] == "0 embedding"
    for j, (op, _) in enumerate(g.nodes, start=1):
        assert f"{j} {op}" in text
    assert "w=-0.250" in text and "weighted sum of nodes 1..3" in text
    assert "3 maxpool3" in text.splitlines()[2]  # drawn under its input, node 1


def test_window_helper():
    assert list(input_window(1)) == [0]
    assert list(input_window(7)) == [2, 3, 4, 5, 6]
