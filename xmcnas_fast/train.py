"""Train and evaluate one candidate; return a result record.

The protocol (docs/design.md "Training a candidate"): BCE-with-logits, Adam lr
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
import torch
import torch.nn as nn
import torch.nn.functional as F

from .fitness import better, validation_figure
from .lexical.fusion import Fusion, LexicalLists, fused_metrics
from .lexical.shortlist import force_positives, shortlist_fused_metrics, shortlist_recall, slot_targets
from .metrics import MetricAccumulator, inv_propensity
from .optim import GradientClipper, optimizers


@dataclass
class TrainConfig:
    batch_size: int = 40
    lr: float = 1e-3
    max_epochs: int = 30
    max_steps: Optional[int] = None
    max_minutes: Optional[float] = None
    min_steps: Optional[int] = None      # the time limit ends no training before this many steps
    max_len: Optional[int] = None        # tokens per text while training and evaluating (None: the data's)
    eval_every: int = 100                # steps between validation evaluations
    patience: int = 50                   # evaluations without a better validation figure before stopping
    warmup_steps: int = 0                # linear learning-rate warm-up
    lr_schedule: str = "constant"        # "constant", or "cosine": down to 0 at the end of the budget
    clip: Optional[float] = 5.0          # AttentionXML's adaptive gradient clipping factor (None: off)
    seed: int = 0
    precision: str = "auto"              # "auto" (bf16 autocast on CUDA, float32 on CPU), "bf16", "fp32"
    eval_batch_size: int = 200
    # Where it runs (device, CPU threads) is no setting: train_model is told at run time, so that a
    # saved config says nothing about the machine it ran on (older configs' "device" and "threads"
    # are ignored on load).

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        """The settings of a dict (unknown keys ignored: an older config's "device" and "threads";
        older layouts are brought up to date by config.migrate and bundle.migrate_bundle_config)."""
        cfg = cls(**{k: v for k, v in d.items() if k in cls.__dataclass_fields__})
        autocast_dtype(cfg.precision, "cpu")                  # refuses an unknown precision
        if cfg.lr_schedule not in LR_SCHEDULES:
            raise ValueError(f"unknown lr_schedule {cfg.lr_schedule!r}; expected one of {', '.join(LR_SCHEDULES)}")
        return cfg


LR_SCHEDULES = ("constant", "cosine")


PRECISIONS = ("auto", "bf16", "fp32")


def autocast_dtype(precision: str, device_type: str) -> Optional[torch.dtype]:
    """The autocast dtype of a precision setting on a device type (None: no autocast).

    docs/design.md "Precision": bf16 autocast on CUDA, never float16 (there is no loss scaling);
    "bf16" asks for it on the CPU too, "fp32" for none anywhere."""
    if precision not in PRECISIONS:
        raise ValueError(f"precision {precision!r}: expected one of {', '.join(PRECISIONS)}")
    if precision == "bf16" or (precision == "auto" and device_type == "cuda"):
        return torch.bfloat16
    return None


def autocast(device: torch.device, precision: str = "auto"):
    """The autocast context of `precision` on `device` (a disabled one when it asks for none)."""
    dtype = autocast_dtype(precision, device.type)
    return torch.autocast(device.type, dtype=dtype or torch.bfloat16, enabled=dtype is not None)


def label_log_odds(data) -> np.ndarray:
    """log(p / (1 - p)) of each trained label's frequency in train + valid (add-one smoothed)."""
    n = len(data.train) + len(data.valid)
    p = (data.label_counts().astype(np.float64) + 1.0) / (n + 2.0)
    return np.log(p / (1.0 - p))


def label_inv_propensity(data, columns: Optional[int] = None) -> np.ndarray:
    """Inverse propensities over `columns` label columns (default: the trained labels and those only the
    test split has), from train+valid counts (unseen labels: count 0)."""
    columns = max(data.test.labels.shape[1], data.num_labels) if columns is None else columns
    counts = np.zeros(columns)
    for split in (data.train, data.valid):
        c = np.asarray(split.labels.sum(0)).ravel()
        counts[: len(c)] += c
    return inv_propensity(counts, len(data.train) + len(data.valid))


