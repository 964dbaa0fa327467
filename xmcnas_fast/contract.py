"""The contract between the search and its workers (docs/design.md "The candidate contract").

The search loop (main process) hands the scheduler a `CandidateTask`: what to build, how to train
it, where its bundle goes, whose weights it starts from. The worker (`candidate.train_candidate`,
in whatever process the scheduler picked) returns a `CandidateResult`: what the training gave.
The search's records (`records.result_record`) turn the result into a line of history.jsonl.
Both travel pickled through the scheduler; neither carries a device or a thread count: the worker
is bound to its device before it runs anything (`scheduler.devices.bind`), and `threads` is set only
where a task must differ from its worker (the final training, alone, uses every core).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Optional

from .model import ModelConfig
from .train import TrainConfig


@dataclasses.dataclass(frozen=True)
class ParentWeights:
    """A trained network whose weights a task starts from, where the two networks agree."""

    id: int
    genotype: dict                  # Genotype.to_dict()
    model_dir: Optional[str]        # its bundle; None (or gone) when it was not kept


@dataclasses.dataclass(frozen=True)
class ShortRun:
    """Short runs first: train `steps` steps, and go on to the full budget only if the validation
    figure reached is at least `promote_above` (None: always go on)."""

    steps: int
    promote_above: Optional[float] = None


@dataclasses.dataclass(frozen=True)
class LexicalPart:
    """The lexical stage a task's network is fused with (docs/design.md "The lexical stage and
    fusion"): its folder, whether the network trains against its residual, and the serving stage's
    folder (fitted on every training document: the test lists and the bundle's lexical part come
    from it; None: from `folder`), and what the network's evaluations are judged by (fitness.JUDGES)."""

    folder: str
    residual: bool = False
    serving: Optional[str] = None
    judge: str = "fused"
    rank: bool = False            # the final fusion may be the ranker (lexical/ranker.py)

    @property
    def served(self) -> str:
        """The folder of the stage a bundle of this task carries."""
        return self.serving or self.folder


@dataclasses.dataclass(frozen=True)
class CandidateTask:
    """One training the search asks a worker for."""

    model: ModelConfig              # its genotype included
    train: TrainConfig
    model_dir: str                  # where the bundle is saved
    save_above: float = -math.inf   # the bundle is saved only if the fitness beats this
    parent: Optional[ParentWeights] = None
    short: Optional[ShortRun] = None
    threads: Optional[int] = None   # torch CPU threads for this task (None: the worker's own)
    lexical: Optional[LexicalPart] = None


#: the fields of a training's record (train.Trainer.result) a CandidateResult carries, in order
TRAINING_FIELDS = ("status", "error", "valid", "test", "best_step", "curve", "layer_weights", "params",
                   "epochs", "steps", "seconds", "train_docs_per_s", "device", "predict_docs_per_s",
                   "peak_memory_mb", "short", "rung", "fused", "shortlist")
#: fields left out of the record when they have no value (older records never had them)
_OPTIONAL = ("predict_docs_per_s", "short", "rung", "inherited", "model_dir", "fused", "shortlist")


@dataclasses.dataclass
class CandidateResult:
    """What a worker's training gave: the training's record (train.Trainer.result), what it
    inherited ({"from": parent id, "parts": [...]}) and where its bundle was saved (if it was)."""

    status: str
    error: Optional[str] = None
    valid: Optional[dict] = None            # validation metrics of the best weights
    test: Optional[dict] = None             # test metrics of the best weights
    best_step: int = 0
    curve: list = dataclasses.field(default_factory=list)   # [step, epoch, valid P@1, valid P@5(, fused P@5)]
    layer_weights: Optional[list] = None
    params: int = 0
    epochs: int = 0
    steps: int = 0
    seconds: float = 0.0                    # the training's own time (the scheduler's is the task's)
    train_docs_per_s: Optional[float] = None
    device: Optional[str] = None
    predict_docs_per_s: Optional[float] = None
    peak_memory_mb: Optional[float] = None
    short: Optional[dict] = None            # the short run: {"steps", "P@5", "promoted"}
    rung: Optional[int] = None              # the budget the metrics come from: 0 short, 1 full
    inherited: Optional[dict] = None
    model_dir: Optional[str] = None
    fused: Optional[dict] = None            # fused with the lexical stage: {"valid", "test", "fusion"}
    shortlist: Optional[dict] = None        # a shortlisted head: {"k", "recall": {split: share of true labels}}

    @classmethod
    def from_training(cls, record: dict, inherited: Optional[dict] = None) -> "CandidateResult":
        return cls(**{k: record[k] for k in TRAINING_FIELDS if k in record}, inherited=inherited)

    def to_dict(self) -> dict:
        """The fields as a history record holds them (those without a value that older records
        never had are left out)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (k in _OPTIONAL and v is None)}
