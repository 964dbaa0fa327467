"""Genotype -> nn.Module, and the preset models of our comparison tables.

text tokens -> embedding (node 0) -> DAG of layer nodes -> merge (weighted
layer-sum or concat) -> dropout -> label-wise attention -> FC chain shared by
all labels -> one score per label. Only the DAG varies between candidates.

Padding never leaks into real tokens: convolutions and pools see zeros / -inf
at padded positions and zero their outputs there, RNNs run on packed
sequences. Appending padding to a batch leaves every real token's states,
and so the scores, unchanged.
"""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from . import ops
from .model_config import ModelConfig
from .space import Genotype
from .tfidf import TfidfMLP


# ---- presets --------------------------------------------------------------------------------------

PRESETS = {
    # AttentionXML-1: one BiLSTM over the embedding (hidden 256 a direction), attention, FC [256]
    "attentionxml": ModelConfig(genotype=Genotype((("bilstm", 0),), "concat").to_dict()),
    # the architecture XMC-NAS discovered: two BiLSTMs reading the embedding, concatenated
    "discovered": ModelConfig(genotype=Genotype((("bilstm", 0), ("bilstm", 0)), "concat").to_dict()),
    # the Keras arXiv example: TF-IDF uni+bigrams -> 512 ReLU -> 256 ReLU -> one sigmoid per label
    "tfidf-mlp": ModelConfig(kind="tfidf-mlp"),
}

# Training settings a preset is known to do better with (the command line's flags still override them).
PRESET_TRAINING = {"tfidf-mlp": {"batch_size": 128, "lr": 2e-3, "max_epochs": 60}}


def preset(name: str) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; expected one of {sorted(PRESETS)}")
    return ModelConfig.from_dict(PRESETS[name].to_dict())


# ---- layer nodes --------------------------------------------------------------------------------