@torch.no_grad()
def evaluate(model: nn.Module, ds, num_labels: int, *, inv_prop: Optional[np.ndarray] = None,
             batch_size: int = 200, max_len: Optional[int] = None, device="cpu", precision: str = "auto",
             lexical: Optional[tuple] = None, fusion=None, fusion_methods=("weighted",),
             shortlist: Optional[np.ndarray] = None, fusion_prior: Optional[np.ndarray] = None) -> dict:
    """P@k, nDCG@k, PSP@k of the model on a split; adds 'docs_per_s' (prediction throughput).

    With `lexical` (the split's lexical top lists), 'fused' holds the metrics of the network fused with
    them: by `fusion`, or by the fusion that does best on this split (then 'fused'['fusion'] says which).
    With `shortlist` (label ids [n, K] of the split, -1 padding), a shortlisted network ranks those labels
    alone (every true label still counts in the denominators), and 'shortlist_recall' says how many of
    the true labels they hold: nothing of size [B, L] is made."""
    from .data import iterate_batches

    device = torch.device(device)
    was_training = model.training
    model.eval()
    acc = MetricAccumulator(5, inv_prop)
    logits = slots_all = None           # the split's network scores (and labels), kept on the device when fusing
    start = time.perf_counter()
    for batch in iterate_batches(ds, num_labels, batch_size, shuffle=False, max_len=max_len, dense_labels=False):
        batch = batch.to(device)
        rows = batch.index.numpy()           # the index stays on the host (Batch.to)
        slots = None if shortlist is None else torch.from_numpy(np.asarray(shortlist[rows], dtype=np.int64)).to(device)
        with autocast(device, precision):
            scores = model(batch.tokens, batch.mask) if slots is None else model(batch.tokens, batch.mask, slots)
        acc.update(scores.float(), ds.labels[rows], slots)
        if lexical is not None:
            if logits is None:
                logits = scores.new_empty((len(ds), scores.shape[1]), dtype=torch.float32)
                if slots is not None:
                    slots_all = slots.new_full((len(ds), slots.shape[1]), -1)
            logits[batch.index.to(device)] = scores.float()
            if slots is not None:
                slots_all[batch.index.to(device)] = slots
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    model.train(was_training)
    out = acc.result()
    out["docs_per_s"] = len(ds) / seconds if seconds > 0 else float("nan")
    if shortlist is not None:
        out["shortlist_recall"] = shortlist_recall(shortlist, ds.labels)
    if logits is not None and slots_all is not None:
        out["fused"] = shortlist_fused_metrics(logits, slots_all, lexical, ds.labels, inv_prop, fusion)
    elif logits is not None:
        out["fused"] = fused_metrics(logits, lexical, ds.labels, inv_prop, fusion, fusion_methods, fusion_prior)
    return out


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # process high-water mark (KiB on Linux)


@dataclass
class TrainResult:
    record: dict                          # what a search's history stores (JSON-able)
    state: Optional[dict] = None          # the best weights (state_dict on CPU)


@dataclass
class BestWeights:
    """The validation curve, the best weights met on it, and the evaluations since (for early stopping)."""
    figure: float = -1.0                  # the best validation figure (fitness.validation_figure)
    valid: Optional[dict] = None          # the metrics of the best evaluation
    step: int = 0
    state: Optional[dict] = None          # its weights, on the CPU
    stale: int = 0                        # evaluations without a better validation P@5
    curve: list = field(default_factory=list)   # [step, epoch, valid P@1, valid P@5 (, fused P@5)] each evaluation
    judge: str = "fused"                  # what a fused evaluation is judged by (fitness.JUDGES)

    def update(self, model: nn.Module, v: dict, step: int, epoch: int) -> None:
        self.curve.append([step, epoch, round(v["P@1"], 6), round(v["P@5"], 6)]
                          + ([round(v["fused"]["P@5"], 6)] if "fused" in v else []))
        if better(v, self.valid, self.judge):      # (a tie goes to the better other figure)
            self.figure, self.valid, self.step, self.stale = validation_figure(v, self.judge), v, step, 0
            self.state = {k: t.detach().to("cpu", copy=True) for k, t in model.state_dict().items()}
        else:
            self.stale += 1

    def evaluated_at(self, step: int) -> bool:
        return bool(self.curve) and self.curve[-1][0] == step


def _prepare(model: nn.Module, data, cfg: TrainConfig, device, threads: Optional[int],
             label_bias: bool = True) -> torch.device:
    """Threads, seed, label biases (the labels' log-odds; zero for a residual network, whose offset
    already holds what the lexical model knows), device: everything before the optimizers exist."""
    device = torch.device(device)
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    if hasattr(model, "init_label_bias"):
        log_odds = label_log_odds(data)
        model.init_label_bias(log_odds if label_bias else np.zeros_like(log_odds))
    model.to(device).train()
    return device


