"""Genotype -> module: shapes, padding invariance, the presets, kernels vs eager."""
import random
import warnings

import numpy as np
import pytest
import torch

from xmcnas_fast.model import ModelConfig, XMCModel, build_model, build_node, preset
from xmcnas_fast.space import OPERATIONS, Genotype, random_genotype

V, L = 50, 7


def tokens_and_mask(lengths, T=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    T = T or max(lengths)
    tok = torch.randint(2, V, (len(lengths), T), generator=g)
    mask = torch.arange(T).unsqueeze(0) < torch.tensor(lengths).unsqueeze(1)
    return tok * mask, mask


@pytest.mark.parametrize("op", OPERATIONS)
@pytest.mark.parametrize("d_in", [6, 8])
def test_every_operation_shape_and_padding(op, d_in):
    node = build_node(op, d_in, 8).eval()
    x = torch.randn(3, 9, d_in)
    mask = torch.arange(9).unsqueeze(0) < torch.tensor([9, 4, 1]).unsqueeze(1)
    x = x * mask.unsqueeze(-1)
    y = node(x, mask)
    assert y.shape == (3, 9, 8)
    assert torch.all(y[~mask] == 0), "padded positions must output zeros"
    # appending padding (and garbage under it) does not change real positions
    x2 = torch.cat([x, 100 * torch.randn(3, 5, d_in)], 1)
    mask2 = torch.cat([mask, torch.zeros(3, 5, dtype=torch.bool)], 1)
    y2 = node(x2, mask2)
    torch.testing.assert_close(y2[:, :9][mask], y[mask], rtol=1e-5, atol=1e-5)


def model(genotype, use_kernels=True, **kw):
    cfg = ModelConfig(genotype=genotype.to_dict(), emb_dim=12, width=8, fc=[6], **kw)
    torch.manual_seed(0)
    return XMCModel(cfg, V, L, use_kernels=use_kernels).eval()


def test_padding_never_changes_scores_for_random_architectures():
    rng = random.Random(0)
    tok, mask = tokens_and_mask([7, 3, 5])
    tok2 = torch.cat([tok, torch.zeros(3, 6, dtype=torch.long)], 1)
    mask2 = torch.cat([mask, torch.zeros(3, 6, dtype=torch.bool)], 1)
    for _ in range(12):
        m = model(random_genotype(rng, 5))
        with torch.no_grad():
            torch.testing.assert_close(m(tok2, mask2), m(tok, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("merge", ["sum", "concat"])
def test_scores_shape_and_layer_weights(merge):
    g = Genotype((("conv3", 0), ("bigru", 1), ("avgpool3", 0)), merge)
    m = model(g)
    tok, mask = tokens_and_mask([5, 2])
    assert m(tok, mask).shape == (2, L)
    w = m.layer_weights()
    assert (w is None) == (merge == "concat")
    if w is not None:
        assert w == pytest.approx([1 / 3] * 3)


def test_kernels_and_eager_build_the_same_function():
    g = Genotype((("conv5", 0), ("bilstm", 0), ("maxpool3", 1)))
    # no dropout: the two draw their masks from different random streams
    a, b = model(g, True, dropout=0.0, dropout_emb=0.0), model(g, False, dropout=0.0, dropout_emb=0.0)
    b.load_state_dict(a.state_dict())
    tok, mask = tokens_and_mask([6, 4, 1])
    with torch.no_grad():
        torch.testing.assert_close(a(tok, mask), b(tok, mask), rtol=1e-4, atol=1e-5)
    # gradients too
    a.train(), b.train()
    for m in (a, b):
        m.zero_grad()
        torch.manual_seed(1)
        m(tok, mask).sum().backward()
    for (n, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters()):
        torch.testing.assert_close(pa.grad, pb.grad, rtol=1e-3, atol=1e-5, msg=n)


def test_presets():
    axml = preset("attentionxml")
    assert Genotype.from_dict(axml.genotype).nodes == (("bilstm", 0),)
    disc = build_model(preset("discovered"), V, L)
    tok, mask = tokens_and_mask([4, 2])
    assert disc(tok, mask).shape == (2, L)
    assert disc.head.attention.shape == (L, 1024)  # two BiLSTMs of 256 a direction, concatenated
    with pytest.raises(ValueError):
        preset("bert")


def test_pretrained_vectors_frozen_or_trainable():
    vec = np.random.default_rng(0).standard_normal((V, 10)).astype(np.float32)
    g = Genotype((("conv1", 0),))
    cfg = ModelConfig(genotype=g.to_dict(), width=8, fc=[4], freeze_emb=True)
    m = XMCModel(cfg, V, L, vectors=vec)
    assert m.embedding.weight.shape == (V, 10) and not m.embedding.weight.requires_grad
    torch.testing.assert_close(m.embedding.weight[1:], torch.from_numpy(vec[1:]))
    with pytest.raises(ValueError):
        XMCModel(cfg, V + 1, L, vectors=vec)


def test_vectors_mapped_read_only_load_without_a_warning(tmp_path):
    # the workers map the run's vectors.npy read-only; the embedding takes a copy, silently
    np.save(tmp_path / "v.npy", np.random.default_rng(0).standard_normal((V, 10)).astype(np.float32))
    vec = np.load(tmp_path / "v.npy", mmap_mode="r")
    cfg = ModelConfig(genotype=Genotype((("conv1", 0),)).to_dict(), width=8, fc=[4])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        m = XMCModel(cfg, V, L, vectors=vec)
    torch.testing.assert_close(m.embedding.weight[1:], torch.from_numpy(np.array(vec[1:])))


def test_tfidf_mlp_features():
    cfg = preset("tfidf-mlp")
    cfg.hidden, cfg.max_features = [16, 8], 40
    m = build_model(cfg, V, L)
    # three documents: 2 3 4 / 2 3 / 5 5 5
    ids = np.array([2, 3, 4, 2, 3, 5, 5, 5], dtype=np.int32)
    offsets = np.array([0, 3, 5, 8])
    m.fit(ids, offsets)
    assert m.bigram_keys.tolist() == [2 * V + 3]               # the only bigram in two documents
    tok = torch.tensor([[2, 3, 4], [5, 5, 0]])
    mask = tok > 0
    f, off, w = m.features(tok, mask)
    assert off.tolist() == [0, 4]                               # doc 0: 2, 3, 4 and the bigram (2,3)
    rows = torch.repeat_interleave(torch.arange(2), torch.diff(torch.tensor(off.tolist() + [len(f)])))
    norms = torch.zeros(2).index_add_(0, rows, w * w)
    torch.testing.assert_close(norms, torch.ones(2))           # L2-normalised rows
    assert m(tok, mask).shape == (2, L)
    # idf: a word in 2 of 3 documents weighs less than one in 1 of 3
    idf = {int(m.unigram_map[t]): float(m.idf[m.unigram_map[t]]) for t in (2, 4)}
    assert idf[int(m.unigram_map[2])] < idf[int(m.unigram_map[4])]
