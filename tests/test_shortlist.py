"""Heads over a per-document label shortlist (docs/design.md, "Extreme label spaces"): the stage's
shortlists (recall, padding), forced positives, the switch between dense and shortlisted heads,
training and evaluating over a shortlist, bundles that carry one, no [B, L] tensor on that path, and
above a label count label centroids with the training split's lists from the stage's own model."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch
from torch.utils._python_dispatch import TorchDispatchMode

pytest.importorskip("napkinxc", reason="napkinXC (a dependency) is not installed on this machine")

from xmcnas_fast import ops
from xmcnas_fast.bundle import load_bundle, save_bundle
from xmcnas_fast.config import make_config, resolve_shortlist
from xmcnas_fast.lexical import Fusion, LexicalSettings, TreeSettings, cached_stage, stage_data
from xmcnas_fast.lexical.centroids import LabelCentroids, row_topk, top_per_row
from xmcnas_fast.lexical.shortlist import force_positives, shortlist_recall, shortlist_size, slot_targets
from xmcnas_fast.lexical.stage import LARGE_LABELS, LexicalStage, cache_key
from xmcnas_fast.metrics import MetricAccumulator, compute_metrics, shortlist_metric_sums
from xmcnas_fast.model import ModelConfig, build_model
from xmcnas_fast.space import Genotype
from xmcnas_fast.train import LexicalLists, TrainConfig, Trainer, evaluate, label_inv_propensity, train_model

K = 12


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(debtags_slice, cache):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=24, valid=40, cache_dir=cache)


@pytest.fixture(scope="module")
def stage(data, cache):
    settings = LexicalSettings(tree=TreeSettings(max_leaves=20), top_k=5, shortlist=K)
    return cached_stage(data, settings, cache_dir=cache, threads=1)


@pytest.fixture(scope="module")
def lists(stage):
    return LexicalLists.from_stage(stage.folder)


def csr(rows, width):
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.concatenate([np.asarray(r, dtype=np.int32) for r in rows]) if rows else np.zeros(0, np.int32)
    return sp.csr_matrix((np.ones(len(indices), np.float32), indices, indptr), shape=(len(rows), width))


def shortlisted_model(data, k=K, fc=(16,), dropout=0.5):
    mcfg = ModelConfig(genotype=Genotype((("conv3", 0),), "sum").to_dict(), emb_dim=16, width=16, fc=list(fc),
                       shortlist=k, dropout=dropout, dropout_emb=0.0 if dropout == 0 else 0.2)
    return mcfg, build_model(mcfg, len(data.vocab), data.num_labels, seed=0)


# ---- the shortlist ---------------------------------------------------------------------------------

def test_recall_is_the_share_of_every_true_label_found():
    ids = np.array([[1, 2, -1], [0, 3, 4]])
    truth = csr([[1, 5], [3]], 9)                       # label 5: true, never shortlisted (an unseen one)
    assert shortlist_recall(ids, truth) == pytest.approx(2 / 3)
    np.testing.assert_array_equal(slot_targets(ids, truth), [[1, 0, 0], [0, 1, 0]])


def test_forced_positives_replace_the_lowest_ranked_candidates_and_padding_stays():
    ids = np.array([[5, 1, 7, -1, -1], [5, 6, 7, 3, 0], [4, 3, 2, 1, 0]])
    truth = csr([[2, 1, 9], [1, 2], [5, 6, 7, 8, 9, 0]], 10)
    out = force_positives(ids, truth, num_labels=9)      # 9 is a label the model never saw: not forced in
    np.testing.assert_array_equal(out[0], [5, 1, 7, -1, 2])           # the last padding slot took label 2
    np.testing.assert_array_equal(out[1], [5, 6, 7, 2, 1])            # 3 and 0, the lowest, gave way
    assert sorted(out[2].tolist()) == [0, 5, 6, 7, 8]                  # K true labels kept, 0 where it was
    assert out[2][4] == 0
    for r in range(3):                                                  # every (seen) true label is in
        true = {int(t) for t in truth[r].indices if t < 9}
        assert true <= set(out[r].tolist()) or len(true) > 5


def test_the_stage_keeps_shortlists_of_every_split_that_start_with_its_top_lists(stage, data):
    for split in ("train", "valid", "test"):
        s = stage.split_shortlist(split)
        assert s.dtype == np.int32 and s.shape == (len(getattr(data, split)), K)
        assert ((s >= -1) & (s < data.num_labels)).all()
        real = s[s >= 0]
        assert len(real)
        for row in s[:20]:                                        # best first, no label twice
            r = row[row >= 0]
            assert len(set(r.tolist())) == len(r)
    for split in ("valid", "test"):
        ids, _ = stage.split_topk(split)
        np.testing.assert_array_equal(ids, stage.split_shortlist(split)[:, : ids.shape[1]])
    # the training split's are cross-fitted: a tree that saw the document finds more of its labels
    full = stage_data(data)                                       # the stage reads the texts uncut
    seen = stage.topk_tokens(full.train.token_ids, full.train.offsets, K)[0]
    assert shortlist_recall(seen, data.train.labels) > shortlist_recall(stage.split_shortlist("train"),
                                                                         data.train.labels)


def test_a_fold_tree_keeps_the_label_hierarchy_it_is_given(stage, data, tmp_path):
    from xmcnas_fast.lexical.tree import LabelTree

    full = stage_data(data)
    X = stage.features.transform(full.train.token_ids, full.train.offsets)
    given = f"{stage.folder}/tree/tree.txt"
    fold = LabelTree(str(tmp_path / "fold"), stage.settings.tree, threads=1, structure=given).fit(
        X[::2], full.train.labels[::2])
    assert (tmp_path / "fold" / "tree.txt").read_text() == open(given).read()
    ids, probs = fold.topk(X[1::2], K)
    assert (ids[:, 0] >= 0).all() and (np.diff(probs, axis=1) <= 1e-6).all()     # best first


def test_a_short_tree_pads_the_shortlist_with_minus_one(data, cache):
    many = LexicalSettings(tree=TreeSettings(max_leaves=20), top_k=5, shortlist=data.num_labels + 7)
    s = cached_stage(data, many, cache_dir=cache, threads=1).split_shortlist("valid")
    assert s.shape[1] == data.num_labels + 7
    assert (s[:, -7:] == -1).all()                               # more slots than labels: padding at the end
    assert shortlist_recall(s, data.valid.labels) == pytest.approx(
        data.valid.labels[:, : data.num_labels].nnz / data.valid.labels.nnz)


def test_the_switch_picks_a_shortlist_above_the_label_count():
    assert shortlist_size(1000, 50_000, 670_091) == 1000
    assert shortlist_size(1000, 50_000, 50_000) == 0 and shortlist_size(1000, 50_000, 566) == 0
    assert shortlist_size(100, 0, 566) == 100
    cfg = make_config("demo", overrides={"lexical": {"shortlist_above": 500, "shortlist_k": 64}})
    assert resolve_shortlist(cfg, 566) == 64 and cfg["model"]["shortlist"] == 64
    assert resolve_shortlist(make_config("demo"), 566) == 0
    with pytest.raises(ValueError, match="--no-lexical"):
        resolve_shortlist(make_config("demo", overrides={"lexical": {"enabled": False, "shortlist_above": 0}}), 566)
    with pytest.raises(ValueError, match="residual"):
        resolve_shortlist(make_config("demo", overrides={"lexical": {"mode": "residual", "shortlist_above": 0}}), 9)


def test_cli_train_switches_to_a_shortlist_above_the_flag(debtags_slice, tmp_path, monkeypatch):
    from xmcnas_fast.cli import main

    monkeypatch.setenv("XMCNAS_CACHE", str(tmp_path / "cache"))
    common = ["train", "--arch", "attentionxml", "--dataset", debtags_slice, "--valid", "40", "--max-len", "24",
              "--width", "16", "--emb-dim", "16", "--fc", "16", "--max-steps", "2", "--eval-every", "2", "--quiet",
              "--shortlist-k", "10"]
    assert main(common + ["--out", str(tmp_path / "dense"), "--shortlist-above", "100000"]) == 0
    assert main(common + ["--out", str(tmp_path / "short"), "--shortlist-above", "0"]) == 0
    dense, short = load_bundle(str(tmp_path / "dense")), load_bundle(str(tmp_path / "short"))
    assert dense.shortlist == 0 and dense.lexical is None and dense.config["model"]["shortlist"] == 0
    assert short.shortlist == 10 and short.lexical is not None and short.config["model"]["shortlist"] == 10
    assert set(short.metrics["shortlist"]["recall"]) == {"train", "valid", "test"}


# ---- training and evaluating over a shortlist ------------------------------------------------------

def test_training_a_few_steps_over_a_shortlist_lowers_its_loss(data, lists):
    from xmcnas_fast.data import make_batch

    _, model = shortlisted_model(data, dropout=0.0)
    trainer = Trainer(model, data, TrainConfig(lr=1e-2), torch.device("cpu"), lexical=lists)
    batch = make_batch(data.train, np.arange(32), data.num_labels, 24, dense_labels=False)
    assert batch.labels is None
    first = trainer.shortlist_loss(batch).item()
    for _ in range(40):            # the tree's shortlists vary a little from fit to fit: room to spare
        trainer.update(trainer.shortlist_loss(batch))
    last = trainer.shortlist_loss(batch).item()
    assert last < 0.6 * first
    grad_kinds = {n: p.grad.is_sparse for n, p in model.named_parameters() if p.grad is not None}
    assert grad_kinds["head.attention"] and not grad_kinds["head.label_bias"]   # only the rows used


def test_metrics_over_a_shortlist_that_covers_every_label_are_the_dense_metrics():
    g = torch.Generator().manual_seed(0)
    B, L = 30, 17
    scores = torch.randn(B, L, generator=g)
    truth = csr([np.random.default_rng(r).choice(L + 3, size=1 + r % 4, replace=False) for r in range(B)], L + 3)
    inv_prop = torch.rand(L + 3, generator=g, dtype=torch.float64) + 1.0
    perm = torch.stack([torch.randperm(L, generator=g) for _ in range(B)])          # every label, any order
    indptr, indices = torch.from_numpy(truth.indptr.astype(np.int64)), torch.from_numpy(truth.indices.astype(np.int64))
    dense_sums, dense_top = ops.topk_metrics_reference(scores, indptr, indices, 5, inv_prop)
    short_sums, short_top = shortlist_metric_sums(scores.gather(1, perm), perm, indptr, indices, 5, inv_prop)
    torch.testing.assert_close(short_sums, dense_sums)
    torch.testing.assert_close(short_top, dense_top)
    # a shortlist that misses labels never hits them, and they still count in the denominators
    cut = torch.where(perm < 5, torch.full_like(perm, -1), perm)
    acc = MetricAccumulator(5, inv_prop.numpy())
    acc.update(scores.gather(1, perm), truth, cut)
    assert 0 < acc.result()["P@1"] <= 1 and acc.rows == B


def test_evaluation_over_a_shortlist_of_every_label_equals_dense_evaluation(data, lists):
    _, model = shortlisted_model(data, k=data.num_labels)
    rng = np.random.default_rng(0)
    every = np.stack([rng.permutation(data.num_labels) for _ in range(len(data.valid))])
    inv_prop = label_inv_propensity(data)
    dense = evaluate(model, data.valid, data.num_labels, inv_prop=inv_prop, batch_size=16)
    short = evaluate(model, data.valid, data.num_labels, inv_prop=inv_prop, batch_size=16, shortlist=every)
    for name in ("P@1", "P@3", "P@5", "nDCG@5", "PSP@5"):
        assert short[name] == pytest.approx(dense[name], abs=1e-9), name
    assert short["shortlist_recall"] == pytest.approx(
        data.valid.labels[:, : data.num_labels].nnz / data.valid.labels.nnz)
    # fused with the lexical top lists, slot by slot: the weighted fusion the dense path picks
    fd = evaluate(model, data.valid, data.num_labels, inv_prop=inv_prop, batch_size=16, lexical=lists.valid)["fused"]
    fs = evaluate(model, data.valid, data.num_labels, inv_prop=inv_prop, batch_size=16, lexical=lists.valid,
                  shortlist=every)["fused"]
    assert fs["fusion"] == fd["fusion"] and fs["P@5"] == pytest.approx(fd["P@5"], abs=1e-9)


@pytest.fixture(scope="module")
def trained(data, lists, tmp_path_factory):
    mcfg, model = shortlisted_model(data)
    rec = train_model(model, data, TrainConfig(max_steps=6, eval_every=3, batch_size=16), lexical=lists).record
    return mcfg, model, rec


def test_a_shortlisted_training_records_its_recall_per_split(trained, lists, data):
    _, _, rec = trained
    assert rec["status"] == "ok" and rec["shortlist"]["k"] == K
    for split in ("train", "valid", "test"):
        assert rec["shortlist"]["recall"][split] == pytest.approx(
            shortlist_recall(lists.shortlists[split], getattr(data, split).labels), abs=1e-6)
    assert rec["valid"]["shortlist_recall"] == pytest.approx(rec["shortlist"]["recall"]["valid"], abs=1e-6)
    assert set(rec["fused"]) == {"valid", "test", "fusion"}


def test_a_shortlisted_bundle_saves_loads_and_predicts_from_its_shortlist(trained, stage, data, tmp_path):
    mcfg, model, rec = trained
    with pytest.raises(ValueError, match="needs the lexical stage"):
        save_bundle(str(tmp_path / "no-stage"), model, mcfg, data, record=rec)
    path = save_bundle(str(tmp_path / "b"), model, mcfg, data, record=rec, lexical=stage.folder,
                       fusion=Fusion.from_dict(rec["fused"]["fusion"]))
    b = load_bundle(path)
    assert b.shortlist == K and b.config["model"]["shortlist"] == K
    texts = [" ".join(data.vocab.itos[t] for t in data.test.tokens(i)) for i in range(6)]
    preds = b.predict(texts, k=3)
    shortlists, _ = stage.topk(texts, K)
    scores = b.predict_scores(texts)
    for i, p in enumerate(preds):
        assert len(p) == 3
        names = [b.label_names[j] for j in shortlists[i] if j >= 0]
        assert all(n in names for n, _ in p)                     # only shortlisted labels are ranked
        outside = np.setdiff1d(np.arange(len(b.label_names)), shortlists[i])
        assert (scores[i, outside] == 0).all()
        assert scores[i, b.label_names.index(p[0][0])] == pytest.approx(p[0][1], abs=1e-6)


# ---- no [B, L] tensor above the switch -------------------------------------------------------------

class Shapes(TorchDispatchMode):
    """Every shape an op of the dispatcher produces."""

    def __init__(self):
        super().__init__()
        self.seen = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor):
                self.seen.append((str(func), tuple(t.shape)))
        return out


def test_no_batch_by_label_tensor_is_made_over_a_shortlist(data, lists):
    L = data.num_labels
    _, model = shortlisted_model(data, k=8)
    B = 13
    assert B not in (L, 8, 16) and L not in (B, 8, 16, 24)
    trainer = Trainer(model, data, TrainConfig(batch_size=B, eval_batch_size=B), torch.device("cpu"), lexical=lists)
    from xmcnas_fast.data import make_batch

    batch = make_batch(data.train, np.arange(B), L, 24, dense_labels=False)
    with Shapes() as shapes:
        trainer.update(trainer.shortlist_loss(batch))
        evaluate(model, data.valid, L, batch_size=B, lexical=lists.valid, shortlist=lists.shortlists["valid"][:, :8])
    n_valid = len(data.valid)
    wide = [(f, s) for f, s in shapes.seen if L in s and any(d in s for d in (B, n_valid))]
    assert not wide, wide[:5]
    assert any(s == (B, 8) for _, s in shapes.seen)             # the head's scores: [B, K]


@pytest.mark.slow
def test_a_search_above_the_switch_trains_and_serves_shortlisted_networks(debtags_slice, tmp_path, monkeypatch,
                                                                         capsys):
    from xmcnas_fast.cli import main
    from xmcnas_fast.runs import Run

    monkeypatch.setenv("XMCNAS_CACHE", str(tmp_path / "cache"))
    assert main(["search", "--dataset", debtags_slice, "--runs-dir", str(tmp_path), "--name", "s",
                 "--population", "2", "--cycles", "1", "--sample", "1", "--max-depth", "2", "--max-steps", "4",
                 "--eval-every", "2", "--width", "8", "--emb-dim", "8", "--fc", "8", "--max-len", "24",
                 "--valid", "40", "--backend", "inline", "--devices", "cpu", "--plain", "--quiet",
                 "--shortlist-above", "0", "--shortlist-k", "10"]) == 0
    out = capsys.readouterr().out
    run = Run.open(str(tmp_path / "s"))
    assert run.config["model"]["shortlist"] == 10 and run.config["lexical"]["shortlist_above"] == 0
    trained = [r for r in run.history.records if r.get("fitness") is not None]
    assert trained and all(r["shortlist"]["k"] == 10 for r in trained)
    assert run.final()["shortlist"]["k"] == 10
    assert load_bundle(run.best()["model_dir"]).shortlist == 10
    assert "peak memory:" in out and "GiB this process" in out


# ---- above LARGE_LABELS: label centroids, and the training split's lists from the stage's own model -----


@pytest.fixture(scope="module")
def centroid_stage(data, cache):
    """A stage over debtags's labels as "auto" fits one above LARGE_LABELS labels (the switch moved below)."""
    from xmcnas_fast.lexical import stage as stage_module

    with pytest.MonkeyPatch.context() as m:
        m.setattr(stage_module, "LARGE_LABELS", 10)
        settings = LexicalSettings(top_k=5, shortlist=K, centroid_features=16)
        assert settings.matcher_for(data.num_labels) == "centroids" and settings.train_folds(data.num_labels) == 0
        return cached_stage(data, settings, cache_dir=cache, threads=2)