class Trainer:
    """One training run of a model: its optimizers, clipper, best-weights tracker and counters."""

    def __init__(self, model: nn.Module, data, cfg: TrainConfig, device: torch.device,
                 on_progress: Optional[Callable[..., None]] = None, lexical: Optional[LexicalLists] = None):
        self.model, self.data, self.cfg, self.device = model, data, cfg, device
        self.on_progress = on_progress
        self.lexical = lexical
        self.shortlist = getattr(model, "shortlist", 0)     # K: the head scores each document's shortlist
        if self.shortlist:
            if lexical is None or lexical.shortlists is None:
                raise ValueError("a shortlisted network trains on the lexical stage's shortlists: give it a stage "
                                 "fitted with a shortlist")
            if lexical.residual:
                raise ValueError("the residual lexical mode is not available over a shortlist: use fuse")
        self.dense, self.opts = optimizers(model, cfg.lr)
        self.clipper = GradientClipper(cfg.clip)
        self.inv_prop = label_inv_propensity(data)
        self.deadline = time.monotonic() + cfg.max_minutes * 60 if cfg.max_minutes else math.inf
        self.best = BestWeights(judge=lexical.judge if lexical else "fused")
        self.status, self.error = "ok", None
        self.step = self.epoch = self.docs = 0
        self.train_seconds = 0.0
        self.running_loss: deque = deque(maxlen=50)
        self.start = time.monotonic()
        self._batches = None                 # the epoch in progress (a short run may stop inside one)
        self.stage_steps: Optional[int] = None
        self.eval_seconds_per_doc = 0.0      # of the last validation: what the evaluations still due cost

    def fit(self, should_stop: Optional[Callable[[], bool]] = None, max_steps: Optional[int] = None) -> None:
        """Epochs until a budget, the patience or a stop ends training; the last steps are evaluated too.
        `max_steps` ends this call earlier (a short run); a later call goes on where it stopped, in the
        same epoch."""
        self.stage_steps = max_steps
        while (self._batches is not None or self.epoch < self.cfg.max_epochs) and self.run_epoch(should_stop):
            pass
        if self.status != "nan" and self.step > 0 and not self.best.evaluated_at(self.step):
            self.validate()

    def run_epoch(self, should_stop) -> bool:
        """One shuffled pass over the training split (or what is left of it); False when training must end."""
        from .data import iterate_batches

        if self._batches is None:
            self.epoch += 1
            self._batches = iterate_batches(self.data.train, self.data.num_labels, self.cfg.batch_size,
                                            shuffle=True, seed=self.cfg.seed * 1000 + self.epoch,
                                            max_len=self.cfg.max_len, dense_labels=not self.shortlist)
        for batch in self._batches:
            if not self.train_step(batch):
                self.status, self.error = "nan", f"non-finite training loss at step {self.step + 1}"
                return False
            if self.step % self.cfg.eval_every == 0:
                self.validate()
            if self.should_end(should_stop):
                return False
        self._batches = None
        return True

    def train_step(self, batch) -> bool:
        """Forward, loss, backward, clip, update; False (and no update) when the loss is not finite."""
        t0 = time.perf_counter()
        batch = batch.to(self.device, non_blocking=True)
        self.set_lr()
        if self.shortlist:
            loss = self.shortlist_loss(batch)
        else:
            with autocast(self.device, self.cfg.precision):
                logits = self.model(batch.tokens, batch.mask)
            logits = logits.float()
            if self.lexical is not None and self.lexical.residual:
                logits = logits + self.lexical.offset(batch.index.numpy(), logits.shape[1], self.device)
            loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        if not torch.isfinite(loss):
            return False
        self.update(loss)
        self.step += 1
        self.docs += batch.tokens.shape[0]
        self.running_loss.append(loss.item())
        self.train_seconds += time.perf_counter() - t0
        return True

    def shortlist_loss(self, batch) -> torch.Tensor:
        """BCE over the K slots of each document's shortlist, every true label forced in (padding slots
        left out); the targets come from the split's CSR labels: no [B, L] tensor."""
        rows = batch.index.numpy()
        truth = self.data.train.labels[rows]
        ids = force_positives(self.lexical.shortlists["train"][rows], truth, self.data.num_labels)
        slots = torch.from_numpy(ids).to(self.device)
        targets = torch.from_numpy(slot_targets(ids, truth)).to(self.device)
        with autocast(self.device, self.cfg.precision):
            logits = self.model(batch.tokens, batch.mask, slots)
        valid = slots >= 0
        return F.binary_cross_entropy_with_logits(logits.float()[valid], targets[valid])

    def set_lr(self) -> None:
        """The learning rate of the next step: a linear warm-up over the first `warmup_steps` steps;
        with the cosine schedule, then half a cosine down to 0 at the end of the budget."""
        cfg, factor = self.cfg, 1.0
        if cfg.warmup_steps and self.step < cfg.warmup_steps:
            factor = (self.step + 1) / cfg.warmup_steps
        elif cfg.lr_schedule == "cosine":
            factor = 0.5 * (1.0 + math.cos(math.pi * self.budget_used()))
        elif not cfg.warmup_steps:
            return                               # constant: the optimizers' own rate, untouched
        for opt in self.opts:
            for g in opt.param_groups:
                g["lr"] = cfg.lr * factor

    def budget_used(self) -> float:
        """How far training is through its budget, in [0, 1]: the steps (of max_steps, or of max_epochs
        whole epochs) or the time (of max_minutes, less the evaluations still due), whichever is
        further along."""
        cfg = self.cfg
        per_epoch = math.ceil(len(self.data.train) / cfg.batch_size)
        steps = [n for n in (cfg.max_steps, cfg.max_epochs * per_epoch) if n]
        used = self.step / min(steps) if steps else 0.0
        if math.isfinite(self.deadline):
            span = self.deadline - self.start
            by_time = (time.monotonic() + self.evaluations_due() - self.start) / span if span > 0 else 1.0
            if cfg.min_steps:          # the time limit ends nothing before min_steps: nor does the schedule
                by_time = min(by_time, self.step / cfg.min_steps)
            used = max(used, by_time)
        return min(1.0, max(0.0, used))

    def update(self, loss: torch.Tensor) -> None:
        for opt in self.opts:
            opt.zero_grad(set_to_none=True)
        loss.backward()
        self.clipper(self.dense)
        for opt in self.opts:
            opt.step()

    def should_end(self, should_stop) -> bool:
        """Patience spent, step or time budget reached, or a cooperative stop (the run is "stopped")."""
        cfg = self.cfg
        if self.best.stale >= cfg.patience or (cfg.max_steps is not None and self.step >= cfg.max_steps):
            return True
        if self.stage_steps is not None and self.step >= self.stage_steps:
            return True
        if time.monotonic() + self.evaluations_due() > self.deadline and self.step >= (cfg.min_steps or 0):
            return True
        if should_stop is not None and should_stop():
            self.status = "stopped"
            return True
        return False

    def evaluate(self, ds, lexical: Optional[tuple] = None, fusion=None, split: Optional[str] = None,
                 methods: Optional[tuple] = None) -> dict:
        prior = None
        if methods is not None and "ranker" in methods:
            from .lexical.ranker import label_counts

            prior = label_counts(self.data.train.labels, self.data.num_labels)
        return evaluate(self.model, ds, self.data.num_labels, inv_prop=self.inv_prop,
                        batch_size=self.cfg.eval_batch_size, max_len=self.cfg.max_len, device=self.device,
                        precision=self.cfg.precision, lexical=lexical, fusion=fusion,
                        fusion_methods=methods or (self.lexical.methods if self.lexical else ("weighted",)),
                        shortlist=self.lexical.shortlists[split] if self.shortlist and split else None,
                        fusion_prior=prior)

    def evaluations_due(self) -> float:
        """Seconds the evaluations after the last step will take (a last validation and the test split),
        estimated from the last validation, and the ranker's fusion where it will be tried: they count
        inside the time budget."""
        due = self.eval_seconds_per_doc * (len(self.data.valid) + len(self.data.test))
        if self.lexical is not None and self.lexical.rank:
            from .lexical.ranker import expected_seconds

            due += expected_seconds(len(self.data.valid), np.asarray(self.lexical.valid[0]).shape[1])
        return due

    def validate(self) -> None:
        t0 = time.monotonic()
        v = self.evaluate(self.data.valid, self.lexical.valid if self.lexical else None, split="valid")
        self.eval_seconds_per_doc = (time.monotonic() - t0) / max(1, len(self.data.valid))
        self.best.update(self.model, v, self.step, self.epoch)
        if self.on_progress:
            loss = float(np.mean(self.running_loss)) if self.running_loss else None
            self.on_progress(epoch=self.epoch, step=self.step, loss=loss, valid_p1=v["P@1"],
                             valid_p5=validation_figure(v, self.best.judge), best_p5=self.best.figure)

    def result(self, evaluate_test: bool = True) -> TrainResult:
        """The record of the run; the model is left holding its best weights."""
        record = {
            "status": self.status, "error": self.error,
            "valid": None, "test": None, "best_step": self.best.step, "curve": self.best.curve,
            "layer_weights": None, "params": sum(p.numel() for p in self.model.parameters() if p.requires_grad),
            "epochs": self.epoch, "steps": self.step, "seconds": round(time.monotonic() - self.start, 3),
            "train_docs_per_s": self.docs / self.train_seconds if self.train_seconds > 0 else None,
            "device": str(self.device),
        }
        if self.shortlist:
            record["shortlist"] = {"k": self.shortlist, "recall": {
                split: round(shortlist_recall(self.lexical.shortlists[split], getattr(self.data, split).labels), 6)
                for split in ("train", "valid", "test")}}
        if self.best.state is not None:
            record.update(self.restore_best(evaluate_test))
        elif self.status == "ok":
            record["status"] = "error"
            record["error"] = "no evaluation was reached (budget too small for one step?)"
        record["peak_memory_mb"] = round(_peak_memory_mb(self.device), 1)
        return TrainResult(record, self.best.state)

    def restore_best(self, evaluate_test: bool) -> dict:
        """Load the best weights back: their validation metrics, layer weights and (if asked) test metrics."""
        self.model.load_state_dict(self.best.state)
        lw = getattr(self.model, "layer_weights", None)
        valid = {k: v for k, v in self.best.valid.items() if k not in ("docs_per_s", "fused")}
        out = {"valid": valid, "layer_weights": lw() if callable(lw) else None}
        fused = self.best.valid.get("fused")
        if fused is not None and self.lexical.rank and self.status in ("ok", "stopped"):
            # the final fusion: the weight grid or the ranker, on the best weights' validation scores
            fused = self.evaluate(self.data.valid, self.lexical.valid, split="valid",
                                  methods=("weighted", "ranker"))["fused"]
        if fused is not None:
            out["fused"] = {"valid": {k: v for k, v in fused.items() if k not in ("fusion", "tried")},
                            "fusion": fused["fusion"]}
            if "tried" in fused:
                out["fused"]["tried"] = fused["tried"]
        if evaluate_test and self.status in ("ok", "stopped"):
            test = self.evaluate(self.data.test, self.lexical.test if fused is not None else None,
                                 Fusion.from_dict(fused["fusion"]) if fused is not None else None, split="test")
            out["predict_docs_per_s"] = test.pop("docs_per_s")
            if fused is not None:
                out["fused"]["test"] = {k: v for k, v in test.pop("fused").items() if k != "fusion"}
            out["test"] = test
        return out


