"""The precision policy (docs/design.md "Precision"), checked on the CPU under bf16 autocast.

Under autocast every DAG node hands the next one, and the head, states of one dtype (autocast's);
recurrent layers compute in RNN_DTYPE with autocast off; nothing runs in float16.
"""
import numpy as np
import pytest
import torch
import torch.nn as nn

from xmcnas_fast import ops
from xmcnas_fast.model import RNN_DTYPE, AttentionHead, DAGEncoder, ModelConfig, build_model, state_dtype
from xmcnas_fast.space import Genotype

V, L = 60, 9
# every operation, pools reading the embedding (a projection to the width) and nodes reading nodes
EVERY_OP = Genotype((("conv3", 0), ("maxpool3", 0), ("bilstm", 1), ("avgpool3", 3), ("bigru", 2),
                     ("conv1", 5)), "sum")


def batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.tensor([11, 6, 1, 9])
    mask = torch.arange(11).unsqueeze(0) < lengths.unsqueeze(1)
    return torch.randint(2, V, (4, 11), generator=g) * mask, mask


def build(genotype=EVERY_OP, use_kernels=True):
    cfg = ModelConfig(genotype=genotype.to_dict(), emb_dim=12, width=16, fc=[8])
    return build_model(cfg, V, L, use_kernels=use_kernels, seed=0)


def dtypes_seen(model, run):
    """The dtypes of what the encoder hands on, what the head receives, and what each RNN computes in."""
    seen = {"encoder": [], "head": [], "rnn": []}
    hooks = [
        model.get_submodule("encoder").register_forward_hook(
            lambda m, i, out: seen["encoder"].extend(o.dtype for o in out)),
        model.get_submodule("head").register_forward_pre_hook(lambda m, i: seen["head"].append(i[0].dtype)),
    ]
    for m in model.modules():
        if isinstance(m, (nn.LSTM, nn.GRU)):
            hooks.append(m.register_forward_hook(
                lambda m, i, out: seen["rnn"].append((i[0].data.dtype, out[0].data.dtype,
                                                      torch.is_autocast_enabled("cpu")))))
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("use_kernels", [True, False], ids=["kernels", "reference"])
def test_one_dtype_through_the_dag_under_bf16_autocast(use_kernels):
    model = build(use_kernels=use_kernels).train()
    tokens, mask = batch()

    def step():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = model(tokens, mask)
        scores.float().sum().backward()

    seen = dtypes_seen(model, step)
    assert seen["encoder"] == [torch.bfloat16] * len(EVERY_OP.nodes)
    assert seen["head"] == [torch.bfloat16]
    assert seen["rnn"] == [(RNN_DTYPE, RNN_DTYPE, False)] * 2
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and torch.isfinite(g.to_dense() if g.is_sparse else g).all() for g in grads)
    assert all(p.dtype == torch.float32 for p in model.parameters())     # master weights stay float32


def test_without_autocast_everything_is_float32():
    model = build().eval()
    seen = dtypes_seen(model, lambda: model(*batch()))
    assert set(seen["encoder"]) == set(seen["head"]) == {torch.float32}


def test_bf16_autocast_scores_follow_float32_ones():
    model = build().eval()
    tokens, mask = batch(1)
    with torch.no_grad():
        full = model(tokens, mask).float()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            half = model(tokens, mask).float()
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


def test_float16_autocast_is_refused():
    model = build(Genotype((("conv3", 0),), "sum")).eval()
    with pytest.raises(ValueError, match="float16 autocast is not supported"):
        with torch.autocast("cpu", dtype=torch.float16):
            model(*batch())


def test_state_dtype_follows_autocast_on_the_tensors_device():
    x = torch.zeros(2, 3)
    assert state_dtype(x) == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert state_dtype(x) == torch.bfloat16
        assert state_dtype(x.double()) == torch.bfloat16
    assert state_dtype(x.bfloat16()) == torch.bfloat16


