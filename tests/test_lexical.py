"""The lexical stage: n-gram TF-IDF features, napkinXC's label tree, the stage's cache, fusion with a
network, and bundles that carry a lexical part (moved, corrupt, missing)."""
import json
import os
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

pytest.importorskip("napkinxc", reason="napkinXC (a dependency) is not installed on this machine")

from xmcnas_fast.bundle import load_bundle, save_bundle
from xmcnas_fast.lexical import (FeatureSettings, Fusion, LexicalSettings, LexicalStage, NgramTfidf, TreeSettings,
                                 cached_stage, choose_fusion, dense_lexical, fit_stage, stage_data)
from xmcnas_fast.lexical.fusion import lists_metrics
from xmcnas_fast.lexical.stage import serving_data
from xmcnas_fast.lexical.stage import OVR_MAX_LABELS
from xmcnas_fast.lexical.tree import LabelTree, average_lists, label_lists
from xmcnas_fast.metrics import compute_metrics
from xmcnas_fast.model import ModelConfig, build_model
from xmcnas_fast.space import Genotype
from xmcnas_fast.train import LexicalLists, TrainConfig, train_model

SMALL_TREE = LexicalSettings(tree=TreeSettings(max_leaves=20), top_k=10)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.fixture(scope="module")
def data(debtags_slice, cache):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=24, valid=40, cache_dir=cache)


@pytest.fixture(scope="module")
def stage(data, cache):
    return cached_stage(data, SMALL_TREE, cache_dir=cache, threads=1)


# ---- features --------------------------------------------------------------------------------------

def tokens(*docs):
    offsets = np.cumsum([0] + [len(d) for d in docs])
    return np.concatenate([np.asarray(d, dtype=np.int32) for d in docs]), offsets


def test_features_count_unigrams_and_bigrams_seen_in_min_df_documents():
    ids, off = tokens([2, 3, 4], [2, 3, 5], [6, 1])          # 1 is <unk>: never a feature alone
    f = NgramTfidf(7, FeatureSettings(min_df=2)).fit(ids, off)
    assert f.keys.tolist() == [2, 3, 7 + 2 * 7 + 3]            # 2, 3 and the bigram (2, 3): in two documents
    np.testing.assert_allclose(f.idf, np.log(4 / 3) + 1)
    X = f.transform(ids, off)
    assert X.dtype == np.float64 and X.shape == (3, 3) and X.has_sorted_indices
    np.testing.assert_allclose(np.sqrt(X.multiply(X).sum(1)).A.ravel(), [1, 1, 0])   # an empty row stays 0
    assert np.isfinite(X.data).all()


def test_sublinear_tf_weighs_a_repeated_word_by_one_plus_its_log():
    ids, off = tokens([2, 2, 2, 3], [2, 3])
    f = NgramTfidf(4, FeatureSettings(min_df=1, bigrams=False)).fit(ids, off)
    row = f.transform(*tokens([2, 2, 2, 3])).toarray()[0]
    assert row[0] / row[1] == pytest.approx(1 + np.log(3))


def test_features_round_trip(tmp_path):
    ids, off = tokens([2, 3, 4, 2, 3], [4, 2, 3])
    f = NgramTfidf(5, FeatureSettings(min_df=1, max_features=4)).fit(ids, off)
    f.save(str(tmp_path))
    g = NgramTfidf.load(str(tmp_path))
    assert len(g.keys) == 4 and (g.transform(ids, off) != f.transform(ids, off)).nnz == 0


# ---- the label tree ----------------------------------------------------------------------------------

def test_label_lists_are_sorted_whatever_the_csr_order():
    Y = sp.csr_matrix((np.ones(3), np.array([5, 1, 3]), np.array([0, 3])), shape=(1, 6))
    assert label_lists(Y) == [[1, 3, 5]]


def test_the_stage_ranks_test_labels_far_above_the_label_prior(stage, data):
    ids, probs = stage.split_topk("test")
    assert ids.shape == probs.shape == (len(data.test), 10)
    assert (np.diff(probs, axis=1) <= 1e-6).all()              # best first
    m = compute_metrics(dense_lexical(ids, probs, data.num_labels, "cpu")[0], data.test.labels)
    prior = compute_metrics(np.tile(data.label_counts().astype(np.float32), (len(data.test), 1)), data.test.labels)
    assert m["P@3"] > prior["P@3"] + 0.05 and m["P@5"] > prior["P@5"] + 0.03