def train_model(model: nn.Module, data, cfg: TrainConfig, *, device="cpu", threads: Optional[int] = None,
                on_progress: Optional[Callable[..., None]] = None,
                should_stop: Optional[Callable[[], bool]] = None,
                evaluate_test: bool = True,
                short_steps: Optional[int] = None,
                go_on: Optional[Callable[[float], bool]] = None,
                lexical: Optional[LexicalLists] = None) -> TrainResult:
    """Train `model` on data.train, select on data.valid, evaluate the best weights on data.test.

    `device` and `threads` (torch CPU threads; None leaves them as they are) say where it runs.
    on_progress(**fields) is called after every evaluation (epoch, step, loss, valid P@5, ...);
    should_stop() is polled every step (a cooperative stop: the record says "stopped").
    With `short_steps`, training stops after that many steps and goes on to its full budget only if
    go_on(best validation P@5 so far) says so; the record's "short" holds the short run's figure and
    "rung" says which budget its metrics come from (0 the short one, 1 the full one).
    With `lexical`, weights and the short run's figure are chosen by the fused model's validation P@5, or
    the network's own where lexical.judge is "network" (`fitness.validation_figure`), and the record's
    "fused" holds its validation and test metrics and the fusion (chosen on the fused figure either way).
    Never raises for a diverging run: a NaN/inf loss ends it with status "nan".
    """
    device = _prepare(model, data, cfg, device, threads, label_bias=not (lexical is not None and lexical.residual))
    trainer = Trainer(model, data, cfg, device, on_progress, lexical)
    short = None
    if short_steps:
        trainer.fit(should_stop, max_steps=short_steps)
        short = {"steps": trainer.step, "P@5": trainer.best.figure if trainer.best.valid else None}
        promoted = trainer.status == "ok" and short["P@5"] is not None and (go_on is None or go_on(short["P@5"]))
        if promoted:
            trainer.fit(should_stop)
        short["promoted"] = bool(promoted)
    else:
        trainer.fit(should_stop)
    result = trainer.result(evaluate_test)
    if short is not None:
        result.record["short"] = short
        result.record["rung"] = int(short["promoted"])
    return result