def test_the_head_attends_over_values_of_the_states_dtype():
    head = AttentionHead(16, L, [8], 0.0).eval()
    h = torch.randn(2, 5, 16).bfloat16()
    mask = torch.ones(2, 5, dtype=torch.bool)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = head(h, mask)
    ref = AttentionHead(16, L, [8], 0.0, use_kernels=False).eval()
    ref.load_state_dict(head.state_dict())
    torch.testing.assert_close(out.float(), ref(h.float(), mask).float(), rtol=0.05, atol=0.05)


# ---- training under bf16 autocast ----------------------------------------------------------------

@pytest.fixture(scope="module")
def data(debtags_slice, tmp_path_factory):
    from xmcnas_fast.data import load

    return load(debtags_slice, max_len=48, valid=40, cache_dir=tmp_path_factory.mktemp("cache"))


def test_a_model_still_learns_under_bf16_autocast(data):
    """The 24-document overfit of test_train, with a BiLSTM, under bf16 autocast on the CPU."""
    import dataclasses

    from xmcnas_fast.train import TrainConfig, evaluate, train_model

    tiny = data.train.subset(range(24))
    small = dataclasses.replace(data, train=tiny, valid=tiny)
    cfg = ModelConfig(genotype=Genotype((("conv3", 0), ("bilstm", 1)), "sum").to_dict(), emb_dim=64, width=64,
                      fc=[64], dropout=0.0, dropout_emb=0.0)
    model = build_model(cfg, len(data.vocab), data.num_labels, seed=0)
    losses = []
    tcfg = TrainConfig(max_steps=300, max_epochs=1000, eval_every=10, batch_size=8, lr=1e-2, patience=1000,
                       precision="bf16")

    def train():
        train_model(model, small, tcfg, on_progress=lambda **f: losses.append(f["loss"]), evaluate_test=False)

    seen = dtypes_seen(model, train)
    assert set(seen["encoder"]) == set(seen["head"]) == {torch.bfloat16}
    assert {r[:2] for r in seen["rnn"]} == {(RNN_DTYPE, RNN_DTYPE)}
    assert losses[-1] < 0.1 * losses[0]
    assert evaluate(model, tiny, data.num_labels, precision="bf16")["P@1"] == 1.0


def test_precision_settings():
    from xmcnas_fast.train import TrainConfig, autocast_dtype

    assert autocast_dtype("auto", "cuda") == torch.bfloat16 and autocast_dtype("auto", "cpu") is None
    assert autocast_dtype("bf16", "cpu") == torch.bfloat16 and autocast_dtype("fp32", "cuda") is None
    from xmcnas_fast.bundle import migrate_bundle_config
    from xmcnas_fast.config import migrate

    for amp, precision in ((False, "fp32"), (True, "auto")):      # configs from before `precision`
        assert TrainConfig.from_dict(migrate({"version": 1, "train": {"amp": amp}})["train"]).precision == precision
        bundle = migrate_bundle_config({"format": 1, "train": {"amp": amp, "device": "cpu"}})
        assert TrainConfig.from_dict(bundle["train"]).precision == precision and "device" not in bundle["train"]
    with pytest.raises(ValueError, match="precision 'fp16'"):
        TrainConfig.from_dict({"precision": "fp16"})


def test_a_bundle_predicts_in_the_precision_it_was_trained_in(data, tmp_path):
    from xmcnas_fast.bundle import load_bundle, save_bundle
    from xmcnas_fast.train import TrainConfig

    cfg = ModelConfig(genotype=Genotype((("bigru", 0),), "sum").to_dict(), emb_dim=16, width=16, fc=[16])
    model = build_model(cfg, len(data.vocab), data.num_labels, seed=0)
    texts = ["a text editor for the terminal", "library to parse xml"]
    scores = {}
    for precision in ("bf16", "fp32"):
        path = save_bundle(str(tmp_path / precision), model, cfg, data,
                           train_cfg=TrainConfig(precision=precision).to_dict())
        bundle = load_bundle(path)
        assert bundle.precision == precision
        seen = dtypes_seen(bundle.model, lambda: scores.__setitem__(precision, bundle.predict_scores(texts)))
        assert set(seen["head"]) == {torch.bfloat16 if precision == "bf16" else torch.float32}
    np.testing.assert_allclose(scores["bf16"], scores["fp32"], atol=0.02)
