"""A search's configuration: the budgets, `make_config` (a budget's values and the flags given), and
`migrate`, which brings the config.json of a run made by an older version to the present layout
(docs/design.md "Run directory"), so that the code reads every setting without defaults of its own.
"""
from __future__ import annotations

from typing import Optional

from .evolution import Strategy, make_strategy
from .final import FINAL_DEFAULTS
from .lexical.shortlist import SHORTLIST_ABOVE, SHORTLIST_K, shortlist_size
from .model import ModelConfig
from .scheduler.devices import cuda_count, visible_cores
from .train import TrainConfig

__all__ = ["CONFIG_VERSION", "BUDGETS", "make_config", "migrate", "strategy_of", "candidate_total",
           "devices_text", "default_devices"]

#: the layout of a run's config.json; `migrate` brings an older one to it. 2: the "final" section
#: always present, train without device/threads (where a training runs is no setting). 3: the lexical
#: stage's one-vs-rest model ("lexical" "ovr") and the result's ensemble ("final" "ensemble"). 4: the
#: serving stage ("lexical" "refit"). 5: what candidates are judged by ("lexical" "fitness"). 6: the
#: final model's ranker fusion ("lexical" "ranker").
CONFIG_VERSION = 6

# Budgets: starting points for every knob (each is also a flag).
BUDGETS = {
    # Up to 16 candidates of at most an epoch or half a minute each, then the best trained on from its
    # own weights for what is left of 9 minutes (at least 4): within 10 minutes on a 2-core CPU with the
    # bundled debtags data. (Going on from the candidate beat a fresh network of twice the width given
    # the same 3 minutes: validation P@5 43.7 / 43.0 against 42.1 / 42.5, two searches' best.) The final
    # training's share is what makes the fused result: its network alone went from 82.5 to 84.1 test P@1
    # between 3 and 6.5 minutes, while fused with the lexical stage the candidates' fitness spans half a
    # point of validation P@5, so the search stops at minute 5 and the final model gets at least 4.
    "demo": {
        "search": {"population": 6, "cycles": 10, "sample": 3, "max_depth": 4, "inherit": True},
        "model": {"emb_dim": 64, "width": 64, "fc": [64]},
        # no early stop inside the budget: many networks sit on the label-prior plateau (validation
        # P@5 ~25.5) for their first hundreds of steps before P@5 rises, and a short patience stopped
        # them there, so the search ranked them by when they took off
        # lr 4e-3: twice the P@5 gain of 2e-3 over the first few hundred steps (width 128, conv1 + conv5)
        # at least 800 steps, whatever the time: on a 68k-text, 4,190-label set (5x debtags's steps per
        # epoch, 4x its cost per step) networks sat on the label-prior plateau for 600 steps, so half
        # a minute (100-200 steps there) left every candidate on it; the 9 minutes stretch as the
        # candidates do (final.stretch). On debtags the epoch (581 steps) ends a candidate first.
        "train": {"max_epochs": 1, "max_minutes": 0.5, "min_steps": 800, "eval_every": 100, "patience": 50,
                  "max_len": 64, "eval_batch_size": 500, "lr": 4e-3},
        # word vectors learned from the training texts (data/corpus_vectors.py): a candidate's one epoch
        # learns little of the words from noise; on debtags the result's network went from 82.5 to 83.5 P@1
        "data": {"valid": 1000, "max_len": 64, "vectors": "corpus"},
        # the result may be an ensemble of up to 3 of the run's networks, kept where it gains 0.2 points of
        # validation P@5 (ensemble.py): on the demo's 1,000 validation documents, ensembles of the final
        # model with one-epoch candidates that gained 0.1-0.2 points there lost 0.1-0.35 P@1 on test
        "final": {"max_epochs": 10, "total_minutes": 9.0, "min_minutes": 4.0, "ensemble": 3},
    },
    # the paper's setting (XMC-NAS, EURLex-4K): P=20, C=50, S=10, up to 30 epochs, width 512; the
    # discovered architecture trained again, to the end of its 30 epochs, as the paper's Table 2
    "paper": {
        "search": {"population": 20, "cycles": 50, "sample": 10, "max_depth": 6},
        "model": {"emb_dim": 300, "width": 512, "fc": [256]},
        "train": {"max_epochs": 30, "max_minutes": None, "eval_every": 100, "patience": 50, "max_len": 500},
        "data": {"valid": 200, "max_len": 500},
        "final": {"inherit": False, "ensemble": 3},
    },
}


def default_devices() -> str:
    """This machine's devices when none are given: every GPU, else two CPU workers if it has the cores."""
    if cuda_count():
        return "cuda"
    return "cpu:2" if visible_cores() >= 2 else "cpu"


