"""Train and evaluate one candidate; return a result record.

The protocol (DESIGN.md "Training a candidate"): BCE-with-logits, Adam lr
1e-3, batch 40, at most 30 epochs, validation P@5 every `eval_every` steps,
early stop after `patience` evaluations without a better one, best weights
kept, AttentionXML's adaptive gradient clipping, bf16 autocast on CUDA.
Budgets (epochs, steps, minutes, tokens per text) let the same code serve a
30-second test, a 10-minute demo and the paper's setting.
"""
from __future__ import annotations

import math
import resource
import time
from collections import deque
from dataclasses import asdict, dataclass, field
from typing import Callable, Optional

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn as nn
import torch.nn.functional as F

from .metrics import MetricAccumulator, inv_propensity


@dataclass
class TrainConfig:
    batch_size: int = 40
    lr: float = 1e-3
    max_epochs: int = 30
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    max_len: Optional[int] = None        # tokens per text while training and evaluating (None: the data's)
    eval_every: int = 100                # steps between validation evaluations
    patience: int = 50                   # evaluations without a better validation P@5 before stopping
    warmup_steps: int = 0                # linear learning-rate warm-up
    clip: Optional[float] = 5.0          # AttentionXML's adaptive gradient clipping factor (None: off)
    seed: int = 0
    device: str = "cpu"
    amp: bool = True                     # bf16 autocast on CUDA
    eval_batch_size: int = 200
    threads: Optional[int] = None        # torch CPU threads (None: leave as is)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        return cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})


class GradientClipper:
    """AttentionXML's clipping: clip to `factor` x the largest of the last 5 (bounded) gradient norms."""

    def __init__(self, factor: Optional[float]):
        self.factor = factor
        self.norms = deque([math.inf], maxlen=5)

    def __call__(self, params) -> float:
        if self.factor is None:
            return float("nan")
        max_norm = max(self.norms)
        total = float(nn.utils.clip_grad_norm_(params, max_norm * self.factor))
        self.norms.append(min(total, max_norm * 2.0, 1.0))
        return total


def _autocast(device: torch.device, amp: bool):
    enabled = amp and device.type == "cuda"
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=enabled)


def label_log_odds(data) -> np.ndarray:
    """log(p / (1 - p)) of each trained label's frequency in train + valid (add-one smoothed)."""
    n = len(data.train) + len(data.valid)
    p = (data.label_counts().astype(np.float64) + 1.0) / (n + 2.0)
    return np.log(p / (1.0 - p))


def label_inv_propensity(data, columns: int) -> np.ndarray:
    """Inverse propensities over `columns` label columns, from train+valid counts (unseen labels: count 0)."""
    counts = np.zeros(columns)
    for split in (data.train, data.valid):
        c = np.asarray(split.labels.sum(0)).ravel()
        counts[: len(c)] += c
    return inv_propensity(counts, len(data.train) + len(data.valid))


@torch.no_grad()
def evaluate(model: nn.Module, ds, num_labels: int, *, inv_prop: Optional[np.ndarray] = None,
             batch_size: int = 200, max_len: Optional[int] = None, device="cpu", amp: bool = True) -> dict:
    """P@k, nDCG@k, PSP@k of the model on a split; adds 'docs_per_s' (prediction throughput)."""
    from .data import iterate_batches

    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(5, inv_prop)
    start = time.perf_counter()
    for batch in iterate_batches(ds, num_labels, batch_size, shuffle=False, max_len=max_len):
        batch = batch.to(device)
        with _autocast(device, amp):
            scores = model(batch.tokens, batch.mask)
        acc.update(scores.float(), ds.labels[batch.index.numpy()])
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    out = acc.result()
    out["docs_per_s"] = len(ds) / seconds if seconds > 0 else float("nan")
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (KiB on Linux)


@dataclass
class TrainResult:
    record: dict                          # what a search's history stores (JSON-able)
    state: Optional[dict] = None          # the best weights (state_dict on CPU)