def test_the_switch_takes_centroids_and_the_stage_s_own_lists_above_the_label_count():
    auto = LexicalSettings(shortlist=1000)
    assert auto.matcher_for(LARGE_LABELS) == "tree" and auto.matcher_for(LARGE_LABELS + 1) == "centroids"
    assert auto.train_folds(LARGE_LABELS) == 2 and auto.train_folds(LARGE_LABELS + 1) == 0
    assert LexicalSettings(shortlist=1000, crossfit=3).train_folds(670_091) == 3      # asked for: kept
    assert LexicalSettings().train_folds(566) == 0                                  # no shortlist, no lists
    assert LexicalSettings(matcher="tree").matcher_for(10 ** 6) == "tree"
    assert LexicalSettings(matcher="centroids").matcher_for(5) == "centroids"
    with pytest.raises(ValueError, match="matcher 'knn'"):
        LexicalSettings(matcher="knn")


def test_a_tree_stage_keeps_the_cache_key_it_had_before_there_were_matchers(data):
    import hashlib
    import json

    settings = LexicalSettings(top_k=5, shortlist=K)
    old = {k: v for k, v in settings.to_dict().items() if k not in ("matcher", "centroid_features")}
    payload = {"files": [f["sha256"] for f in data.source.get("files", [])],
               "data": {k: v for k, v in (data.source.get("settings") or {}).items() if k != "max_len"},
               "lexical": old, "format": 1}
    assert cache_key(data, settings) == hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]
    assert cache_key(data, LexicalSettings(top_k=5, shortlist=K, matcher="centroids")) != cache_key(data, settings)