def devices_text(cfg: dict, devices: Optional[str] = None) -> str:
    """The device spec a run uses: the one given now, else the run's saved one, else this machine's
    default (parse it with scheduler.devices.parse_request)."""
    return devices or cfg["run"]["devices"] or default_devices()


def strategy_of(cfg: dict, factory=make_strategy) -> Strategy:
    """A fresh strategy with the run's search settings (the same seed: the same proposals), made by
    `factory` (evolution.make_strategy)."""
    s = cfg["search"]
    kw = {"sample_size": s["sample"]} if s["strategy"] == "evolution" else {}
    constraint = (s["constraint"], 0) if s["constraint"] else None
    return factory(s["strategy"], population_size=s["population"], cycles=s["cycles"],
                         max_depth=s["max_depth"], seed=s["seed"], constraint=constraint,
                         constraint_fraction=s["constraint_fraction"], **kw)


#: the lexical stage of a search (docs/design.md, "The lexical stage and fusion"): on, every candidate's
#: fitness is the validation P@5 of the network fused with it; "residual": networks train with its
#: logits as a fixed offset (its training split's top lists cross-fitted over 2 folds)
#: "ovr": a one-vs-rest linear model averaged with the tree ("auto": where the labels are at most
#: lexical.stage.OVR_MAX_LABELS)
#: shortlist_above, shortlist_k: above that many labels, networks score a shortlist of shortlist_k labels per
#: document from the stage's tree (docs/design.md, "Extreme label spaces"; resolve_shortlist)
#: refit: the result carries a serving stage, the same stage fitted again on every training document (the
#: validation split's too), once the search's has served for choosing (fuse mode without a shortlist)
#: fitness: what a candidate's validation evaluation is judged by (fitness.JUDGES): "fused", the network fused
#: with the stage, or "network", the network alone (fuse mode; the fusion is still chosen and served on the
#: fused figure; a residual network is always judged fused)
#: ranker: the final model (and ensemble) may be fused by a small learned ranker instead of the weight
#: grid, where its out-of-fold validation P@5 is higher (lexical/ranker.py; fuse mode without a shortlist)
LEXICAL_DEFAULTS = {"enabled": True, "mode": "fuse", "top_k": 50, "trees": 1, "ovr": "auto",
                    "shortlist_above": SHORTLIST_ABOVE, "shortlist_k": SHORTLIST_K, "refit": True,
                    "fitness": "fused", "ranker": True}
LEXICAL_MODES = ("fuse", "residual")


def resolve_shortlist(cfg: dict, num_labels: int) -> int:
    """Set the run's model.shortlist from its data's label count and the lexical section's switch (a run
    made before there was one: the defaults), and return it; ValueError when the shortlist it needs
    cannot be had (no lexical stage, or its residual mode)."""
    lex = cfg["lexical"]
    k = shortlist_size(lex.get("shortlist_k", SHORTLIST_K), lex.get("shortlist_above", SHORTLIST_ABOVE), num_labels)
    if k and cfg["model"].get("kind", "dag") != "dag":
        raise ValueError(f"{num_labels:,} labels call for a shortlist, which only the attention networks score")
    if k and not lex["enabled"]:
        raise ValueError(f"{num_labels:,} labels call for a shortlist (above --shortlist-above "
                         f"{lex.get('shortlist_above', SHORTLIST_ABOVE)}), which comes from the lexical stage: "
                         f"drop --no-lexical, or raise --shortlist-above")
    if k and lex["mode"] == "residual":
        raise ValueError("--lexical-mode residual is not available over a shortlist: use fuse, or raise "
                         "--shortlist-above")
    cfg["model"]["shortlist"] = k
    return k


def candidate_total(cfg: dict) -> int:
    """How many candidates the run's search trains in all (its strategy's budget)."""
    return strategy_of(cfg).budget


