"""The TF-IDF + MLP baseline of our comparison tables (the Keras arXiv example): TF-IDF unigram and
bigram features computed from the token batch inside forward -> MLP -> one score per label."""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch
import torch.nn as nn

from . import ops

if TYPE_CHECKING:
    from .model_config import ModelConfig


class TfidfMLP(nn.Module):
    """TF-IDF unigram+bigram features -> MLP -> one score per label.

    Features are computed from the token batch inside forward (no dense
    [documents x features] matrix anywhere): unigram and bigram counts per
    row, times idf, L2-normalised, fed to an EmbeddingBag (a sparse matmul).
    `fit` chooses the features on the training split.
    """

    def __init__(self, cfg: ModelConfig, vocab_size: int, num_labels: int, num_features: Optional[int] = None):
        super().__init__()
        self.cfg = cfg
        F_ = num_features or cfg.max_features
        self.register_buffer("unigram_map", torch.full((vocab_size,), -1, dtype=torch.long))
        self.register_buffer("bigram_keys", torch.zeros(0, dtype=torch.long))
        self.register_buffer("bigram_ids", torch.zeros(0, dtype=torch.long))
        self.register_buffer("idf", torch.ones(F_))
        self.vocab_size = vocab_size
        self.bag = nn.EmbeddingBag(F_, cfg.hidden[0], mode="sum", sparse=True)
        self.bias0 = nn.Parameter(torch.zeros(cfg.hidden[0]))
        self.mlp = nn.ModuleList(nn.Linear(a, b) for a, b in zip(cfg.hidden[:-1], cfg.hidden[1:]))
        self.out = nn.Linear(cfg.hidden[-1], num_labels)
        nn.init.normal_(self.bag.weight, std=1.0 / math.sqrt(cfg.hidden[0]))

    def _keys(self, tokens, mask):
        """Bigram keys (a*V + b) of consecutive real tokens, and the rows they belong to."""
        both = mask[:, :-1] & mask[:, 1:]
        keys = tokens[:, :-1] * self.vocab_size + tokens[:, 1:]
        rows = torch.arange(tokens.shape[0], device=tokens.device).unsqueeze(1).expand_as(keys)
        return keys[both], rows[both]

    @torch.no_grad()
    def fit(self, token_ids: np.ndarray, offsets: np.ndarray) -> "TfidfMLP":
        """Keep the max_features n-grams with the highest document frequency; idf as sklearn's smooth idf."""
        n_docs = len(offsets) - 1
        V = self.vocab_size
        doc = np.repeat(np.arange(n_docs), np.diff(offsets))
        uni = np.unique(doc.astype(np.int64) * V + token_ids)         # (doc, token) pairs, once per doc
        uni_df = np.bincount(uni % V, minlength=V)
        uni_df[:2] = 0                                                  # <pad>, <unk>
        same = doc[1:] == doc[:-1]
        keys = token_ids[:-1].astype(np.int64) * V + token_ids[1:]
        pairs = np.unique(keys[same] * n_docs + doc[1:][same])          # (bigram, doc), once per doc
        bi_keys, bi_df = np.unique(pairs // n_docs, return_counts=True)
        keep_bi = bi_df >= 2
        bi_keys, bi_df = bi_keys[keep_bi], bi_df[keep_bi]
        cand_df = np.concatenate([uni_df, bi_df])
        order = np.argsort(-cand_df, kind="stable")[: self.bag.num_embeddings]
        order = order[cand_df[order] > 0]
        F_ = self.bag.num_embeddings
        feat = np.full(len(cand_df), -1, dtype=np.int64)
        feat[order] = np.arange(len(order))
        self.unigram_map.copy_(torch.from_numpy(feat[:V]))
        bmask = feat[V:] >= 0
        self.bigram_keys = torch.from_numpy(bi_keys[bmask]).to(self.unigram_map.device)
        self.bigram_ids = torch.from_numpy(feat[V:][bmask]).to(self.unigram_map.device)
        idf = np.ones(F_, dtype=np.float32)
        idf[: len(order)] = np.log((1 + n_docs) / (1 + cand_df[order])) + 1.0
        self.idf.copy_(torch.from_numpy(idf))
        return self

    def load_state_dict(self, state, strict=True, assign=False):
        # the bigram tables' sizes depend on the fit: resize before loading
        self.bigram_keys = torch.empty_like(state["bigram_keys"])
        self.bigram_ids = torch.empty_like(state["bigram_ids"])
        return super().load_state_dict(state, strict=strict, assign=assign)

    def features(self, tokens, mask):
        """(feature ids, offsets, weights) of the batch: L2-normalised tf-idf, for EmbeddingBag."""
        B = tokens.shape[0]
        rows = torch.arange(B, device=tokens.device).unsqueeze(1).expand_as(tokens)
        uf = self.unigram_map[tokens[mask]]
        ur = rows[mask]
        keys, br = self._keys(tokens, mask)
        pos = torch.searchsorted(self.bigram_keys, keys).clamp(max=max(len(self.bigram_keys) - 1, 0))
        found = self.bigram_keys[pos] == keys if len(self.bigram_keys) else torch.zeros_like(keys, dtype=torch.bool)
        feats = torch.cat([uf, self.bigram_ids[pos][found]])
        rows = torch.cat([ur, br[found]])
        ok = feats >= 0
        F_ = self.bag.num_embeddings
        pair, tf = torch.unique(rows[ok] * F_ + feats[ok], return_counts=True)   # sorted by row
        r, f = pair // F_, pair % F_
        w = tf.to(torch.float32) * self.idf[f]
        norm = torch.zeros(B, device=w.device).index_add_(0, r, w * w).sqrt().clamp_min(1e-12)
        w = w / norm[r]
        offsets = torch.searchsorted(r, torch.arange(B, device=r.device))
        return f, offsets, w

    def forward(self, tokens, mask):
        f, offsets, w = self.features(tokens, mask)
        x = ops.dropout(self.bag(f, offsets, per_sample_weights=w) + self.bias0, self.cfg.dropout,
                        self.training, relu=True)
        for lin in self.mlp:
            x = ops.dropout(lin(x), self.cfg.dropout, self.training, relu=True)
        return self.out(x)

    def init_label_bias(self, log_odds: np.ndarray) -> None:
        self.out.bias.data.copy_(torch.as_tensor(log_odds, dtype=torch.float32))

    def layer_weights(self):
        return None