def test_the_stage_reads_uncut_texts_in_its_own_vocabulary(stage, data):
    assert data.max_len == 24
    full = stage_data(data)
    assert full.max_len is None and len(stage.vocab) == len(full.vocab) > len(data.vocab) - 1
    ids, _ = stage.topk([" ".join(full.vocab.itos[t] for t in full.test.tokens(0))])
    np.testing.assert_array_equal(ids[0], stage.split_topk("test")[0][0])


def test_topk_pads_short_lists():
    X = sp.csr_matrix(np.eye(3))
    tree = LabelTree("/nonexistent")
    tree._plt = type("P", (), {"predict_proba": lambda self, X, top_k: [[(2, 0.9)], [], [(0, 0.5), (1, 0.4)]]})()
    ids, probs = tree.topk(X, 3)
    assert ids.tolist() == [[2, -1, -1], [-1, -1, -1], [0, 1, -1]]
    assert probs[0].tolist() == pytest.approx([0.9, 0, 0])


# ---- the cache -------------------------------------------------------------------------------------

def test_the_cache_fits_once_per_data_and_settings(stage, data, cache):
    said = []
    again = cached_stage(data, SMALL_TREE, cache_dir=cache, log=said.append)
    assert again.folder == stage.folder and said == [f"lexical stage: cached ({stage.folder})"]
    other = LexicalSettings(tree=TreeSettings(max_leaves=20), top_k=5)
    assert cached_stage(data, other, cache_dir=cache).folder != stage.folder
    assert not [p for p in os.listdir(cache) if p.startswith(".tmp-")]


@pytest.fixture(scope="module")
def serving(data, cache):
    return cached_stage(data, SMALL_TREE, cache_dir=cache, threads=1, serving=True)


def test_the_serving_stage_learned_every_training_document_and_lines_up_with_the_split(stage, serving, data):
    whole = serving_data(data)
    assert len(whole.train) == len(data.train) + len(data.valid) and len(whole.valid) == 0
    assert whole.label_names == data.label_names and (whole.test.labels != data.test.labels).nnz == 0
    assert serving.folder != stage.folder and serving.num_labels == stage.num_labels
    # it saw the validation documents, the search's stage did not: it knows their labels far better
    full = stage_data(data)
    p5 = {name: lists_metrics(s.topk_tokens(*_tokens_in(s, full.valid, full)), data.valid.labels,
                              data.num_labels)["P@5"] for name, s in (("split", stage), ("serving", serving))}
    assert p5["serving"] > p5["split"] + 0.05, p5
    # it keeps the test split's lists alone, the same as its model gives
    test_ids, _ = serving.split_topk("test")
    assert np.array_equal(test_ids, serving.topk_tokens(*_tokens_in(serving, whole.test, whole))[0])
    with pytest.raises(FileNotFoundError):
        serving.split_topk("valid")


def _tokens_in(s, ds, data):
    """A split's uncut texts in stage `s`'s vocabulary (token ids, offsets)."""
    words = np.array([s.vocab.stoi.get(w, 1) for w in data.vocab.itos], dtype=np.int64)
    words[0] = 0
    return words[ds.token_ids], ds.offsets


def test_lists_test_from_the_serving_stage_and_choose_from_the_search_stage(stage, serving):
    lists = LexicalLists.from_stage(stage.folder, serving=serving.folder)
    assert np.array_equal(lists.valid[0], stage.split_topk("valid")[0])
    assert np.array_equal(lists.test[0], serving.split_topk("test")[0])
    assert not np.array_equal(lists.test[1], stage.split_topk("test")[1])


def test_a_serving_stage_with_training_lists_is_refused(data, tmp_path):
    with pytest.raises(ValueError, match="serving stage keeps no training lists"):
        cached_stage(data, LexicalSettings(tree=TreeSettings(max_leaves=20), crossfit=2), cache_dir=tmp_path,
                     serving=True)


def test_a_corrupt_cache_entry_is_fitted_again(data, tmp_path):
    first = cached_stage(data, SMALL_TREE, cache_dir=tmp_path)
    weights = os.path.join(first.folder, "tree", "weights.bin")
    with open(weights, "r+b") as f:
        f.truncate(100)
    said = []
    again = cached_stage(data, SMALL_TREE, cache_dir=tmp_path, log=said.append)
    assert not any("cached" in s for s in said)
    assert again.folder == first.folder and os.path.getsize(weights) > 100


