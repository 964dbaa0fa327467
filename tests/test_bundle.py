"""Model bundles: a save/load round trip gives identical scores; loading never runs pickled code."""
import os
import pickle

import pytest
import torch

from xmcnas_fast.bundle import load_bundle, save_bundle
from xmcnas_fast.data import iterate_batches
from xmcnas_fast.model import ModelConfig, build_model, preset
from xmcnas_fast.space import Genotype
from xmcnas_fast.train import TrainConfig, train_model


@pytest.fixture(scope="module")
def data(debtags_slice, tmp_path_factory):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=48, valid=40, cache_dir=tmp_path_factory.mktemp("cache"))


def scores(model, data):
    model.eval()
    with torch.no_grad():
        return torch.cat([model(b.tokens, b.mask) for b in iterate_batches(data.test, data.num_labels, 64,
                                                                           shuffle=False)])


@pytest.mark.parametrize("kind", ["dag", "tfidf-mlp"])
def test_round_trip_gives_identical_scores(data, tmp_path, kind):
    if kind == "dag":
        mcfg = ModelConfig(genotype=Genotype((("conv3", 0), ("bigru", 1), ("maxpool3", 0)), "sum").to_dict(),
                           emb_dim=16, width=16, fc=[16, 8])
    else:
        mcfg = preset("tfidf-mlp")
        mcfg.hidden, mcfg.max_features = [32, 16], 400
    model = build_model(mcfg, len(data.vocab), data.num_labels, seed=0)
    if kind == "tfidf-mlp":
        model.fit(data.train.token_ids, data.train.offsets)
    res = train_model(model, data, TrainConfig(max_steps=6, eval_every=3, batch_size=16))
    path = save_bundle(str(tmp_path / "b"), model, mcfg, data, record=res.record)
    b = load_bundle(path)
    assert torch.equal(scores(model, data), scores(b.model, data))
    assert b.label_names == data.label_names and b.metrics["steps"] == 6
    texts = ["a text editor for the terminal", "python library to parse xml"]
    top = b.predict(texts, k=3)
    p = b.predict_scores(texts)
    for row, labels in enumerate(top):
        assert [name for name, _ in labels] == [b.label_names[i] for i in (-p[row]).argsort(kind="stable")[:3]]


class _Trap:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def test_loading_never_runs_pickled_code(data, tmp_path):
    mcfg = ModelConfig(genotype=Genotype((("conv1", 0),), "sum").to_dict(), emb_dim=8, width=8, fc=[8])
    model = build_model(mcfg, len(data.vocab), data.num_labels, seed=0)
    path = save_bundle(str(tmp_path / "b"), model, mcfg, data)
    marker = tmp_path / "ran"
    state = dict(model.state_dict(), trap=_Trap(str(marker)))
    torch.save(state, os.path.join(path, "weights.pt"))
    with pytest.raises(pickle.UnpicklingError):
        load_bundle(path)
    assert not marker.exists()


def test_a_bundle_is_readable_like_any_directory_the_user_makes(data, tmp_path):
    import stat

    old = os.umask(0o022)
    try:
        mcfg = ModelConfig(genotype=Genotype((("conv1", 0),), "sum").to_dict(), emb_dim=8, width=8, fc=[8])
        path = save_bundle(str(tmp_path / "b"), build_model(mcfg, len(data.vocab), data.num_labels, seed=0), mcfg, data)
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755          # not mkdtemp's 0700
    assert {stat.S_IMODE(os.stat(os.path.join(path, f)).st_mode) for f in os.listdir(path)} == {0o644}
