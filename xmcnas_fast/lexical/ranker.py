"""A small learned ranker over the network's and the lexical model's scores (the "ranker" fusion).

A weight on a grid fuses two probabilities; it cannot use where each model ranks a label, how often the
label is, or that the lexical model's probabilities saturate at 1 (napkinXC's squared-hinge probability
is exactly 1 past the margin, so its confident labels tie). The ranker scores each candidate pair
(document, label), a label of the lexical top list or of the network's top `NET_TOP`, from

    z, sigmoid(z)                       the network's logit and probability
    logit p_lex, p_lex, listed          the lexical model's (unlisted: LOGIT_FLOOR, 0, 0)
    log(1 + network rank)               among every label
    log(1 + lexical rank)               the position in its list (unlisted: the list's depth + 10)
    log(1 + the label's training count)
    sigmoid(z) p_lex

with a one-hidden-layer network (HIDDEN ReLU units) fitted by Adam on the validation split's pairs
(binary cross-entropy, STEPS full-batch steps: few enough to stop well before it learns the split by
heart), INITS of them from different seeds, their probabilities averaged. Labels that are no candidate
score 0. Whether it serves instead of the weight grid is decided on the validation split too, by its
out-of-fold figures (`cross_fitted`: fitted on four fifths of the documents, scored on the fifth), so
the choice never compares a model with the documents it was fitted on.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np
import torch

FEATURES = ("z", "p_net", "lex_logit", "p_lex", "listed", "net_rank", "lex_rank", "label_count", "product")
NET_TOP = 20
HIDDEN = 16
INITS = 5
STEPS = 300
LR = 1e-2
WEIGHT_DECAY = 1e-4
FOLDS = 5
MAX_PAIRS = 120_000         # pairs a ranker is fitted on at most (a random share of them beyond)
FLOPS = 2e10                # what expected_seconds takes a CPU to do a second
LOGIT_FLOOR = -9.2          # logit of 1e-4: an unlisted label's lexical logit
CHUNK = 1 << 22             # pairs' features built [rows, L, F] at most this many (row, label) a time


def lexical_ranks(lex_ids, num_labels: int, device) -> torch.Tensor:
    """[B, L] each label's position in its document's lexical top list (unlisted: depth + 10)."""
    ids = torch.as_tensor(lex_ids, device=device).long()
    r = torch.full((ids.shape[0], num_labels), float(ids.shape[1] + 10), device=device)
    rows, pos = torch.nonzero((ids >= 0) & (ids < num_labels), as_tuple=True)
    r[rows, ids[rows, pos]] = pos.float()
    return r


def label_counts(labels, num_labels: int) -> np.ndarray:
    """log(1 + training count) of each label, from a CSR label matrix (columns past num_labels dropped)."""
    c = np.zeros(num_labels)
    col = np.asarray(labels.sum(0)).ravel()[:num_labels]
    c[: len(col)] = col
    return np.log1p(c)


def pair_features(z: torch.Tensor, p_lex: torch.Tensor, listed: torch.Tensor, lex_rank: torch.Tensor,
                  prior: torch.Tensor) -> tuple:
    """(candidate mask [B, L], features [B, L, F]) of a block of rows."""
    z = z.float()
    order = torch.argsort(z, dim=1, descending=True, stable=True)
    net_rank = torch.empty_like(z)
    net_rank.scatter_(1, order, torch.arange(z.shape[1], device=z.device, dtype=torch.float32).expand_as(order))
    cand = (listed > 0) | (net_rank < NET_TOP)
    p_net = torch.sigmoid(z)
    lex_logit = torch.where(listed > 0, torch.logit(p_lex.clamp(1e-4, 1 - 1e-4)), torch.full_like(z, LOGIT_FLOOR))
    feats = torch.stack([z.clamp(-30, 30), p_net, lex_logit, p_lex, listed, torch.log1p(net_rank),
                         torch.log1p(lex_rank), prior.expand_as(z), p_net * p_lex], dim=-1)
    return cand, feats


def _rows_per_chunk(num_labels: int) -> int:
    return max(1, CHUNK // max(1, num_labels))


def _init_nets(inputs: int, seed: int) -> list:
    """INITS one-hidden-layer networks stacked ([I, F, H], [I, 1, H], [I, H, 1], [I, 1, 1]), each
    initialised as torch.nn.Linear is, from its own seed."""
    g = torch.Generator().manual_seed(seed)
    u = lambda shape, fan_in: (torch.rand(shape, generator=g) * 2 - 1) / np.sqrt(fan_in)
    return [u((INITS, inputs, HIDDEN), inputs), u((INITS, 1, HIDDEN), inputs), u((INITS, HIDDEN, 1), HIDDEN),
            u((INITS, 1, 1), HIDDEN)]


def _forward(params: list, x: torch.Tensor) -> torch.Tensor:
    """[I, P] logits of the stacked networks for pairs x [P, F]."""
    w1, b1, w2, b2 = params
    return (torch.relu(x.unsqueeze(0) @ w1 + b1) @ w2 + b2).squeeze(-1)


@dataclass
class Ranker:
    mean: list                 # [F] feature standardisation
    std: list                  # [F]
    nets: list                 # INITS × {"w1": [H, F], "b1": [H], "w2": [H], "b2": float}
    prior: list                # [L] log(1 + training count)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Ranker":
        r = cls(**{k: d[k] for k in ("mean", "std", "nets", "prior")})
        f = len(FEATURES)
        if len(r.mean) != f or len(r.std) != f or not r.nets or any(np.shape(n["w1"]) != (HIDDEN, f) for n in r.nets):
            raise ValueError(f"ranker: expected {f} features and {HIDDEN} hidden units")
        return r

    def scores(self, z: torch.Tensor, p_lex: torch.Tensor, listed: torch.Tensor, lex_rank: torch.Tensor) -> torch.Tensor:
        """[B, L] the mean probability of its networks for candidate pairs, 0 elsewhere."""
        if len(self.prior) != z.shape[1]:
            raise ValueError(f"ranker fitted for {len(self.prior)} labels, the scores have {z.shape[1]}")
        prior, mean, std, params = self._tensors(z.device)
        out = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
        step = _rows_per_chunk(z.shape[1])
        for s in range(0, z.shape[0], step):
            sl = slice(s, s + step)
            cand, feats = pair_features(z[sl], p_lex[sl], listed[sl], lex_rank[sl], prior)
            block = out[sl]
            block[cand] = pair_scores((mean, std, params), feats[cand])
        return out

    def _tensors(self, dev) -> tuple:
        """(prior, mean, std, stacked network parameters) on `dev`, made once per device (a served
        bundle scores batch after batch)."""
        cache = self.__dict__.setdefault("_on_device", {})
        if dev not in cache:
            t = lambda values, shape: torch.tensor(values, dtype=torch.float32, device=dev).reshape(shape)
            k, f = len(self.nets), len(FEATURES)
            params = [t([n["w1"] for n in self.nets], (k, HIDDEN, f)).transpose(1, 2),
                      t([n["b1"] for n in self.nets], (k, 1, HIDDEN)), t([n["w2"] for n in self.nets], (k, HIDDEN, 1)),
                      t([n["b2"] for n in self.nets], (k, 1, 1))]
            cache[dev] = (t(self.prior, (-1,)), t(self.mean, (-1,)), t(self.std, (-1,)), params)
        return cache[dev]


def _pairs(z, p_lex, listed, lex_rank, prior, truth) -> tuple:
    """(features [P, F], targets [P]) of every candidate pair of the rows given."""
    xs, ys = [], []
    step = _rows_per_chunk(z.shape[1])
    for s in range(0, z.shape[0], step):
        sl = slice(s, s + step)
        cand, feats = pair_features(z[sl], p_lex[sl], listed[sl], lex_rank[sl], prior)
        xs.append(feats[cand])
        ys.append(truth[sl][cand])
    return torch.cat(xs), torch.cat(ys)


def fit_ranker(z: torch.Tensor, p_lex: torch.Tensor, listed: torch.Tensor, lex_rank: torch.Tensor,
               truth: torch.Tensor, prior: np.ndarray, seed: int = 0) -> Ranker:
    """A Ranker fitted on the candidate pairs of these rows (truth [n, L] 0/1, on z's device)."""
    prior_t = torch.as_tensor(prior, dtype=torch.float32, device=z.device)
    x, y = _pairs(z, p_lex, listed, lex_rank, prior_t, truth)
    mean, std, params = fit_pairs(x, y, seed)
    w1, b1, w2, b2 = params
    nets = [{"w1": w1[i].T.tolist(), "b1": b1[i, 0].tolist(), "w2": w2[i, :, 0].tolist(), "b2": float(b2[i, 0, 0])}
            for i in range(INITS)]
    return Ranker(mean.tolist(), std.tolist(), nets, [round(float(v), 6) for v in prior])


def fit_pairs(x: torch.Tensor, y: torch.Tensor, seed: int = 0) -> tuple:
    """(mean [F], std [F], stacked parameters) of INITS networks fitted on pairs' features x [P, F] and
    0/1 targets y [P], on the host; `pair_scores` scores pairs with them."""
    x, y = x.cpu(), y.cpu().float()
    if len(x) > MAX_PAIRS:          # a pointwise loss: a random share of the pairs stands for them all
        keep = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))[:MAX_PAIRS]
        x, y = x[keep], y[keep]
    mean = x.mean(0)
    std = x.std(0).clamp(min=1e-6) if len(x) > 1 else torch.ones_like(mean)
    x = (x - mean) / std
    params = [p.requires_grad_() for p in _init_nets(x.shape[1], seed)]
    opt = torch.optim.Adam(params, lr=LR, weight_decay=WEIGHT_DECAY)
    target = y.expand(INITS, -1)
    with torch.enable_grad():          # evaluations run under no_grad
        for _ in range(STEPS):
            opt.zero_grad()
            # each network's mean loss, summed: the same gradients as fitting them one by one
            loss = torch.nn.functional.binary_cross_entropy_with_logits(_forward(params, x), target) * INITS
            loss.backward()
            opt.step()
    return mean, std, [p.detach() for p in params]


