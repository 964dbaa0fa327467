"""The settings of the final phase: after the evolution, the best architecture is trained to the end
of the budget (as XMC-NAS trained its discovered architecture), and that model is the search's result.

A run's config has a "final" section; a value of None there means the search's own. Its time is
either fixed (max_minutes) or what is left of the whole search's wall-clock budget (total_minutes),
so that a demo ends on time whatever the machine.
"""
from __future__ import annotations

FINAL_DEFAULTS = {"enabled": True, "width": None, "emb_dim": None, "fc": None, "max_epochs": None,
                  "max_steps": None, "lr": None, "max_minutes": None, "total_minutes": None}
FINAL_MODEL_KEYS = ("width", "emb_dim", "fc")
FINAL_TRAIN_KEYS = ("max_epochs", "max_steps", "lr")
#: the least time the final training gets, however long the search took
MIN_FINAL_MINUTES = 0.5


def final_settings(cfg: dict, elapsed: float, seed: int) -> tuple[dict, dict]:
    """The model and training settings of the final training, `elapsed` seconds into the search:
    the search's, with the final section's values (but no candidate's step or time limit); its time is what is left of total_minutes
    (at least MIN_FINAL_MINUTES), or max_minutes, whichever is less."""
    f = {**FINAL_DEFAULTS, **(cfg.get("final") or {})}
    model = {**cfg["model"], **{k: f[k] for k in FINAL_MODEL_KEYS if f[k] is not None}}
    train = {**cfg["train"], **{k: f[k] for k in FINAL_TRAIN_KEYS if f[k] is not None}}
    train["max_steps"] = f["max_steps"]          # the candidates' step limit is the proxy's, not the final's
    limits = [m for m in (f["max_minutes"],) if m is not None]
    if f["total_minutes"] is not None:
        limits.append(max(MIN_FINAL_MINUTES, f["total_minutes"] - elapsed / 60))
    train["max_minutes"] = round(min(limits), 3) if limits else None
    train["seed"] = seed
    return model, train
