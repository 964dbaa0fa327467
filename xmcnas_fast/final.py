"""The settings of the final phase: after the evolution, the best architecture is trained to the end
of the budget (as XMC-NAS trained its discovered architecture), and that model is the search's result
when it does at least as well as the candidate it retrains.

A run's config has a "final" section; a value of None there means the search's own. Its time is
either fixed (max_minutes) or what is left of the whole search's wall-clock budget (total_minutes),
so that a demo ends on time whatever the machine. With total_minutes, min_minutes is the final
training's guaranteed share: no candidate starts once less than that is left, so a search on a slow
machine trains fewer candidates instead of starving the final model.

The final training starts from the candidate's weights wherever the two networks agree (all of them
at the search's own sizes: it goes on training the candidate) unless inherit is false (the paper's
protocol: trained again from scratch).
"""
from __future__ import annotations

import statistics
from typing import Iterable, Optional

FINAL_DEFAULTS = {"enabled": True, "width": None, "emb_dim": None, "fc": None, "max_epochs": None,
                  "max_steps": None, "lr": None, "max_minutes": None, "total_minutes": None,
                  "min_minutes": None, "inherit": True, "lr_schedule": None, "ensemble": 0,
                  "ensemble_min_gain": 0.002}
FINAL_MODEL_KEYS = ("width", "emb_dim", "fc")
FINAL_TRAIN_KEYS = ("max_epochs", "max_steps", "lr", "lr_schedule")
#: the least time the final training gets, however long the search took, when min_minutes is not set
MIN_FINAL_MINUTES = 0.5


def _section(cfg: dict) -> dict:
    return {**FINAL_DEFAULTS, **(cfg.get("final") or {})}


def stretch(cfg: dict, records: Iterable[dict] = ()) -> float:
    """How many times their time limit the candidates took, where the step floor kept them going (the
    median over those trained, at least 1). Above 1 when a step floor (train.min_steps) outlasts the
    limit: on data larger than the budget was set for, every candidate trains its min_steps, and
    total_minutes and min_minutes stretch by as much, so the search still trains its candidates and
    leaves its final model the same share. A candidate that ended before the floor (its epochs ended
    it: the data is the budget's size) ran no longer for the floor and counts as 1, however slow."""
    limit, floor = cfg["train"].get("max_minutes"), cfg["train"].get("min_steps")
    if not limit or not floor:
        return 1.0
    ratios = [r["seconds"] / (60.0 * limit) if (r.get("steps") is None or r["steps"] >= floor) else 1.0
              for r in records
              if r.get("reused_from") is None and r.get("fitness") is not None and r.get("seconds")]
    return max(1.0, statistics.median(ratios)) if ratios else 1.0


def final_settings(cfg: dict, elapsed: float, seed: int, records: Iterable[dict] = ()) -> tuple[dict, dict]:
    """The model and training settings of the final training, `elapsed` seconds into the search:
    the search's, with the final section's values (but no candidate's step or time limit); its time
    is what is left of total_minutes (at least min_minutes), or max_minutes, whichever is less, the
    first two stretched as the candidates were (`records`: the search's history)."""
    f = _section(cfg)
    factor = stretch(cfg, records)
    model = {**cfg["model"], **{k: f[k] for k in FINAL_MODEL_KEYS if f[k] is not None}}
    train = {**cfg["train"], **{k: f[k] for k in FINAL_TRAIN_KEYS if f[k] is not None}}
    train["max_steps"] = f["max_steps"]          # the candidates' step limits are the proxy's, not the final's
    train["min_steps"] = None
    limits = [m for m in (f["max_minutes"],) if m is not None]
    if f["total_minutes"] is not None:
        least = factor * f["min_minutes"] if f["min_minutes"] is not None else MIN_FINAL_MINUTES
        limits.append(max(least, factor * f["total_minutes"] - elapsed / 60))
    train["max_minutes"] = round(min(limits), 3) if limits else None
    train["seed"] = seed
    return model, train


def search_deadline(cfg: dict, records: Iterable[dict] = ()) -> Optional[float]:
    """Seconds into the search after which no new candidate starts (those running finish): the
    total time less the final training's guaranteed share, stretched as the candidates were
    (`records`: the finished ones). None when the search has no such limit."""
    f = _section(cfg)
    if not f["enabled"] or f["total_minutes"] is None or f["min_minutes"] is None:
        return None
    return 60.0 * max(0.0, f["total_minutes"] - f["min_minutes"]) * stretch(cfg, records)


def search_time_is_up(cfg: dict, seconds: float, records: Iterable[dict] = ()) -> bool:
    """Is it too late, `seconds` into the search, for a candidate to start? When the median time of the
    candidates trained so far (`records`) would take it past `search_deadline`: a candidate started
    just before the deadline would eat into the final training's share, and the whole search would
    end that much after its total time. Never before a candidate is recorded, never without a deadline."""
    records = list(records)
    deadline = search_deadline(cfg, records)
    if deadline is None or not records:
        return False
    took = [r["seconds"] for r in records if r.get("reused_from") is None and r.get("seconds")]
    return seconds + (statistics.median(took) if took else 0.0) >= deadline


def final_wins(final: dict, candidate: dict) -> bool:
    """Is the final model the search's result? Only when it trained and its validation P@5 is at least
    that of the candidate it retrains (the same validation documents): a final training cut short
    must not replace a better network the search already has."""
    if final.get("fitness") is None or not final.get("model_dir"):
        return False
    return candidate.get("fitness") is None or final["fitness"] >= candidate["fitness"]