class Conv(nn.Module):
    """1-D convolution, stride 1, same padding, ReLU; padded positions read as zeros and output zeros."""

    def __init__(self, d_in: int, d_out: int, k: int):
        super().__init__()
        self.conv = nn.Conv1d(d_in, d_out, k, padding=k // 2)

    def forward(self, x, mask):
        m = mask.unsqueeze(-1).to(x.dtype)
        y = self.conv((x * m).transpose(1, 2)).transpose(1, 2)
        return F.relu(y) * m


class Pool(nn.Module):
    """Max or average pooling over 3 tokens, stride 1, over real tokens only."""

    def __init__(self, d_in: int, d_out: int, kind: str, k: int = 3):
        super().__init__()
        self.kind, self.k = kind, k
        self.proj = nn.Linear(d_in, d_out) if d_in != d_out else None

    def forward(self, x, mask):
        m = mask.unsqueeze(-1)
        xt = x.transpose(1, 2)
        if self.kind == "max":
            y = F.max_pool1d(xt.masked_fill(~m.transpose(1, 2), float("-inf")), self.k, 1, self.k // 2)
            y = y.transpose(1, 2)
        else:
            mf = m.to(x.dtype)
            s = F.avg_pool1d((x * mf).transpose(1, 2), self.k, 1, self.k // 2, count_include_pad=True)
            n = F.avg_pool1d(mf.transpose(1, 2), self.k, 1, self.k // 2, count_include_pad=True)
            y = (s / n.clamp_min(1e-6)).transpose(1, 2)
        y = y.masked_fill(~m, 0.0)
        return self.proj(y) * m.to(y.dtype) if self.proj is not None else y


#: The dtype recurrent layers compute in, chosen on purpose: under torch.autocast the packed
#: cuDNN RNN runs in float16 whatever autocast's dtype (aten/src/ATen/cudnn/AutocastRNN.cpp casts
#: input, states and weights to kHalf), and with no loss scaling small float16 gradients vanish.
#: float32 keeps them (on CUDA through TF32 tensor cores where torch.backends.cudnn.allow_tf32).
RNN_DTYPE = torch.float32


class BiRNN(nn.Module):
    """Bidirectional LSTM or GRU on packed sequences; output = both directions concatenated.

    Runs outside autocast in RNN_DTYPE and hands back its input's dtype."""

    def __init__(self, d_in: int, d_out: int, cell: str):
        super().__init__()
        if d_out % 2:
            raise ValueError(f"a bidirectional RNN needs an even width, got {d_out}")
        rnn = nn.LSTM if cell == "lstm" else nn.GRU
        self.rnn = rnn(d_in, d_out // 2, batch_first=True, bidirectional=True)

    def forward(self, x, mask):
        lengths = mask.sum(1)
        with torch.autocast(x.device.type, enabled=False):
            packed = pack_padded_sequence(x.to(RNN_DTYPE), lengths.clamp_min(1).cpu(), batch_first=True,
                                          enforce_sorted=False)
            out, _ = self.rnn(packed)
            out, _ = pad_packed_sequence(out, batch_first=True, total_length=x.shape[1])
        return out.to(x.dtype) * mask.unsqueeze(-1).to(x.dtype)


def build_node(op: str, d_in: int, d_out: int) -> nn.Module:
    """One entry per operation of space.OPERATIONS."""
    if op.startswith("conv"):
        return Conv(d_in, d_out, int(op[4:]))
    if op in ("maxpool3", "avgpool3"):
        return Pool(d_in, d_out, op[:3], 3)
    if op in ("bilstm", "bigru"):
        return BiRNN(d_in, d_out, op[2:])
    raise ValueError(f"no builder for operation {op!r}")


# ---- the network ------------------------------------------------------------------------------

def state_dtype(x: torch.Tensor) -> torch.dtype:
    """The one dtype of the states a network hands between its parts (docs/design.md "Precision"):
    autocast's dtype on x's device when autocast is on there, else x's own."""
    device = x.device.type
    if torch.is_autocast_enabled(device):
        dtype = torch.get_autocast_dtype(device)
        if dtype == torch.float16:
            raise ValueError("float16 autocast is not supported (there is no loss scaling): use bfloat16")
        return dtype
    return x.dtype


class DAGEncoder(nn.Module):
    """Runs the genotype's nodes in order; returns every layer node's output [B,N,D], all of one
    dtype (state_dtype of the embedding), whatever dtype each operation computes in."""

    def __init__(self, genotype: Genotype, emb_dim: int, width: int):
        super().__init__()
        self.genotype = genotype
        self.nodes = nn.ModuleList(
            build_node(op, emb_dim if i == 0 else width, width) for op, i in genotype.nodes)

    def forward(self, emb, mask):
        dtype = state_dtype(emb)
        states = [emb.to(dtype)]
        for node, (_, i) in zip(self.nodes, self.genotype.nodes):
            states.append(node(states[i], mask).to(dtype))
        return states[1:]


class Merge(nn.Module):
    """Weighted layer-sum sum_i w_i out_i (w learned; the operation-importance instrument) or concat."""

    def __init__(self, k: int, how: str, use_kernels: bool = True):
        super().__init__()
        self.how, self.use_kernels = how, use_kernels
        self.weight = nn.Parameter(torch.full((k,), 1.0 / k)) if how == "sum" else None

    def forward(self, outs):
        if self.how == "concat":
            return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)
        fn = ops.layer_sum if self.use_kernels else ops.layer_sum_reference
        return fn(outs, self.weight)


class AttentionHead(nn.Module):
    """Label-wise attention, then an FC chain shared by all labels (Linear, ReLU, dropout), then
    one score per label. A shortlisted head (shortlist K > 0) scores the labels it is given, [B, K],
    and its attention weights train with sparse gradients (only the rows used)."""

    def __init__(self, d: int, num_labels: int, fc: list, dropout: float, use_kernels: bool = True,
                 shortlist: int = 0):
        super().__init__()
        self.use_kernels, self.p, self.shortlist = use_kernels, dropout, shortlist
        self.attention = nn.Parameter(torch.empty(num_labels, d))
        self.fc = nn.ModuleList(nn.Linear(a, b) for a, b in zip([d] + fc[:-1], fc))
        self.out = nn.Linear(fc[-1] if fc else d, 1, bias=False)
        self.label_bias = nn.Parameter(torch.zeros(num_labels))   # set to the labels' prior log-odds
        nn.init.xavier_uniform_(self.attention)
        for m in self.fc:
            nn.init.xavier_uniform_(m.weight)
            nn.init.zeros_(m.bias)
        nn.init.xavier_uniform_(self.out.weight)

    def _act(self, x):
        if self.use_kernels:
            return ops.dropout(x, self.p, self.training, relu=True)     # one fused pass
        return F.dropout(F.relu(x), self.p, self.training)

    @property
    def sparse_parameters(self) -> tuple:
        """The parameters whose gradients are sparse (optim.optimizers gives them SparseAdam)."""
        return (self.attention,) if self.shortlist else ()

    def forward(self, h, mask, labels: Optional[torch.Tensor] = None):
        """Scores [B, L]; with `labels` (ids [B, K], -1 padding), the scores [B, K] of those labels
        (-inf at padding)."""
        if labels is not None:
            return self.shortlisted(h, mask, labels)
        W = self.attention.to(h.dtype)
        fc = list(self.fc)
        if self.use_kernels and fc:
            # The attention weights of a row sum to 1, so the first FC layer commutes with the
            # attention: Linear(sum_n p_n h_n) = sum_n p_n Linear(h_n). Attending over the
            # projected tokens skips the [B,L,D] x [D,fc] product and the [B,L,D] context.
            # (Rows always hold a real token: the data layer gives an empty text one <unk>.)
            first = fc.pop(0)
            v = F.linear(h, first.weight, first.bias).to(h.dtype)                # [B, N, fc0]
            # One FC layer (the presets, the budgets): the attention, ReLU, dropout and the score in one
            # op, which writes only the [B, L] scores where its kernel runs (out of training; in training
            # at short texts), else label_attention then relu_dropout_dot. Not under autocast, whose
            # products cast their weights to its dtype (the precision rule: one dtype through the head);
            # there the two steps, as the Linear layers.
            if not fc and not torch.is_autocast_enabled(h.device.type):
                return ops.label_attention_head(h, mask, W, v, self.out.weight[0], self.p, self.training) \
                    + self.label_bias
            x = self._act(ops.label_attention(h, mask, W, v))                   # [B, L, fc0]
        else:
            fn = ops.label_attention if self.use_kernels else ops.label_attention_reference
            x = fn(h, mask, W)                                                  # [B, L, D]
        for lin in fc:
            x = self._act(lin(x))
        return self.out(x).squeeze(-1) + self.label_bias                        # [B, L]

    def shortlisted(self, h, mask, labels):
        """The scores [B, K] of the labels [B, K]: the attention over each document's own labels (the
        first FC layer folded into the values, as the dense path does), the FC tail shared by the
        labels, each label's bias; -inf at padding slots (-1). No [B, L] tensor."""
        W = self.attention if self.attention.dtype == h.dtype else self.attention.to(h.dtype)
        fc = list(self.fc)
        first = fc.pop(0) if fc else None
        v = F.linear(h, first.weight, first.bias).to(h.dtype) if first is not None else None
        x = ops.label_attention_shortlist(h, mask, W, labels, v, sparse_grad=bool(self.shortlist))
        if first is not None and not fc and not torch.is_autocast_enabled(x.device.type):
            z = ops.relu_dropout_dot(x, self.out.weight[0], self.p, self.training)     # [B, K]
        else:
            if first is not None:
                x = self._act(x)
            for lin in fc:
                x = self._act(lin(x))
            z = self.out(x).squeeze(-1)
        valid = labels >= 0
        z = z + self.label_bias[labels.clamp(min=0)]
        return z.masked_fill(~valid, float("-inf"))


class XMCModel(nn.Module):
    """embedding -> DAG -> merge -> dropout -> label-wise attention -> FC -> scores [B, L]."""

    def __init__(self, cfg: ModelConfig, vocab_size: int, num_labels: int,
                 vectors: Optional[np.ndarray] = None, use_kernels: bool = True):
        super().__init__()
        self.cfg = cfg
        self.genotype = Genotype.from_dict(cfg.genotype)
        emb_dim = vectors.shape[1] if vectors is not None else cfg.emb_dim
        # sparse gradients: each step touches only the rows of the words in the batch (SparseAdam)
        self.embedding = nn.Embedding(vocab_size, emb_dim, padding_idx=0, sparse=not cfg.freeze_emb)
        if vectors is not None:
            if vectors.shape[0] != vocab_size:
                raise ValueError(f"word vectors have {vectors.shape[0]} rows for a vocabulary of {vocab_size}")
            self.embedding.weight.data.copy_(torch.from_numpy(np.array(vectors, dtype=np.float32)))  # a copy: may be read-only
        else:
            nn.init.uniform_(self.embedding.weight, -0.1, 0.1)
        with torch.no_grad():
            self.embedding.weight[0].zero_()
        self.embedding.weight.requires_grad_(not cfg.freeze_emb)
        self.encoder = DAGEncoder(self.genotype, emb_dim, cfg.width)
        self.merge = Merge(self.genotype.depth, self.genotype.merge, use_kernels)
        merged = cfg.width * (self.genotype.depth if self.genotype.merge == "concat" else 1)
        self.use_kernels = use_kernels
        self.head = AttentionHead(merged, num_labels, cfg.fc, cfg.dropout, use_kernels, cfg.shortlist)

    def _drop(self, x, p):
        return ops.dropout(x, p, self.training) if self.use_kernels else F.dropout(x, p, self.training)

    @property
    def shortlist(self) -> int:
        """K: the labels scored per document (0: every label)."""
        return self.head.shortlist

    def forward(self, tokens: torch.Tensor, mask: torch.Tensor, labels: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Scores [B, L], or with `labels` (ids [B, K], -1 padding) the scores [B, K] of those labels."""
        x = self._drop(self.embedding(tokens), self.cfg.dropout_emb)
        h = self._drop(self.merge(self.encoder(x, mask)), self.cfg.dropout)
        return self.head(h, mask) if labels is None else self.head(h, mask, labels)

    def init_label_bias(self, log_odds: np.ndarray) -> None:
        """Start every label's score at its prior log-odds, so training starts from the label
        frequencies instead of spending its first epochs learning them."""
        self.head.label_bias.data.copy_(torch.as_tensor(log_odds, dtype=torch.float32))

    def layer_weights(self) -> Optional[list]:
        """The learned layer-sum weights, one per node (None for a concat merge)."""
        w = self.merge.weight
        return None if w is None else [float(v) for v in w.detach().cpu()]


def build_model(cfg: ModelConfig, vocab_size: int, num_labels: int, vectors=None,
                use_kernels: bool = True, seed: Optional[int] = None) -> nn.Module:
    """The network of `cfg`. With a seed, its initial weights depend on the seed alone
    (the global random state is left as it was)."""
    if cfg.kind not in ("dag", "tfidf-mlp"):
        raise ValueError(f"unknown model kind {cfg.kind!r}")
    with torch.random.fork_rng(devices=[], enabled=seed is not None):
        if seed is not None:
            torch.manual_seed(seed)
        if cfg.kind == "dag":
            return XMCModel(cfg, vocab_size, num_labels, vectors, use_kernels)
        return TfidfMLP(cfg, vocab_size, num_labels)


@torch.no_grad()
def inherit_weights(child: nn.Module, parent_state: dict, parent_genotype: Genotype) -> list:
    """Copy a parent's trained weights into `child` wherever the two networks agree: the embedding,
    the head, and each node whose operation and input are unchanged (the same position in both
    genotypes); a part is taken whole or not at all (any shape differs: it stays fresh). Returns the
    names of the parts inherited ("embedding", "head", "node2", ...)."""
    own = child.state_dict()
    parts = []

    def take(prefix: str, part: str) -> None:
        keys = [k for k in own if k.startswith(prefix)]
        if keys and all(k in parent_state and parent_state[k].shape == own[k].shape for k in keys):
            for k in keys:
                own[k].copy_(parent_state[k])
            parts.append(part)

    take("embedding.", "embedding")
    for j, (node, parent_node) in enumerate(zip(child.genotype.nodes, parent_genotype.nodes)):
        if tuple(node) == tuple(parent_node):
            take(f"encoder.nodes.{j}.", f"node{j + 1}")
    take("head.", "head")
    return parts


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)