def train_model(model: nn.Module, data, cfg: TrainConfig, *,
                report: Optional[Callable[..., None]] = None,
                should_stop: Optional[Callable[[], bool]] = None,
                evaluate_test: bool = True) -> TrainResult:
    """Train `model` on data.train, select on data.valid, evaluate the best weights on data.test.

    report(**fields) is called after every evaluation (epoch, step, loss, valid P@5, ...);
    should_stop() is polled every step (a cooperative stop: the record says "stopped").
    Never raises for a diverging run: a NaN/inf loss ends it with status "nan".
    """
    from .data import iterate_batches

    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if hasattr(model, "init_label_bias"):
        model.init_label_bias(label_log_odds(data))
    model.to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    sparse_ids = {id(m.weight) for m in model.modules()
                  if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.sparse}
    dense = [p for p in params if id(p) not in sparse_ids]
    sparse = [p for p in params if id(p) in sparse_ids]
    # AttentionXML's DenseSparseAdam, as two optimizers: Adam, and SparseAdam for embedding rows
    opts = [torch.optim.Adam(dense, lr=cfg.lr)] + ([torch.optim.SparseAdam(sparse, lr=cfg.lr)] if sparse else [])
    clipper = GradientClipper(cfg.clip)
    inv_prop = label_inv_propensity(data, max(data.test.labels.shape[1], data.num_labels))
    deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else math.inf

    status, error = "ok", None
    best_p5, best_state, best_valid, best_step = -1.0, None, None, 0
    evals_without_gain, step, epoch, docs = 0, 0, 0, 0
    curve = []                            # [step, epoch, valid P@1, valid P@5] at each evaluation
    train_seconds = 0.0
    running_loss = deque(maxlen=50)
    start = time.monotonic()

    def validate():
        nonlocal best_p5, best_state, best_valid, best_step, evals_without_gain
        v = evaluate(model, data.valid, data.num_labels, inv_prop=inv_prop, batch_size=cfg.eval_batch_size,
                     max_len=cfg.max_len, device=device, amp=cfg.amp)
        curve.append([step, epoch, round(v["P@1"], 6), round(v["P@5"], 6)])
        if v["P@5"] > best_p5:
            best_p5, best_valid, best_step = v["P@5"], v, step
            best_state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
            evals_without_gain = 0
        else:
            evals_without_gain += 1
        if report:
            report(epoch=epoch, step=step, loss=float(np.mean(running_loss)) if running_loss else None,
                   valid_p1=v["P@1"], valid_p5=v["P@5"], best_p5=best_p5)

    stop = False
    while epoch < cfg.max_epochs and not stop:
        epoch += 1
        for batch in iterate_batches(data.train, data.num_labels, cfg.batch_size, shuffle=True,
                                     seed=cfg.seed * 1000 + epoch, max_len=cfg.max_len):
            t0 = time.perf_counter()
            batch = batch.to(device, non_blocking=True)
            if cfg.warmup_steps and step < cfg.warmup_steps:
                for opt in opts:
                    for g in opt.param_groups:
                        g["lr"] = cfg.lr * (step + 1) / cfg.warmup_steps
            with _autocast(device, cfg.amp):
                logits = model(batch.tokens, batch.mask)
            loss = F.binary_cross_entropy_with_logits(logits.float(), batch.labels)
            if not torch.isfinite(loss):
                status, error, stop = "nan", f"non-finite training loss at step {step + 1}", True
                break
            for opt in opts:
                opt.zero_grad(set_to_none=True)
            loss.backward()
            clipper(dense)
            for opt in opts:
                opt.step()
            step += 1
            docs += batch.tokens.shape[0]
            running_loss.append(loss.item())
            train_seconds += time.perf_counter() - t0
            if step % cfg.eval_every == 0:
                validate()
            if evals_without_gain >= cfg.patience:
                stop = True
            elif cfg.max_steps is not None and step >= cfg.max_steps:
                stop = True
            elif time.monotonic() > deadline:
                stop = True
            elif should_stop is not None and should_stop():
                status, stop = "stopped", True
            if stop:
                break
    if status != "nan" and (not curve or curve[-1][0] != step) and step > 0:
        validate()  # the last steps since the previous evaluation count too

    record = {
        "status": status, "error": error,
        "valid": best_valid, "test": None, "best_step": best_step, "curve": curve,
        "layer_weights": None, "params": sum(p.numel() for p in params),
        "epochs": epoch, "steps": step, "seconds": round(time.monotonic() - start, 3),
        "train_docs_per_s": docs / train_seconds if train_seconds > 0 else None,
        "device": str(device),
    }
    if best_state is not None:
        model.load_state_dict(best_state)
        lw = getattr(model, "layer_weights", None)
        record["layer_weights"] = lw() if callable(lw) else None
        if evaluate_test and status in ("ok", "stopped"):
            t = evaluate(model, data.test, data.num_labels, inv_prop=inv_prop, batch_size=cfg.eval_batch_size,
                         max_len=cfg.max_len, device=device, amp=cfg.amp)
            record["predict_docs_per_s"] = t.pop("docs_per_s")
            record["test"] = t
        record["valid"] = {k: v for k, v in best_valid.items() if k != "docs_per_s"}
    elif status == "ok":
        status = record["status"] = "error"
        record["error"] = "no evaluation was reached (budget too small for one step?)"
    record["peak_memory_mb"] = round(_peak_memory_mb(device), 1)
    return TrainResult(record, best_state)
