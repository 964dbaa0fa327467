"""Mini-batches of padded token ids, with dense label targets unless asked for none (a shortlisted head
takes its targets from the split's CSR labels: no [B, L] array)."""
from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Optional

import numpy as np
import torch

from .dataset import TextDataset, gather_segments
from .text import PAD, UNK

#: batches per length-sorted chunk in bucketed batching
BUCKET_BATCHES = 50


@dataclass
class Batch:
    tokens: torch.Tensor   # int64 [B, T], T = longest in the batch, padded with 0
    mask: torch.Tensor     # bool [B, T], True on real tokens
    labels: Optional[torch.Tensor]   # float32 [B, num_labels], dense 0/1, trained labels only (None: not made)
    index: torch.Tensor    # int64 [B], rows of the split: always on the host (it addresses host arrays)

    def to(self, device, non_blocking: bool = False) -> "Batch":
        """The batch with its tensors on `device`; `index` stays on the host, where the split's labels
        and ids are, so that `ds.labels[batch.index.numpy()]` works for a batch on any device."""
        tokens, mask, labels = (None if t is None else t.to(device, non_blocking=non_blocking)
                                for t in (self.tokens, self.mask, self.labels))
        return Batch(tokens, mask, labels, self.index)

    def pin_memory(self) -> "Batch":
        return Batch(*(None if t is None else t.pin_memory() for t in (self.tokens, self.mask, self.labels)),
                     self.index)

    def __len__(self) -> int:
        return self.tokens.shape[0]


def batch_order(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int = 0, bucket: bool = True,
                drop_last: bool = False) -> list[np.ndarray]:
    """The rows of each batch, every row once. Shuffled: a random permutation (``seed``); bucketed:
    within chunks of ``BUCKET_BATCHES`` batches the rows are sorted by length, so a batch holds
    documents of similar length; then the batch order is shuffled. Unshuffled: in order, or, bucketed,
    sorted by length within the same chunks. ``drop_last`` drops the one incomplete batch."""
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size}: must be at least 1")
    n = len(lengths)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n) if shuffle else np.arange(n)
    if bucket and n:
        chunk = batch_size * BUCKET_BATCHES
        starts = np.arange(0, n, chunk)
        chunk_id = np.repeat(np.arange(len(starts)), np.diff(np.append(starts, n)))
        # sort by (chunk, length), stable: ties keep the (shuffled) order
        order = order[np.lexsort((lengths[order], chunk_id))]
    batches = [order[i:i + batch_size] for i in range(0, n, batch_size)]
    if drop_last and batches and len(batches[-1]) < batch_size:
        batches.pop()
    if shuffle and bucket:
        batches = [batches[i] for i in rng.permutation(len(batches))]
    return batches


def make_batch(ds: TextDataset, rows: np.ndarray, num_labels: int, max_len: int | None = None,
               dense_labels: bool = True) -> Batch:
    """The padded batch of ``rows``: documents cut to ``max_len``; an empty document is one ``<unk>``;
    without ``dense_labels``, no [B, num_labels] targets (``labels`` None)."""
    rows = np.asarray(rows, dtype=np.int64)
    offsets = np.asarray(ds.offsets)
    starts = offsets[rows]
    lens = offsets[rows + 1] - starts
    if max_len is not None:
        lens = np.minimum(lens, max_len)
    shown = np.maximum(lens, 1)
    width = int(shown.max()) if len(rows) else 0
    cols = np.arange(width, dtype=np.int64)
    mask = cols[None, :] < shown[:, None]
    real = cols[None, :] < lens[:, None]
    tokens = np.full((len(rows), width), PAD, dtype=np.int64)
    tokens[real] = np.asarray(ds.token_ids)[(starts[:, None] + cols[None, :])[real]]
    tokens[lens == 0, 0] = UNK
    if not dense_labels:
        return Batch(tokens=torch.from_numpy(tokens), mask=torch.from_numpy(mask), labels=None,
                     index=torch.from_numpy(rows.copy()))

    lab = ds.labels
    label_cols, label_ptr = gather_segments(np.asarray(lab.indices), np.asarray(lab.indptr), rows)
    label_rows = np.repeat(np.arange(len(rows)), np.diff(label_ptr))
    keep = label_cols < num_labels
    dense = np.zeros((len(rows), num_labels), dtype=np.float32)
    dense[label_rows[keep], label_cols[keep]] = 1.0
    return Batch(tokens=torch.from_numpy(tokens), mask=torch.from_numpy(mask),
                 labels=torch.from_numpy(dense), index=torch.from_numpy(rows.copy()))


def iterate_batches(ds: TextDataset, num_labels: int, batch_size: int, *, shuffle: bool, seed: int = 0,
                    bucket: bool = True, max_len: int | None = None, drop_last: bool = False, device=None,
                    pin_memory: bool = False, dense_labels: bool = True) -> Iterator[Batch]:
    """One epoch of batches over ``ds`` (every row once; see :func:`batch_order`). Deterministic for
    a ``seed``: pass a different one each epoch (e.g. ``seed + epoch``) for a new order. With
    ``device`` the batches are moved there (from pinned memory when ``pin_memory`` and the device
    is CUDA, asynchronously)."""
    device = torch.device(device) if device is not None else None
    pin = bool(pin_memory and device is not None and device.type == "cuda")
    for rows in batch_order(ds.lengths, batch_size, shuffle=shuffle, seed=seed, bucket=bucket, drop_last=drop_last):
        batch = make_batch(ds, rows, num_labels, max_len, dense_labels)
        if pin:
            batch = batch.pin_memory()
        if device is not None:
            batch = batch.to(device, non_blocking=pin)
        yield batch
