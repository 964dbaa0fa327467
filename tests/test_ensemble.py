"""The result as an ensemble (ensemble.py): the module averages its members' probabilities, the greedy
selection adds a network only where the fused validation P@5 gains, and an ensemble bundle holds every
member, moves, and is refused naming the file when a member is missing."""
import os
import shutil

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmcnas_fast.bundle import load_bundle, save_bundle
from xmcnas_fast.ensemble import Ensemble, mean_logits, select_members
from xmcnas_fast.model import ModelConfig, build_model
from xmcnas_fast.space import Genotype


def small(data, op, seed):
    cfg = ModelConfig(genotype=Genotype(((op, 0),), "sum").to_dict(), emb_dim=8, width=8, fc=[8])
    return cfg, build_model(cfg, len(data.vocab), data.num_labels, seed=seed)


@pytest.fixture(scope="module")
def data(debtags_slice, tmp_path_factory):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=24, valid=40, cache_dir=tmp_path_factory.mktemp("cache"))


def test_an_ensemble_gives_the_logit_of_its_members_mean_probability(data):
    (_, a), (_, b) = small(data, "conv3", 0), small(data, "maxpool3", 1)
    tokens = torch.randint(1, len(data.vocab), (3, 10))
    mask = torch.ones(3, 10, dtype=torch.bool)
    ens = Ensemble([a, b]).eval()
    with torch.no_grad():
        want = (torch.sigmoid(a.eval()(tokens, mask)) + torch.sigmoid(b.eval()(tokens, mask))) / 2
        torch.testing.assert_close(torch.sigmoid(ens(tokens, mask)), want, rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="at least one network"):
        Ensemble([])


def truth_rows(rows, columns):
    r = [i for i, labels in enumerate(rows) for _ in labels]
    c = [j for labels in rows for j in labels]
    return sp.csr_matrix((np.ones(len(c)), (r, c)), shape=(len(rows), columns))


def test_selection_adds_only_the_networks_that_gain_on_validation():
    # 6 documents, 8 labels, each document's true labels 2*i % 8 and (2*i + 1) % 8
    truth = truth_rows([[2 * i % 8, (2 * i + 1) % 8] for i in range(6)], 8)
    dense = torch.as_tensor(truth.toarray(), dtype=torch.float32)
    noise = torch.rand(6, 8, generator=torch.Generator().manual_seed(0))
    probs = {"first": 0.5 * dense * (torch.arange(6) % 2 == 0)[:, None] + 0.3 * noise,   # right on even rows
             "other": 0.5 * dense * (torch.arange(6) % 2 == 1)[:, None] + 0.3 * noise,   # right on odd rows
             "copy": 0.5 * dense * (torch.arange(6) % 2 == 0)[:, None] + 0.3 * noise}
    nothing = (np.full((6, 1), -1), np.zeros((6, 1), dtype=np.float32))               # an empty lexical list
    names, best, alone = select_members(probs, "first", nothing, truth, k=3, min_gain=0.01)
    assert names == ["first", "other"] and best["P@5"] > alone["P@5"] + 0.01
    torch.testing.assert_close(mean_logits([probs["first"]]), torch.logit(probs["first"].clamp(1e-6, 1 - 1e-6)))
    assert select_members(probs, "first", nothing, truth, k=1, min_gain=0.0)[0] == ["first"]
    assert select_members(probs, "first", nothing, truth, k=3, min_gain=1.0)[0] == ["first"]


@pytest.fixture(scope="module")
def ensemble_bundle(data, tmp_path_factory):
    (ca, a), (cb, b) = small(data, "conv3", 0), small(data, "maxpool3", 1)
    path = str(tmp_path_factory.mktemp("bundles") / "ensemble")
    save_bundle(path, a, ca, data, record={"members": ["a", "b"]}, members=[(cb, b)])
    return path, a.eval(), b.eval()


def test_an_ensemble_bundle_holds_every_member_and_moves(ensemble_bundle, tmp_path):
    path, a, b = ensemble_bundle
    moved = str(tmp_path / "moved")
    shutil.copytree(path, moved)
    assert sorted(os.listdir(os.path.join(moved, "members"))) == ["1"]
    got = load_bundle(moved)
    assert isinstance(got.model, Ensemble) and len(got.model.members) == 2
    texts = ["a text editor for the terminal", "python library for xml parsing"]
    single = str(tmp_path / "a")
    save_bundle(single, a, ModelConfig.from_dict(got.config["model"]), _Data(got))
    mean = (load_bundle(single).predict_scores(texts) + _scores(b, got, texts)) / 2
    np.testing.assert_allclose(got.predict_scores(texts), mean, rtol=1e-5, atol=1e-6)


def test_an_ensemble_bundle_without_a_member_is_refused_naming_the_file(ensemble_bundle, tmp_path):
    broken = str(tmp_path / "broken")
    shutil.copytree(ensemble_bundle[0], broken)
    os.remove(os.path.join(broken, "members", "1", "weights.pt"))
    with pytest.raises(ValueError, match=f"^{os.path.join(broken, 'members', '1', 'weights.pt')}: missing"):
        load_bundle(broken)


class _Data:
    """What save_bundle reads of a dataset, taken from a loaded bundle."""

    def __init__(self, bundle):
        self.vocab, self.label_names, self.num_labels = bundle.vocab, bundle.label_names, len(bundle.label_names)
        self.name, self.max_len = bundle.config["data"]["name"], bundle.config["data"]["max_len"]
        self.source = {"location": bundle.config["data"]["location"], "settings": bundle.config["data"]["settings"]}


def _scores(model, bundle, texts):
    from xmcnas_fast.data import iterate_batches

    out = np.zeros((len(texts), len(bundle.label_names)), dtype=np.float32)
    with torch.no_grad():
        for batch in iterate_batches(bundle.encode(texts), len(bundle.label_names), 8, shuffle=False):
            out[batch.index.numpy()] = torch.sigmoid(model(batch.tokens, batch.mask)).numpy()
    return out