def test_a_crash_while_fitting_leaves_nothing(data, tmp_path, monkeypatch):
    def boom(self, X, Y):
        raise RuntimeError("killed")

    monkeypatch.setattr(LabelTree, "fit", boom)
    with pytest.raises(RuntimeError, match="killed"):
        fit_stage(stage_data(data), str(tmp_path / "stage"), SMALL_TREE)
    assert os.listdir(tmp_path) == []


# ---- fusion ----------------------------------------------------------------------------------------

def test_the_fusion_grid_ends_are_each_model_alone(stage, data):
    ids, probs = stage.split_topk("valid")
    logits = torch.randn(len(data.valid), data.num_labels)
    np.testing.assert_allclose(Fusion("weighted", w=0.0)(logits, ids, probs), torch.sigmoid(logits))
    np.testing.assert_allclose(Fusion("weighted", w=1.0)(logits, ids, probs),
                               dense_lexical(ids, probs, data.num_labels, "cpu")[0])


def test_the_chosen_fusion_does_at_least_as_well_as_either_model(stage, data):
    ids, probs = stage.split_topk("valid")
    torch.manual_seed(0)
    truth = torch.as_tensor(data.valid.labels[:, : data.num_labels].toarray())
    logits = 3 * truth + torch.randn_like(truth) * 2.5           # a network that knows something
    best, m, table = choose_fusion(logits, ids, probs, data.valid.labels)
    assert len(table) == 12 and all(np.isfinite(list(table.values())))
    assert m["P@5"] >= max(table["weighted, lexical share 0.0"], table["weighted, lexical share 1.0"])
    assert m["P@5"] == max(table.values())
    assert Fusion.from_dict(json.loads(json.dumps(best.to_dict()))) == best


def test_an_unknown_fusion_method_is_refused():
    with pytest.raises(ValueError, match="fusion method 'max'"):
        Fusion("max")


# ---- training with the stage, and bundles ----------------------------------------------------------

def small_model(data):
    mcfg = ModelConfig(genotype=Genotype((("conv3", 0),), "sum").to_dict(), emb_dim=16, width=16, fc=[16])
    return mcfg, build_model(mcfg, len(data.vocab), data.num_labels, seed=0)


@pytest.fixture(scope="module")
def fused(stage, data, tmp_path_factory):
    mcfg, model = small_model(data)
    lists = LexicalLists(stage.split_topk("valid"), stage.split_topk("test"))
    rec = train_model(model, data, TrainConfig(max_steps=6, eval_every=3, batch_size=16), lexical=lists).record
    path = str(tmp_path_factory.mktemp("bundles") / "fused")
    save_bundle(path, model, mcfg, data, record=rec, lexical=stage.folder,
                fusion=Fusion.from_dict(rec["fused"]["fusion"]))
    return path, rec


def test_training_with_the_stage_selects_by_the_fused_figure(fused):
    _, rec = fused
    assert rec["status"] == "ok"
    assert set(rec["fused"]) == {"valid", "test", "fusion"}
    assert [len(c) for c in rec["curve"]] == [5, 5]                # step, epoch, P@1, P@5, fused P@5
    assert max(c[4] for c in rec["curve"]) == pytest.approx(rec["fused"]["valid"]["P@5"], abs=1e-6)


def test_a_fused_bundle_serves_the_fused_scores_and_moves(fused, stage, tmp_path):
    path, rec = fused
    moved = str(tmp_path / "elsewhere")
    shutil.copytree(path, moved)
    shutil.rmtree(path + "-gone", ignore_errors=True)
    b = load_bundle(moved)
    assert b.lexical is not None and b.fusion == Fusion.from_dict(rec["fused"]["fusion"])
    texts = ["a text editor for the terminal", "python library for xml parsing"]
    got = b.predict_scores(texts)
    logits = torch.logit(torch.as_tensor(load_bundle(moved).predict_scores(texts)))  # fused again: same
    np.testing.assert_allclose(got, torch.sigmoid(logits).numpy(), rtol=1e-5, atol=1e-6)
    ids, probs = stage.topk(texts)
    b.fusion = Fusion("weighted", w=1.0)
    np.testing.assert_allclose(b.predict_scores(texts), dense_lexical(ids, probs, len(b.label_names), "cpu")[0])


