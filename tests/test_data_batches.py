"""iterate_batches: coverage, determinism, padding, masks, labels."""
import numpy as np
import pytest
import scipy.sparse as sp
import torch

from xmcnas_fast.data import TextDataset, iterate_batches


def _dataset(n=1000, num_labels=30, seed=0, empty_every=0):
    rng = np.random.default_rng(seed)
    lengths = rng.integers(1, 200, size=n)
    if empty_every:
        lengths[::empty_every] = 0
    offsets = np.zeros(n + 1, np.int64)
    np.cumsum(lengths, out=offsets[1:])
    token_ids = rng.integers(2, 500, size=offsets[-1]).astype(np.int32)
    # labels, some beyond num_labels (unseen in train)
    rows, cols = [], []
    for i in range(n):
        for c in rng.choice(num_labels + 5, size=rng.integers(1, 4), replace=False):
            rows.append(i)
            cols.append(c)
    labels = sp.csr_matrix((np.ones(len(rows), np.float32), (rows, cols)), shape=(n, num_labels + 5))
    return TextDataset(token_ids=token_ids, offsets=offsets, labels=labels, ids=None)


@pytest.mark.parametrize("shuffle, bucket", [(True, True), (True, False), (False, True), (False, False)])
def test_every_row_once_and_contents_match(shuffle, bucket):
    ds = _dataset(empty_every=97)
    seen = []
    for b in iterate_batches(ds, 30, 64, shuffle=shuffle, bucket=bucket, seed=3):
        idx = b.index.numpy()
        seen.extend(idx.tolist())
        assert b.tokens.dtype == torch.int64 and b.mask.dtype == torch.bool and b.labels.dtype == torch.float32
        lens = np.maximum(ds.lengths[idx], 1)
        assert b.tokens.shape[1] == lens.max()
        np.testing.assert_array_equal(b.mask.sum(1).numpy(), lens)
        # mask is a prefix; padding is 0 and only where the mask is False
        assert torch.equal(b.mask, torch.arange(b.tokens.shape[1])[None, :] < torch.from_numpy(lens)[:, None])
        assert bool((b.tokens[~b.mask] == 0).all())
        for j, i in enumerate(idx):
            want = ds.tokens(i).tolist() or [1]  # an empty document is one <unk>
            assert b.tokens[j, : len(want)].tolist() == want
        dense = ds.labels[idx].toarray()[:, :30]
        np.testing.assert_array_equal(b.labels.numpy(), dense)
    assert sorted(seen) == list(range(len(ds)))
    if not shuffle and not bucket:
        assert seen == list(range(len(ds)))


def test_deterministic_per_seed():
    ds = _dataset()

    def order(seed):
        return [b.index.tolist() for b in iterate_batches(ds, 30, 40, shuffle=True, seed=seed)]

    assert order(1) == order(1)
    assert order(1) != order(2)


def _padding(batches):
    return sum(int((~b.mask).sum()) for b in batches)


def test_bucketing_pads_less_than_random_batches():
    ds = _dataset(n=4000)
    bucketed = _padding(iterate_batches(ds, 30, 40, shuffle=True, bucket=True))
    plain = _padding(iterate_batches(ds, 30, 40, shuffle=True, bucket=False))
    assert bucketed < 0.25 * plain


def test_bucketed_epochs_differ_in_batch_composition():
    ds = _dataset(n=4000)
    a = {tuple(sorted(b.index.tolist())) for b in iterate_batches(ds, 30, 40, shuffle=True, seed=0)}
    b = {tuple(sorted(b.index.tolist())) for b in iterate_batches(ds, 30, 40, shuffle=True, seed=1)}
    assert len(a & b) < 0.1 * len(a)


def test_drop_last_and_max_len():
    ds = _dataset(n=130)
    sizes = [len(b) for b in iterate_batches(ds, 30, 40, shuffle=True, drop_last=True)]
    assert sizes == [40, 40, 40]
    for b in iterate_batches(ds, 30, 40, shuffle=False, max_len=16):
        assert b.tokens.shape[1] <= 16
        lens = np.clip(ds.lengths[b.index.numpy()], 1, 16)
        np.testing.assert_array_equal(b.mask.sum(1).numpy(), lens)
        for j, i in enumerate(b.index.tolist()):
            assert b.tokens[j, : lens[j]].tolist() == ds.tokens(i)[:16].tolist()


def test_batch_to_device():
    ds = _dataset(n=10)
    b = next(iterate_batches(ds, 30, 4, shuffle=False, device="cpu"))
    assert b.tokens.device.type == "cpu" and len(b) == 4
    b2 = b.to("cpu")
    assert torch.equal(b2.tokens, b.tokens) and torch.equal(b2.labels, b.labels)


@pytest.mark.cuda
def test_batches_on_cuda_pinned():
    ds = _dataset(n=100)
    for b in iterate_batches(ds, 30, 32, shuffle=True, device="cuda", pin_memory=True):
        assert b.tokens.is_cuda and b.mask.is_cuda and b.labels.is_cuda and b.index.device.type == "cpu"
    torch.cuda.synchronize()
