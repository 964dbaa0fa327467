"""The analysis of a search's history, computed (the CLI shows it: tests/test_search.py)."""
import pytest

from xmcnas_fast.analysis import analyze, inheritance


def test_analysis_compares_children_that_inherited_with_those_that_did_not():
    recs = [{"id": 0, "parent": None, "fitness": 0.3},
            {"id": 1, "parent": 0, "fitness": 0.32, "inherited": {"from": 0, "parts": ["embedding"]},
             "steps_to_parent": 100},
            {"id": 2, "parent": 0, "fitness": 0.34, "inherited": {"from": 0, "parts": ["head"]}, "steps_to_parent": 300},
            {"id": 3, "parent": 1, "fitness": 0.28, "inherited": {"from": 1, "parts": []}, "steps_to_parent": None},
            {"id": 4, "parent": 1, "fitness": 0.33, "steps_to_parent": 500}]
    got = inheritance(recs)
    assert got["inherited"] == {"children": 2, "reached": 2, "median_steps": 200, "mean_p5": pytest.approx(0.33)}
    assert got["from scratch"] == {"children": 2, "reached": 1, "median_steps": 500,
                                   "mean_p5": pytest.approx(0.305)}


def test_the_best_are_ranked_as_the_search_ranks_them_and_reused_ones_are_left_out():
    recs = [{"id": 0, "genotype": {"nodes": [["conv3", 0]], "merge": "sum"}, "fitness": 0.5, "rung": 0,
             "layer_weights": [1.0]},
            {"id": 1, "genotype": {"nodes": [["conv1", 0]], "merge": "sum"}, "fitness": 0.3, "rung": 1,
             "layer_weights": [2.0]},
            {"id": 2, "genotype": {"nodes": [["conv1", 0]], "merge": "sum"}, "fitness": 0.3, "rung": 1,
             "reused_from": 1},
            {"id": 3, "genotype": {"nodes": [["conv5", 0]], "merge": "sum"}, "fitness": None}]
    got = analyze(recs)
    assert [r["id"] for r in got.best] == [1, 0]       # a full-budget figure above any short one
    assert got.recorded == 4 and got.importance["nodes"] == 2
    assert got.importance["by_operation"]["conv1"]["mean_weight"] == 2.0
