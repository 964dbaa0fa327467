"""What the search optimizes, in one place (docs/design.md "The candidate contract").

`validation_figure(metrics, judge)` is the figure a validation evaluation is judged by: the trainer
keeps the weights where it is highest and a short run's promotion bar is set in it. It is P@5 of the
network fused with the lexical stage when there is one (the evaluation's "fused" metrics; a record's
"fused" "valid") and the judge is "fused", else P@5 of the network alone: with the judge "network"
(the search's `--lexical-fitness network`), a fused evaluation is judged by its network's own figure,
while the fusion is still chosen, and served, on the fused one. `fitness(record, judge)` is a
finished training's figure as the search sees it: the validation figure of its best weights when
the training ended "ok" or "stopped", else None (a failed candidate has no fitness). The search
stores it in each record's "fitness" field when the record is made (with "judge" where it is not
"fused"), and everything downstream (the strategy, the ranking, best.json, the bundles kept, the
final model's test, the analysis) reads that field through `rank_key`.

Where two judged figures are equal, the other one (`tie_figure`: the network's own for a fused
judge, the fused one for a network judge) breaks the tie: on data where the lexical model leaves the
network nothing to add (a fused figure flat at the lexical model's own), the trainer still keeps the
weights of a better network and the search still ranks the stronger networks first, instead of the
first evaluated.

To optimize another figure, change `validation_figure` (and what the trainer's evaluation
computes): nothing else decides what "better" means.

No imports from the package: the strategy (pure logic) and the worker both use it.
"""
from __future__ import annotations

import math
from typing import Mapping, Optional

#: the key of the figure in a validation evaluation's metrics (and in a record's "valid")
FIGURE = "P@5"
#: training statuses whose best weights are a result (a "stopped" run kept the weights it reached)
SCORED_STATUSES = ("ok", "stopped")
#: what a fused evaluation is judged by: the fused model's figure, or the network's own
JUDGES = ("fused", "network")


def validation_figure(metrics: Optional[Mapping], judge: str = "fused") -> Optional[float]:
    """The figure a validation evaluation (a metrics dict, with "fused" metrics when the network was
    fused with the lexical stage) is judged by; None without one."""
    if not metrics:
        return None
    return (metrics if judge == "network" else metrics.get("fused") or metrics).get(FIGURE)


def tie_figure(metrics: Optional[Mapping], judge: str = "fused") -> Optional[float]:
    """The figure that breaks a tie of the judged one in a validation evaluation fused with the lexical
    stage: the network's own for the fused judge, the fused one for the network judge (None when it was
    not fused: the two are one figure then)."""
    if not metrics or not metrics.get("fused"):
        return None
    return (metrics["fused"] if judge == "network" else metrics).get(FIGURE)


def better(metrics: Mapping, best: Optional[Mapping], judge: str = "fused") -> bool:
    """Whether a validation evaluation beats the best so far: a higher validation figure, or the same
    with a higher tie figure."""
    if best is None:
        return True
    return _order(metrics, judge) > _order(best, judge)


def _order(metrics: Mapping, judge: str) -> tuple:
    tie = tie_figure(metrics, judge)
    return (validation_figure(metrics, judge), -math.inf if tie is None else tie)


def fitness(record: Mapping, judge: str = "fused") -> Optional[float]:
    """The fitness of a training's record ({"status", "valid": metrics, "fused": {"valid": ...}?,
    ...}): its validation figure when the training ended well, else None."""
    if record.get("status") not in SCORED_STATUSES:
        return None
    fused = (record.get("fused") or {}).get("valid")
    x = validation_figure(record.get("valid") if judge == "network" else fused or record.get("valid"))
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def rank_key(rung: Optional[int], figure: Optional[float], tie: Optional[float] = None) -> tuple:
    """Higher is better. A figure ranks first by the budget it comes from (rung 1, the full budget,
    above rung 0, a short run: figures of different budgets are never weighed against each other,
    as in successive halving), then by the figure, then by `tie` (the network's own figure of a fused
    one); no figure ranks below every figure."""
    if figure is None:
        return (-math.inf, -math.inf, -math.inf)
    return (rung or 0, figure, -math.inf if tie is None else tie)


def record_tie(record: Mapping) -> Optional[float]:
    """The tie-breaking figure of a history record fused with the lexical stage (full-budget records; a
    short run's figure has none): its network's own validation figure where its fitness is the fused
    one, the fused figure where its "judge" was the network."""
    fused = (record.get("fused") or {}).get("valid")
    if not fused or (record.get("short") and not record.get("rung")):
        return None
    return (fused if record.get("judge") == "network" else record.get("valid") or {}).get(FIGURE)


def record_rank(record: Mapping) -> tuple:
    """`rank_key` of a history record (or anything with "rung" and "fitness" keys)."""
    return rank_key(record.get("rung"), record.get("fitness"), record_tie(record))


def ranked(records) -> list:
    """The records (an iterable, or a dict of them) with a fitness, best first."""
    values = records.values() if isinstance(records, Mapping) else records
    return sorted((r for r in values if r.get("fitness") is not None), key=record_rank, reverse=True)