def test_rows_keep_their_largest_entries_best_first():
    A = sp.csr_matrix(np.array([[0.1, 0.5, 0.0, 0.3], [0.0, 0.0, 0.0, 0.0], [0.2, 0.2, 0.9, 0.0]], np.float32))
    np.testing.assert_allclose(top_per_row(A, 2).toarray(),
                                  [[0, 0.5, 0, 0.3], [0, 0, 0, 0], [0.2, 0, 0.9, 0]])
    ids, vals = row_topk(A, 3)
    np.testing.assert_array_equal(ids, [[1, 3, 0], [-1, -1, -1], [2, 0, 1]])
    np.testing.assert_allclose(vals, [[0.5, 0.3, 0.1], [0, 0, 0], [0.9, 0.2, 0.2]])


def test_centroids_rank_a_document_s_labels_by_the_cosine_to_their_documents(tmp_path):
    # labels 0 and 1 have documents on features 0-1 and 2-3; label 2 none
    X = sp.csr_matrix(np.array([[1, 1, 0, 0], [0, 0, 1, 1], [1, 0, 0, 0]], np.float64))
    Y = sp.csr_matrix(np.array([[1, 0, 0], [0, 1, 0], [1, 0, 0]], np.float32))
    c = LabelCentroids(str(tmp_path / "c"), keep=4, threads=1).fit(X, Y)
    ids, probs = c.topk(sp.csr_matrix(np.array([[0, 0, 1, 0], [1, 0, 0, 0]], np.float64)), 3)
    np.testing.assert_array_equal(ids, [[1, -1, -1], [0, -1, -1]])       # no shared feature: not listed
    assert probs[0, 0] == pytest.approx(1 / np.sqrt(2), rel=1e-5)
    assert probs[1, 0] == pytest.approx(2 / np.sqrt(5), rel=1e-5)         # centroid (2, 1, 0, 0) normalised
    again = LabelCentroids(str(tmp_path / "c")).topk(sp.csr_matrix(np.array([[0, 0, 1, 0]], np.float64)), 3)
    np.testing.assert_array_equal(again[0], ids[:1])


