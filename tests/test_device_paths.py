"""The paths a GPU run takes through the program, checked on a machine without one.

On a GPU, `tensor.numpy()` (and anything numpy does through `__array__`) fails for a tensor on the
device. Here every tensor that `Batch.to(device)` moves to the device, and every tensor computed
from one, is a `DeviceOnly` tensor that refuses those host conversions the same way, while an
explicit copy (`.cpu()`, `.to("cpu")`) gives a plain tensor back, as on a GPU. Training, evaluating,
predicting and a search's candidate then run on the CPU as they would on a GPU; a host conversion
of a device tensor anywhere on those paths fails here as it would there.
"""
import dataclasses
import types

import numpy as np
import pytest
import torch

from xmcnas_fast.bundle import load_bundle, save_bundle
from xmcnas_fast.data.batching import Batch, make_batch
from xmcnas_fast.model import ModelConfig, build_model, preset
from xmcnas_fast.space import Genotype
from xmcnas_fast.train import TrainConfig, evaluate, train_model

SMALL = dict(emb_dim=16, width=16, fc=[16])


class DeviceOnly(torch.Tensor):
    """A CPU tensor that behaves, for host conversions, like one on a GPU."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        out = super().__torch_function__(func, types, args, kwargs or {})
        if func in (torch.Tensor.cpu, torch.Tensor.to) and _to_host(func, args, kwargs or {}):
            return _plain(out)
        return out

    def numpy(self, *args, **kwargs):
        raise TypeError("can't convert device type tensor to numpy (DeviceOnly: a host conversion of a "
                        "tensor that lives on the device)")

    def __array__(self, *args, **kwargs):
        self.numpy()


def _to_host(func, args, kwargs) -> bool:
    if func is torch.Tensor.cpu:
        return True
    target = kwargs.get("device", args[1] if len(args) > 1 else None)
    return isinstance(target, (str, torch.device)) and torch.device(target).type == "cpu"


def _plain(out):
    if isinstance(out, DeviceOnly):
        return out.as_subclass(torch.Tensor)
    return out


def on_device(t: torch.Tensor) -> torch.Tensor:
    return t.as_subclass(DeviceOnly)


@pytest.fixture
def gpu_like(monkeypatch):
    """Batch.to(device) as on a GPU: what the real Batch.to would move off the host becomes DeviceOnly.

    Which fields move is asked of the real Batch.to (through the meta device), so a change there
    that moves another field (the row index, say) is seen here."""
    real_to = Batch.to

    def to(self, device, non_blocking=False):
        moved = real_to(self, "meta")
        fields = [getattr(self, f.name) for f in dataclasses.fields(Batch)]
        return Batch(*(on_device(t) if t is not None and getattr(moved, f.name).device.type == "meta" else t
                       for t, f in zip(fields, dataclasses.fields(Batch))))

    monkeypatch.setattr(Batch, "to", to)
    return to


@pytest.fixture(scope="module")
def data(debtags_slice, tmp_path_factory):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=48, valid=40, cache_dir=tmp_path_factory.mktemp("cache"))


def small_dag(nodes, merge="sum"):
    return ModelConfig(genotype=Genotype(tuple(map(tuple, nodes)), merge).to_dict(), **SMALL)


# ---- the design: row indices stay on the host ----------------------------------------------------

def test_batch_to_a_device_keeps_the_row_index_on_the_host(data):
    b = make_batch(data.train, np.arange(5), data.num_labels).to("meta")
    assert b.tokens.device.type == b.mask.device.type == b.labels.device.type == "meta"
    assert b.index.device.type == "cpu" and b.index.tolist() == [0, 1, 2, 3, 4]


def test_the_guard_refuses_what_a_gpu_refuses(data, gpu_like):
    b = make_batch(data.train, np.arange(3), data.num_labels).to("cuda")
    scores = b.labels * 2.0
    with pytest.raises(TypeError, match="device"):
        scores.numpy()
    with pytest.raises(TypeError, match="device"):
        np.asarray(scores)
    assert type(scores.cpu()) is torch.Tensor and scores.cpu().numpy().shape == (3, data.num_labels)
    assert type(scores.to("cpu")) is torch.Tensor
    assert b.index.numpy().tolist() == [0, 1, 2]


def test_the_guard_sees_a_moved_row_index(data, gpu_like, monkeypatch):
    """Were Batch.to to move the index again (the bug that crashed every GPU evaluation), the
    evaluation would fail here."""
    real = Batch.to

    def moving_index(self, device, non_blocking=False):
        b = real(self, device)
        return Batch(b.tokens, b.mask, b.labels, on_device(self.index))

    monkeypatch.setattr(Batch, "to", moving_index)
    model = build_model(small_dag([["conv3", 0]]), len(data.vocab), data.num_labels, seed=0)
    with pytest.raises(TypeError, match="device"):
        evaluate(model, data.valid, data.num_labels)


# ---- every path a device run takes ---------------------------------------------------------------

@pytest.mark.parametrize("nodes,merge", [([["conv3", 0], ["bilstm", 1]], "sum"), ([["bigru", 0]], "concat")])
def test_train_and_evaluate_hold_no_host_conversion(data, gpu_like, nodes, merge):
    model = build_model(small_dag(nodes, merge), len(data.vocab), data.num_labels, seed=0)
    res = train_model(model, data, TrainConfig(max_steps=6, eval_every=3, batch_size=16, seed=0))
    assert res.record["status"] == "ok", res.record["error"]
    assert res.record["test"]["P@1"] >= 0 and len(res.record["curve"]) == 2


def test_tfidf_mlp_trains_with_no_host_conversion(data, gpu_like):
    cfg = preset("tfidf-mlp")
    cfg.hidden, cfg.max_features = [16, 16], 500
    model = build_model(cfg, len(data.vocab), data.num_labels, seed=0)
    model.fit(np.asarray(data.train.token_ids), np.asarray(data.train.offsets))
    res = train_model(model, data, TrainConfig(max_steps=4, eval_every=2, batch_size=16, seed=0))
    assert res.record["status"] == "ok", res.record["error"]


def test_predict_holds_no_host_conversion(data, gpu_like, tmp_path):
    mcfg = small_dag([["avgpool3", 0], ["conv1", 1]])
    model = build_model(mcfg, len(data.vocab), data.num_labels, seed=0)
    bundle = load_bundle(save_bundle(str(tmp_path / "b"), model, mcfg, data))
    texts = ["a text editor for the terminal", "python library for xml", ""]
    scores = bundle.predict_scores(texts)
    top = bundle.predict(texts, k=3)
    assert scores.shape == (3, data.num_labels) and np.isfinite(scores).all()
    assert [len(t) for t in top] == [3, 3, 3]
    best = [bundle.label_names[i] for i in np.argsort(-scores[0], kind="stable")[:3]]
    assert sorted(best) == sorted(name for name, _ in top[0])


def test_a_search_candidate_holds_no_host_conversion(data, gpu_like, tmp_path):
    from xmcnas_fast.candidate import train_candidate
    from xmcnas_fast.contract import CandidateTask

    events = []
    ctx = types.SimpleNamespace(shared={"data": data, "vectors": None}, device=torch.device("cpu"),
                                report=lambda **kw: events.append(kw), should_stop=lambda: False)
    task = CandidateTask(model=small_dag([["maxpool3", 0], ["bilstm", 1]]),
                         train=TrainConfig(max_steps=4, eval_every=2, batch_size=16),
                         model_dir=str(tmp_path / "m"), save_above=-1.0)
    rec = train_candidate(task, ctx)
    assert rec.status == "ok", rec.error
    assert rec.model_dir and len(events) == 2


@pytest.mark.parametrize("rank", [False, True])
def test_a_fused_candidate_trains_evaluates_and_predicts_with_no_host_conversion(data, gpu_like, tmp_path, rank):
    """The lexical part stays on the host: its top lists go to the device, the network's scores never
    come back (fusion, ranking and metrics on the device; with `rank`, a final training's choice of the
    ranker too: its pairs are copied to the host explicitly, its scores made on the device)."""
    pytest.importorskip("napkinxc", reason="napkinXC (a dependency) is not installed on this machine")
    from xmcnas_fast.contract import CandidateTask, LexicalPart
    from xmcnas_fast.lexical import LexicalSettings, TreeSettings, cached_stage
    from xmcnas_fast.candidate import train_candidate

    stage = cached_stage(data, LexicalSettings(tree=TreeSettings(max_leaves=20), top_k=8), cache_dir=tmp_path / "c")
    ctx = types.SimpleNamespace(shared={"data": data, "vectors": None}, device=torch.device("cpu"),
                                report=lambda **kw: None, should_stop=lambda: False)
    task = CandidateTask(model=small_dag([["conv3", 0]]), train=TrainConfig(max_steps=4, eval_every=2, batch_size=16),
                         model_dir=str(tmp_path / "m"), save_above=-1.0, lexical=LexicalPart(stage.folder, rank=rank))
    rec = train_candidate(task, ctx)
    assert rec.status == "ok", rec.error
    assert rec.fused["test"]["P@1"] >= 0
    assert ("tried" in rec.fused) == rank and (rank or rec.fused["fusion"]["method"] == "weighted")
    bundle = load_bundle(rec.model_dir)
    assert bundle.lexical is not None
    if rank:                                    # served by the ranker whichever the small run chose
        from xmcnas_fast.lexical import choose_fusion

        valid = stage.split_topk("valid")
        z = on_device(torch.randn(len(data.valid), data.num_labels))
        bundle.fusion, _, _ = choose_fusion(z, *valid, data.valid.labels, methods=("ranker",),
                                            prior=np.zeros(data.num_labels))
    top = bundle.predict(["a text editor for the terminal", ""], k=3)
    assert [len(t) for t in top] == [3, 3]
