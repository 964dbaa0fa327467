"""The ranker fusion (lexical/ranker.py): a small network over the network's and the lexical stage's
scores and ranks, fitted on the validation split, judged out of fold, saved in a bundle's config."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("napkinxc", reason="napkinXC (a dependency) is not installed on this machine")

from xmcnas_fast.bundle import load_bundle, save_bundle
from xmcnas_fast.lexical import Fusion, LexicalSettings, TreeSettings, cached_stage, choose_fusion, dense_lexical
from xmcnas_fast.lexical.fusion import fused_metrics
from xmcnas_fast.lexical.ranker import (NET_TOP, Ranker, cross_fitted, dense_truth, fit_ranker, label_counts,
                                        lexical_ranks, pair_features)
from xmcnas_fast.metrics import compute_metrics
from xmcnas_fast.model import ModelConfig, build_model
from xmcnas_fast.space import Genotype
from xmcnas_fast.train import LexicalLists, TrainConfig, train_model

SETTINGS = LexicalSettings(tree=TreeSettings(max_leaves=20), top_k=20)


@pytest.fixture(scope="module")
def data(debtags_slice, tmp_path_factory):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=24, valid=150, cache_dir=tmp_path_factory.mktemp("cache"))


@pytest.fixture(scope="module")
def stage(data, tmp_path_factory):
    return cached_stage(data, SETTINGS, cache_dir=tmp_path_factory.mktemp("stage"), threads=1)


def knowing_logits(split, num_labels, seed):
    """A network that knows something of the truth, and is wrong in its own way."""
    g = torch.Generator().manual_seed(seed)
    truth = torch.as_tensor(split.labels[:, :num_labels].toarray(), dtype=torch.float32)
    return 3 * truth + 2.5 * torch.randn(truth.shape, generator=g) - 2


def test_lexical_ranks_are_list_positions_and_unlisted_labels_come_after():
    ids = np.array([[4, 1, -1], [0, 2, 3]])
    r = lexical_ranks(ids, 6, "cpu")
    assert r[0].tolist() == [13, 1, 13, 13, 0, 13]
    assert r[1].tolist() == [0, 13, 1, 2, 13, 13]


def test_candidates_are_the_lexical_list_and_the_networks_top_labels(stage, data):
    ids, probs = stage.split_topk("valid")
    z = knowing_logits(data.valid, data.num_labels, 0)
    p_lex, listed = dense_lexical(ids, probs, data.num_labels, "cpu")
    prior = torch.as_tensor(label_counts(data.train.labels, data.num_labels), dtype=torch.float32)
    cand, feats = pair_features(z, p_lex, listed, lexical_ranks(ids, data.num_labels, "cpu"), prior)
    top = torch.zeros_like(cand)
    top.scatter_(1, torch.topk(z, NET_TOP, dim=1).indices, True)
    assert torch.equal(cand, (listed > 0) | top)
    assert feats.shape == (*z.shape, 9) and torch.isfinite(feats).all()
    truth = dense_truth(data.valid.labels, data.num_labels, "cpu")
    r = fit_ranker(z, p_lex, listed, lexical_ranks(ids, data.num_labels, "cpu"), truth, prior.numpy())
    s = r.scores(z, p_lex, listed, lexical_ranks(ids, data.num_labels, "cpu"))
    assert (s[~cand] == 0).all() and (s[cand] > 0).all() and (s[cand] < 1).all()


def test_the_ranker_fitted_on_validation_beats_both_models_and_the_weight_on_test(stage, data):
    prior = label_counts(data.train.labels, data.num_labels)
    zv, zt = knowing_logits(data.valid, data.num_labels, 1), knowing_logits(data.test, data.num_labels, 2)
    valid = stage.split_topk("valid")
    ranker, m, tried = choose_fusion(zv, *valid, data.valid.labels, methods=("ranker",), prior=prior)
    assert ranker.method == "ranker" and list(tried.values()) == [m["P@5"]]      # its out-of-fold figure
    weight, _, _ = choose_fusion(zv, *valid, data.valid.labels, methods=("weighted",))
    test = {name: compute_metrics(f(zt, *stage.split_topk("test")), data.test.labels)["P@5"]
            for name, f in [("ranker", ranker), ("network", Fusion("weighted", w=0.0)),
                            ("lexical", Fusion("weighted", w=1.0)), ("weight", weight)]}
    assert test["ranker"] > max(test["network"], test["lexical"], test["weight"]), test


def test_the_fusion_chosen_is_the_best_validation_figure_the_rankers_out_of_fold(stage, data):
    prior = label_counts(data.train.labels, data.num_labels)
    z = knowing_logits(data.valid, data.num_labels, 1)
    fusion, m, tried = choose_fusion(z, *stage.split_topk("valid"), data.valid.labels,
                                     methods=("weighted", "ranker"), prior=prior)
    assert len(tried) == 12 and m["P@5"] == max(tried.values())
    assert tried[fusion.describe() + (", out of fold" if fusion.method == "ranker" else "")] == m["P@5"]


def test_out_of_fold_scores_come_from_rankers_that_never_saw_the_document(stage, data):
    ids, probs = stage.split_topk("valid")
    z = knowing_logits(data.valid, data.num_labels, 3)
    p_lex, listed = dense_lexical(ids, probs, data.num_labels, "cpu")
    ranks = lexical_ranks(ids, data.num_labels, "cpu")
    truth = dense_truth(data.valid.labels, data.num_labels, "cpu")
    prior = label_counts(data.train.labels, data.num_labels)
    oof = cross_fitted(z, p_lex, listed, ranks, truth, prior, folds=3)
    rows = torch.arange(len(z)) % 3 == 1
    alone = fit_ranker(z[~rows], p_lex[~rows], listed[~rows], ranks[~rows], truth[~rows], prior)
    torch.testing.assert_close(oof[rows], alone.scores(z[rows], p_lex[rows], listed[rows], ranks[rows]))
    whole = fit_ranker(z, p_lex, listed, ranks, truth, prior).scores(z, p_lex, listed, ranks)
    assert not torch.allclose(oof[rows], whole[rows])          # the whole split's ranker saw them


def test_a_ranker_fusion_round_trips_and_refuses_what_does_not_fit(stage, data):
    prior = label_counts(data.train.labels, data.num_labels)
    z = knowing_logits(data.valid, data.num_labels, 4)
    fusion, _, _ = choose_fusion(z, *stage.split_topk("valid"), data.valid.labels, methods=("ranker",), prior=prior)
    again = Fusion.from_dict(json.loads(json.dumps(fusion.to_dict())))
    assert again == fusion
    torch.testing.assert_close(again(z, *stage.split_topk("valid")), fusion(z, *stage.split_topk("valid")))
    with pytest.raises(ValueError, match="ranker fitted for"):
        fusion(z[:, :-1], *stage.split_topk("valid"))
    with pytest.raises(ValueError, match="without its ranker"):
        Fusion("ranker")
    broken = {**fusion.to_dict()["ranker"], "mean": [0.0]}
    with pytest.raises(ValueError, match="features"):
        Fusion("ranker", ranker=broken)
    with pytest.raises(ValueError, match="needs the lexical top lists' ranks"):
        fusion.fuse(z, *dense_lexical(*stage.split_topk("valid"), data.num_labels, "cpu"))


def small_model(data):
    mcfg = ModelConfig(genotype=Genotype((("conv3", 0),), "sum").to_dict(), emb_dim=16, width=16, fc=[16])
    return mcfg, build_model(mcfg, len(data.vocab), data.num_labels, seed=0)


@pytest.mark.parametrize("rank", [False, True])
def test_a_final_training_chooses_its_fusion_among_weight_and_ranker(stage, data, rank, tmp_path):
    mcfg, model = small_model(data)
    lists = LexicalLists(stage.split_topk("valid"), stage.split_topk("test"), rank=rank)
    rec = train_model(model, data, TrainConfig(max_steps=30, eval_every=15, batch_size=16, lr=1e-2),
                      lexical=lists).record
    assert rec["status"] == "ok"
    fusion = Fusion.from_dict(rec["fused"]["fusion"])
    if not rank:
        assert "tried" not in rec["fused"] and fusion.method == "weighted"
        return
    tried = rec["fused"]["tried"]
    assert len(tried) == 12 and rec["fused"]["valid"]["P@5"] == max(tried.values())
    # the test figures are the chosen fusion's, and a bundle serves it
    test = fused_metrics(torch.logit(torch.as_tensor(_net_probs(model, data))), stage.split_topk("test"),
                         data.test.labels, None, fusion)
    assert test["P@5"] == pytest.approx(rec["fused"]["test"]["P@5"], abs=1e-6)
    path = save_bundle(str(tmp_path / "b"), model, mcfg, data, record=rec, lexical=stage.folder, fusion=fusion)
    b = load_bundle(path)
    assert b.fusion == fusion
    texts = ["a text editor for the terminal", "python library for xml parsing"]
    ids, probs = stage.topk(texts)
    net = load_bundle(path)
    net.lexical = None                                       # the network's own probabilities
    z = torch.logit(torch.as_tensor(net.predict_scores(texts)).double()).float()
    np.testing.assert_allclose(b.predict_scores(texts), fusion(z, ids, probs).numpy(), rtol=1e-4, atol=1e-5)


def _net_probs(model, data):
    from xmcnas_fast.ensemble import split_probs

    return split_probs(model, data.test, data.num_labels, device=torch.device("cpu"), precision="fp32",
                       max_len=24).clamp(1e-6, 1 - 1e-6)