def test_the_centroid_stage_ranks_test_labels_above_the_label_prior(centroid_stage, data):
    assert isinstance(centroid_stage.tree, LabelCentroids)
    assert isinstance(LexicalStage.load(centroid_stage.folder).tree, LabelCentroids)     # saved as resolved
    prior = np.argsort(-np.asarray(data.train.labels.sum(0)).ravel())[:K]
    ours = centroid_stage.split_shortlist("test")
    assert shortlist_recall(ours, data.test.labels) > shortlist_recall(np.tile(prior, (ours.shape[0], 1)),
                                                                       data.test.labels) + 0.05


def test_the_training_split_s_shortlists_come_from_the_stage_s_own_model(centroid_stage, data):
    full = stage_data(data)
    own = centroid_stage.topk_tokens(full.train.token_ids, full.train.offsets, K)[0]
    train = centroid_stage.split_shortlist("train")
    np.testing.assert_array_equal(train, own)                    # no fold refits: what the model says
    assert shortlist_recall(train, data.train.labels) > shortlist_recall(centroid_stage.split_shortlist("test"),
                                                                         data.test.labels)
    forced = force_positives(train[:50], data.train.labels[:50], data.num_labels)
    for r in range(50):                                          # every true label in, padding kept
        true = data.train.labels.indices[data.train.labels.indptr[r]:data.train.labels.indptr[r + 1]]
        assert set(true[: K].tolist()) <= set(forced[r].tolist()) or len(true) > K
        assert (forced[r] == -1).sum() <= (train[r] == -1).sum()
    assert slot_targets(forced, data.train.labels[:50]).sum() == min(
        data.train.labels[:50].nnz, sum(min(K, n) for n in np.diff(data.train.labels[:50].indptr)))