def test_a_lexical_only_bundle_predicts_the_tree_ranking(stage, data, tmp_path):
    path = save_bundle(str(tmp_path / "plt"), None, None, data, lexical=stage.folder)
    assert not os.path.exists(os.path.join(path, "weights.pt"))
    b = load_bundle(path)
    assert b.model is None
    ids, probs = stage.topk(["a text editor for the terminal"], k=3)
    top = b.predict(["a text editor for the terminal"], k=3)[0]
    assert [n for n, _ in top] == [b.label_names[i] for i in ids[0]]
    assert [p for _, p in top] == pytest.approx(probs[0].tolist())


@pytest.mark.parametrize("damage", ["corrupt", "missing-file", "missing-part"])
def test_a_damaged_lexical_part_is_refused_naming_the_file(fused, tmp_path, damage):
    path = str(tmp_path / "b")
    shutil.copytree(fused[0], path)
    target = os.path.join(path, "lexical", "tree", "weights.bin")
    if damage == "corrupt":
        with open(target, "r+b") as f:
            f.seek(10)
            f.write(b"\xff\xff\xff\xff")
    elif damage == "missing-file":
        os.remove(target)
    else:
        shutil.rmtree(os.path.join(path, "lexical"))
        target = os.path.join(path, "lexical")
    with pytest.raises(ValueError, match=f"^{target}: (corrupt|missing)"):
        load_bundle(path)


# ---- the residual network ----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def crossfit_stage(data, cache):
    return cached_stage(data, LexicalSettings(tree=TreeSettings(max_leaves=20), top_k=10, crossfit=2),
                        cache_dir=cache, threads=1)


def test_cross_fitted_lists_come_from_trees_that_never_saw_the_document(crossfit_stage, data):
    ids, probs = crossfit_stage.split_topk("train")
    assert ids.shape == (len(data.train), 10)
    honest = compute_metrics(dense_lexical(ids, probs, data.num_labels, "cpu")[0], data.train.labels)
    seen = crossfit_stage.topk_tokens(*[getattr(stage_data(data).train, a) for a in ("token_ids", "offsets")])
    fitted = compute_metrics(dense_lexical(*seen, data.num_labels, "cpu")[0], data.train.labels)
    assert fitted["P@3"] > honest["P@3"] + 0.1         # in-sample lists flatter the tree; cross-fitted ones don't


def test_a_residual_network_trains_and_is_served_with_the_lexical_offset(crossfit_stage, data):
    mcfg, model = small_model(data)
    lists = LexicalLists.from_stage(crossfit_stage.folder, residual=True)
    rec = train_model(model, data, TrainConfig(max_steps=6, eval_every=3, batch_size=16), lexical=lists).record
    assert rec["status"] == "ok" and rec["fused"]["fusion"]["method"] == "residual"
    ids, probs = crossfit_stage.split_topk("valid")
    z = torch.randn(len(data.valid), data.num_labels)
    p_lex, listed = dense_lexical(ids, probs, data.num_labels, "cpu")
    expect = torch.sigmoid(z + torch.logit(torch.where(listed > 0, p_lex, torch.zeros_like(p_lex)).clamp(1e-4, 1 - 1e-4)))
    np.testing.assert_allclose(Fusion("residual")(z, ids, probs), expect, rtol=1e-6)
    # with a network that outputs 0, the residual model ranks as the lexical model does
    same = Fusion("residual")(torch.zeros_like(z), ids, probs)
    np.testing.assert_array_equal(compute_metrics(same, data.valid.labels)["P@5"],
                                  compute_metrics(p_lex, data.valid.labels)["P@5"])


# ---- the commands ------------------------------------------------------------------------------------