def make_config(budget: str = "demo", *, dataset: str = "debtags", overrides: Optional[dict] = None) -> dict:
    """The full configuration of a search: a budget's values, then any overrides {section: {key: value}}."""
    if budget not in BUDGETS:
        raise ValueError(f"unknown budget {budget!r}; expected one of {sorted(BUDGETS)}")
    b = BUDGETS[budget]
    cfg = {
        "version": CONFIG_VERSION, "budget": budget,
        "data": {"dataset": dataset, "max_len": 500, "valid": 0.1, "seed": 0, "min_count": 1,
                 "max_vocab": None, "vectors": None, **b["data"]},
        "search": {"strategy": "evolution", "seed": 0, "constraint": None, "constraint_fraction": 0.0,
                   "inherit": False, "fidelity": None, "promote": 1 / 3, **b["search"]},
        "model": {**ModelConfig().to_dict(), "genotype": None, **b["model"]},
        "train": {**TrainConfig().to_dict(), **b["train"]},
        "run": {"backend": "local", "devices": None, "candidate_timeout": None, "keep_models": 3},
        "final": {**FINAL_DEFAULTS, **b.get("final", {})},
        "lexical": dict(LEXICAL_DEFAULTS),
    }
    for section, values in (overrides or {}).items():
        for k, v in values.items():
            if k not in cfg[section]:
                raise ValueError(f"unknown setting {section}.{k}")
            cfg[section][k] = v
    strategy_of(cfg)  # refuses settings no search can run with (a sample larger than the population) up front
    s = cfg["search"]
    if s["fidelity"] is not None and s["fidelity"] < 1:
        raise ValueError(f"--fidelity {s['fidelity']}: the short run needs at least 1 step")
    if not 0 < s["promote"] <= 1:
        raise ValueError(f"--promote {s['promote']}: expected a fraction of the population, in (0, 1]")
    if cfg["lexical"]["mode"] not in LEXICAL_MODES:
        raise ValueError(f"--lexical-mode {cfg['lexical']['mode']}: expected one of {', '.join(LEXICAL_MODES)}")
    return cfg


#: search settings added after the first runs, with the value that reproduces those runs
_SEARCH_SINCE_V1 = {"strategy": "evolution", "constraint": None, "constraint_fraction": 0.0, "inherit": False,
                    "fidelity": None, "promote": 1 / 3}
_RUN_SINCE_V1 = {"backend": "local", "devices": None, "candidate_timeout": None, "keep_models": 3}
_DATA_SINCE_V1 = {"min_count": 1, "max_vocab": None, "vectors": None, "seed": 0}


def migrate(config: dict) -> dict:
    """The config of a run (config.json) in the present layout (CONFIG_VERSION); a new dict, the
    file is left as written. ValueError for a config of a newer version than this code knows.

    Version 1 (and before it had a version) -> 2: sections and keys added since are filled with the
    values that reproduce what such a run did (a run made before the final phase existed has none:
    "final" is disabled); "amp": false becomes "precision": "fp32"; train's "device" and "threads"
    (where it ran, not how) are dropped; such a run had no lexical stage ("lexical" disabled).
    2 -> 3: the lexical stage had no one-vs-rest model ("ovr": "off"), the result no ensemble, the
    head no shortlist (the switch's settings get their defaults). 3 -> 4: no serving stage ("refit" off).
    4 -> 5: candidates judged by the fused figure ("fitness": "fused")."""
    version = config.get("version", 1)
    if not isinstance(version, int) or version > CONFIG_VERSION:
        raise ValueError(f"config version {version!r} is newer than this xmcnas-fast knows ({CONFIG_VERSION}): "
                         f"upgrade xmcnas-fast to open it")
    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in config.items()}
    if version < 2:
        cfg.setdefault("budget", None)
        cfg["final"] = {**FINAL_DEFAULTS, **cfg["final"]} if "final" in cfg else {**FINAL_DEFAULTS, "enabled": False}
        cfg["search"] = {**_SEARCH_SINCE_V1, **cfg.get("search", {})}
        cfg["run"] = {**_RUN_SINCE_V1, **cfg.get("run", {})}
        cfg["data"] = {**_DATA_SINCE_V1, **cfg.get("data", {})}
        cfg["model"] = {**ModelConfig().to_dict(), **cfg.get("model", {})}
        train = dict(cfg.get("train", {}))
        if "precision" not in train and train.get("amp") is False:
            train["precision"] = "fp32"
        for gone in ("amp", "device", "threads"):
            train.pop(gone, None)
        cfg["train"] = {**TrainConfig().to_dict(), **train}
        cfg["lexical"] = {**LEXICAL_DEFAULTS, "enabled": False}
        cfg["version"] = 2
    if cfg["version"] < 3:
        cfg["lexical"] = {**LEXICAL_DEFAULTS, **cfg["lexical"], "ovr": "off"}
        cfg["final"] = {**FINAL_DEFAULTS, **cfg["final"], "ensemble": 0}
        cfg["model"] = {"shortlist": 0, **cfg["model"]}
        cfg["version"] = 3
    if cfg["version"] < 4:
        cfg["lexical"] = {**cfg["lexical"], "refit": False}
        cfg["version"] = 4
    if cfg["version"] < 5:
        cfg["lexical"] = {**cfg["lexical"], "fitness": "fused"}
        cfg["version"] = 5
    if cfg["version"] < 6:
        cfg["lexical"] = {**cfg["lexical"], "ranker": False}
        cfg["version"] = 6
    return cfg