def test_a_document_that_shares_no_feature_with_any_centroid_gets_no_label(centroid_stage):
    unk = np.array([1, 1], dtype=np.int64)                                       # <unk> <unk>
    X = centroid_stage.features.transform(unk, np.array([0, 2], dtype=np.int64))
    assert X.nnz == 0
    ids, probs = centroid_stage.tree.topk(X, K)
    assert (ids == -1).all() and (probs == 0).all()


def test_equal_scores_over_a_shortlist_rank_in_the_lists_own_order():
    # the lexical stage's probabilities saturate at 1: a ranked list with ties is scored as ranked
    B, K, L = 64, 6, 40
    slots = torch.stack([torch.randperm(L, generator=torch.Generator().manual_seed(r))[:K] for r in range(B)])
    scores = torch.tensor([1.0, 1.0, 1.0, 0.5, 0.5, 0.1]).repeat(B, 1)
    truth = csr([[int(slots[r, 0]), int(slots[r, 3])] for r in range(B)], L)   # the first of each tie is true
    m = compute_metrics(scores, truth, slots=slots, k=5)
    assert m["P@1"] == 1.0
    assert m["P@3"] == pytest.approx(1 / 3)
    assert m["P@5"] == pytest.approx(2 / 5)
    truth_last = csr([[int(slots[r, 2])] for r in range(B)], L)               # the last of the first tie
    assert compute_metrics(scores, truth_last, slots=slots, k=5)["P@1"] == 0.0