def pair_scores(fitted: tuple, x: torch.Tensor) -> torch.Tensor:
    """[P] the mean probability of fit_pairs' networks for pairs' features x [P, F]."""
    mean, std, params = fitted
    return torch.sigmoid(_forward(params, (x - mean) / std)).mean(0)


def cross_fitted(z, p_lex, listed, lex_rank, truth, prior: np.ndarray, seed: int = 0,
                 folds: int = FOLDS) -> torch.Tensor:
    """[n, L] out-of-fold ranker scores: each document's from a ranker fitted on the other folds."""
    n = z.shape[0]
    out = torch.zeros(z.shape, dtype=torch.float32, device=z.device)
    fold = torch.arange(n, device=z.device) % folds
    for f in range(min(folds, n)):
        test = fold == f
        train = ~test
        if not bool(train.any()):
            continue
        r = fit_ranker(z[train], p_lex[train], listed[train], lex_rank[train], truth[train], prior, seed)
        out[test] = r.scores(z[test], p_lex[test], listed[test], lex_rank[test])
    return out


def expected_seconds(documents: int, depth: int) -> float:
    """About how long choosing the fusion with the ranker takes for a validation split of `documents` with
    top lists `depth` long (FOLDS + 1 fits; measured: 25 s for 1,000 documents and depth 50 on 2 cores)."""
    pairs = min(documents * (depth + NET_TOP // 4), MAX_PAIRS)   # the list, and network picks it lacks (~1 in 4)
    return (FOLDS + 1) * STEPS * INITS * pairs * 6 * (len(FEATURES) + 2) * HIDDEN / FLOPS


def dense_truth(truth_csr, num_labels: int, device) -> torch.Tensor:
    """[n, L] 0/1 of a CSR truth (columns past num_labels dropped)."""
    coo = truth_csr.tocoo()
    keep = coo.col < num_labels
    t = torch.zeros(truth_csr.shape[0], num_labels, device=device)
    t[torch.as_tensor(coo.row[keep], device=device).long(), torch.as_tensor(coo.col[keep], device=device).long()] = 1.0
    return t