def test_train_plt_and_a_fused_preset_evaluate_and_predict_from_the_command_line(debtags_slice, tmp_path,
                                                                                monkeypatch, capsys):
    from xmcnas_fast.cli import main

    monkeypatch.setenv("XMCNAS_CACHE", str(tmp_path / "cache"))
    monkeypatch.chdir(tmp_path)
    common = ["--dataset", debtags_slice, "--max-len", "24", "--valid", "40", "--quiet"]
    assert main(["train", "--arch", "plt", "--out", "m/plt", *common]) == 0
    assert main(["evaluate", "m/plt", "--json"]) == 0
    alone = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert set(alone) >= {"P@1", "P@5"} and "parts" not in alone
    g = tmp_path / "g.json"
    g.write_text('{"nodes": [["conv3", 0]], "merge": "sum"}')
    assert main(["train", "--arch", str(g), "--lexical", "--out", "m/fused", "--max-steps", "6", "--eval-every", "3",
                 "--width", "8", "--emb-dim", "8", "--fc", "8", *common]) == 0
    assert main(["evaluate", "m/fused", "--json"]) == 0
    fused = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert list(fused["parts"]) == ["network", "lexical", "fused"]
    assert fused["parts"]["lexical"]["P@1"] == pytest.approx(alone["P@1"])      # the same cached stage
    assert {k: fused[k] for k in fused if k != "parts"} == fused["parts"]["fused"]    # it serves the fused model
    monkeypatch.setenv("COLUMNS", "80")
    assert main(["evaluate", "m/fused"]) == 0                 # a column a model: every figure whole in 80 columns
    table = capsys.readouterr().out
    assert "fused (served)" in table and "…" not in table
    for part in ("network", "lexical", "fused"):
        assert f"{100 * fused['parts'][part]['PSP@5']:.2f}" in table
    assert main(["predict", "m/fused", "a text editor for the terminal", "--json"]) == 0
    line = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert len(line["labels"]) == 5


# ---- the one-vs-rest model beside the tree ----------------------------------------------------------

def test_two_top_lists_average_label_by_label():
    a = (np.array([[3, 1, -1]]), np.array([[0.8, 0.4, 0.0]], dtype=np.float32))
    b = (np.array([[1, 2, 0]]), np.array([[0.9, 0.3, 0.1]], dtype=np.float32))
    ids, probs = average_lists(a, b, 3)
    assert ids.tolist() == [[1, 3, 2]]                      # 1: (0.4 + 0.9) / 2; 3: 0.8 / 2; 2: 0.3 / 2
    assert probs[0].tolist() == pytest.approx([0.65, 0.4, 0.15])
    ids, probs = average_lists((np.full((1, 2), -1), np.zeros((1, 2))), (np.array([[4, -1]]), np.array([[0.6, 0]])), 2)
    assert ids.tolist() == [[4, -1]] and probs[0].tolist() == pytest.approx([0.3, 0.0])


def test_the_stage_averages_its_tree_with_a_one_vs_rest_model_where_labels_are_few(stage, data):
    full = stage_data(data)
    assert SMALL_TREE.ovr == "auto" and data.num_labels <= OVR_MAX_LABELS and stage.ovr is not None
    assert os.path.isfile(os.path.join(stage.folder, "ovr", "weights.bin"))
    X = stage.features.transform(full.test.token_ids, full.test.offsets)
    k = SMALL_TREE.top_k
    expected = average_lists(stage.tree.topk(X, k), stage.ovr.topk(X, k), k)
    np.testing.assert_array_equal(stage.split_topk("test")[0], expected[0])
    # and the two models differ: the average is not one of them relabelled
    assert (stage.ovr.topk(X, k)[0] != stage.tree.topk(X, k)[0]).any()
    assert not LexicalSettings(ovr="auto").uses_ovr(OVR_MAX_LABELS + 1)
    assert LexicalSettings(ovr="on").uses_ovr(10**6) and not LexicalSettings(ovr="off").uses_ovr(2)
    with pytest.raises(ValueError, match="one-vs-rest 'maybe'"):
        LexicalSettings(ovr="maybe")


def test_a_shorter_list_is_the_head_of_the_stages_list_whatever_k(stage, data):
    # averaged lists are cut from each model's list of the stage's own depth: asking for 3 labels gives the
    # first 3 of the cached lists, probabilities included, not an average of two shorter lists
    full = stage_data(data)
    assert stage.ovr is not None
    ids, probs = stage.split_topk("test")
    for k in (1, 3, SMALL_TREE.top_k):
        short = stage.topk_tokens(full.test.token_ids, full.test.offsets, k)
        np.testing.assert_array_equal(short[0], ids[:, :k])
        np.testing.assert_allclose(short[1], probs[:, :k], rtol=1e-6)


def test_a_stage_written_before_the_one_vs_rest_model_loads_without_it(stage, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(stage.folder, old)
    shutil.rmtree(old / "ovr")
    meta = json.loads((old / "lexical.json").read_text())
    del meta["settings"]["ovr"]
    meta["files"] = {k: v for k, v in meta["files"].items() if not k.startswith("ovr")}
    (old / "lexical.json").write_text(json.dumps(meta))
    loaded = LexicalStage.load(str(old))
    assert loaded.ovr is None and loaded.settings.ovr == "off"
