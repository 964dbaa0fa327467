"""One score per label from the network's and the lexical model's, chosen on the validation split.

The lexical model scores only its top-k labels of a document (a probability each); every other
label has lexical probability 0 and is "not listed". Fused scores are computed on the network's
device from its logits [B, L] and the lexical top lists [B, k] (small host arrays moved there), so
ranking and metrics never bring a [B, L] tensor back to the host.

- "weighted": (1 - w) sigmoid(z) + w p_lex, w on a grid;
- "learned": sigmoid(a z + b logit(p_lex) + c [listed] + d), a logistic regression over the
  (document, label) pairs of the validation split, fitted by L-BFGS;
- "residual": sigmoid(z + logit(p_lex)) (unlisted labels: p_lex = EPS), for a network trained with
  the lexical logits as a fixed offset of its own, so that it learns what the lexical model misses
  (its training needs the stage's cross-fitted top lists of the training split);
- "ranker": a small network over both models' scores, ranks and the label's training count, fitted on
  the validation split's candidate pairs (lexical/ranker.py), for a trained model's final fusion.
w = 0 and w = 1 are the network and the lexical model alone. The method and its parameters are those
of the best validation P@5 (a residual network is only ever fused as it was trained; the ranker's
figure is its out-of-fold one).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Optional

import numpy as np
import torch

WEIGHTS = tuple(round(0.1 * i, 1) for i in range(11))
METHODS = ("weighted", "learned", "residual", "ranker")
EPS = 1e-4
RANKER = "ranker (a small network over both models' scores and ranks, fitted on the validation split)"
RANKER_TRIED = RANKER + ", out of fold"      # its figure in choose_fusion's table


@dataclass
class Fusion:
    method: str = "weighted"                  # "weighted", "learned" or "residual"
    w: float = 0.0                            # weighted: the lexical model's share
    coef: list = field(default_factory=lambda: [1.0, 0.0, 0.0, 0.0])   # learned: a, b, c, d
    ranker: Optional[dict] = None             # ranker: lexical.ranker.Ranker.to_dict()

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"fusion method {self.method!r}: expected one of {', '.join(METHODS)}")
        if self.method == "ranker":
            from .ranker import Ranker

            if not isinstance(self.ranker, dict):
                raise ValueError("fusion method 'ranker' without its ranker")
            self._ranker = Ranker.from_dict(self.ranker)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Fusion":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})

    def describe(self) -> str:
        if self.method == "weighted":
            return f"weighted, lexical share {self.w:.1f}"
        if self.method == "residual":
            return "residual (the network learned what the lexical model misses)"
        if self.method == "ranker":
            return RANKER
        return "learned (" + ", ".join(f"{c:+.2f}" for c in self.coef) + ")"

    def __call__(self, logits: torch.Tensor, lex_ids: torch.Tensor, lex_probs: torch.Tensor) -> torch.Tensor:
        """Fused probabilities [B, L] (float32, on the logits' device)."""
        lex_rank = None
        if self.method == "ranker":
            from .ranker import lexical_ranks

            lex_rank = lexical_ranks(lex_ids, logits.shape[1], logits.device)
        return self.fuse(logits, *dense_lexical(lex_ids, lex_probs, logits.shape[1], logits.device), lex_rank)

    def fuse(self, logits: torch.Tensor, p_lex: torch.Tensor, listed: torch.Tensor,
             lex_rank: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The same, from the top lists made dense once (`dense_lexical`; the ranker also needs each label's
        position in its list, `ranker.lexical_ranks`)."""
        z = logits.float()
        if self.method == "weighted":
            return (1.0 - self.w) * torch.sigmoid(z) + self.w * p_lex
        if self.method == "residual":
            return torch.sigmoid(z + lexical_logits(p_lex, listed))
        if self.method == "ranker":
            if lex_rank is None:
                raise ValueError("the ranker fusion needs the lexical top lists' ranks")
            return self._ranker.scores(z, p_lex, listed, lex_rank)
        return torch.sigmoid(_features(z, p_lex, listed) @ torch.tensor(self.coef, device=z.device))


def dense_lexical(lex_ids: torch.Tensor, lex_probs: torch.Tensor, num_labels: int, device) -> tuple:
    """The top lists as dense [B, L] probabilities and a listed mask, on `device`."""
    ids = torch.as_tensor(lex_ids, device=device).long()
    probs = torch.as_tensor(lex_probs, device=device).float()
    ok = (ids >= 0) & (ids < num_labels)
    safe = torch.where(ok, ids, torch.zeros_like(ids))
    p = torch.zeros(ids.shape[0], num_labels, device=device)
    listed = torch.zeros(ids.shape[0], num_labels, device=device)
    p.scatter_add_(1, safe, torch.where(ok, probs, torch.zeros_like(probs)))
    listed.scatter_add_(1, safe, ok.float())
    return p, listed.clamp_(max=1.0)


def lists_metrics(lists: tuple, truth, num_labels: int, inv_prop=None) -> dict:
    """P@k, nDCG@k, PSP@k of lexical top lists (ids, probs) against a split's truth rows, ranked within
    the lists (no [n, L] array: `num_labels` may be 670K)."""
    from ..metrics import compute_metrics

    ids = np.asarray(lists[0])
    return compute_metrics(torch.as_tensor(np.asarray(lists[1], dtype=np.float32)), truth, inv_prop,
                           slots=torch.from_numpy(np.where(ids < num_labels, ids, -1).astype(np.int64)))


def lexical_logits(p_lex: torch.Tensor, listed: torch.Tensor) -> torch.Tensor:
    """logit(p_lex), with EPS for the labels the top list leaves out: the residual offset."""
    return torch.logit(torch.where(listed > 0, p_lex, torch.zeros_like(p_lex)).clamp(EPS, 1 - EPS))


def residual_offset(lex_ids, lex_probs, num_labels: int, device) -> torch.Tensor:
    """The fixed offset [B, L] a residual network's logits are trained and served with."""
    return lexical_logits(*dense_lexical(lex_ids, lex_probs, num_labels, device))


def _features(z, p_lex, listed):
    lex_logit = torch.logit(p_lex.clamp(EPS, 1 - EPS)) * listed
    return torch.stack([z, lex_logit, listed, torch.ones_like(z)], dim=-1)


def fit_learned(logits: torch.Tensor, p_lex: torch.Tensor, listed: torch.Tensor, truth: torch.Tensor,
                steps: int = 50) -> list:
    """The learned fusion's coefficients: logistic regression of truth [n, L] on the pairs' features."""
    x = _features(logits.float(), p_lex, listed).reshape(-1, 4).double()
    y = truth.reshape(-1).double()
    coef = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([coef], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(x @ coef, y)
        loss.backward()
        return loss

    opt.step(closure)
    out = coef.detach().tolist()
    return out if all(math.isfinite(c) for c in out) else [1.0, 0.0, 0.0, 0.0]


def choose_fusion(logits: torch.Tensor, lex_ids, lex_probs, truth_csr, *, inv_prop: Optional[np.ndarray] = None,
                  methods=("weighted", "learned"), prior: Optional[np.ndarray] = None) -> tuple:
    """(best Fusion, its metrics, {candidate description: validation P@5}) over the weight grid, the
    learned combination and the ranker (`prior`: its labels' log(1 + training count)), on one split's
    network logits [n, L] and lexical top lists. The ranker is fitted on the whole split, and judged and
    reported by its out-of-fold figures (ranker.cross_fitted)."""
    from ..metrics import compute_metrics

    L = logits.shape[1]
    p_lex, listed = dense_lexical(lex_ids, lex_probs, L, logits.device)
    candidates = [Fusion("weighted", w=w) for w in WEIGHTS] if "weighted" in methods else []
    if "residual" in methods:
        candidates.append(Fusion("residual"))
    truth = None
    if "learned" in methods or "ranker" in methods:
        from .ranker import dense_truth

        truth = dense_truth(truth_csr, L, logits.device)
    if "learned" in methods:
        candidates.append(Fusion("learned", coef=fit_learned(logits, p_lex, listed, truth)))
    best, best_m, table = None, None, {}
    for f in candidates:
        m = compute_metrics(f.fuse(logits, p_lex, listed), truth_csr, inv_prop)
        table[f.describe()] = m["P@5"]
        if best_m is None or m["P@5"] > best_m["P@5"] + 1e-12:
            best, best_m = f, m
    if "ranker" in methods:
        from .ranker import cross_fitted, fit_ranker, lexical_ranks

        prior = np.zeros(L) if prior is None else np.asarray(prior, dtype=np.float64)
        lex_rank = lexical_ranks(lex_ids, L, logits.device)
        z = logits.float()
        m = compute_metrics(cross_fitted(z, p_lex, listed, lex_rank, truth, prior), truth_csr, inv_prop)
        table[RANKER_TRIED] = m["P@5"]
        if best_m is None or m["P@5"] > best_m["P@5"] + 1e-12:   # fitted on the whole split only when it serves
            best, best_m = Fusion("ranker", ranker=fit_ranker(z, p_lex, listed, lex_rank, truth, prior).to_dict()), m
    return best, best_m, table


@dataclass
class LexicalLists:
    """The lexical stage's top lists (label ids, probabilities [n, k]) of the validation and test splits:
    with them, evaluations also score the fused model (docs/design.md, "The lexical stage and fusion")."""
    valid: tuple
    test: tuple
    train: Optional[tuple] = None     # cross-fitted: each document's list from a tree that never saw it
    residual: bool = False            # the network trains with the lexical logits as a fixed offset
    shortlists: Optional[dict] = None  # {split: label ids [n, K]} of a stage that keeps shortlists (lexical/shortlist.py)
    judge: str = "fused"              # what the trainer keeps weights by: the fused figure or the network's (fitness.JUDGES)
    rank: bool = False                # the best weights' fusion may be the ranker (a final training's)

    @classmethod
    def from_stage(cls, folder: str, residual: bool = False, serving: Optional[str] = None,
                   judge: str = "fused", rank: bool = False) -> "LexicalLists":
        """The lists of the stage in `folder`; with `serving` (a serving stage's folder: fitted on every
        training document), the test split's from that one, which the bundles carry."""
        from .stage import LexicalStage

        stage = LexicalStage.load(folder)
        train = stage.split_topk("train") if residual else None
        shortlists = ({s: stage.split_shortlist(s) for s in ("train", "valid", "test")}
                      if stage.settings.shortlist else None)
        test = (LexicalStage.load(serving) if serving else stage).split_topk("test")
        return cls(stage.split_topk("valid"), test, train, residual, shortlists, judge,
                   rank and not residual and shortlists is None)

    @property
    def methods(self) -> tuple:
        """The fusions a network trained with these lists may be served with."""
        return ("residual",) if self.residual else ("weighted",)

    def offset(self, rows, num_labels: int, device) -> Optional[torch.Tensor]:
        """The residual offset of training documents `rows` (None when not residual)."""
        if not self.residual:
            return None
        rows = np.asarray(rows)
        return residual_offset(self.train[0][rows], self.train[1][rows], num_labels, device)


def fused_metrics(logits: torch.Tensor, lexical: tuple, truth, inv_prop, fusion=None,
                  methods=("weighted",), prior: Optional[np.ndarray] = None) -> dict:
    """Metrics of the logits fused with the lexical top lists, and the fusion used (chosen here among
    `methods` when None: while training, the weight grid alone, which costs a few metric passes; with
    the ranker among them, also "tried": each candidate's validation P@5)."""
    from ..metrics import compute_metrics

    ids, probs = lexical
    if len(ids) != logits.shape[0]:
        raise ValueError(f"lexical top lists for {len(ids)} documents, the split has {logits.shape[0]}")
    if fusion is None:
        fusion, m, tried = choose_fusion(logits, ids, probs, truth, inv_prop=inv_prop, methods=methods, prior=prior)
        if "ranker" in methods:
            m = {**m, "tried": tried}
    else:
        m = compute_metrics(fusion(logits, ids, probs), truth, inv_prop)
    return {**m, "fusion": fusion.to_dict()}
