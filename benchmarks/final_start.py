"""Where should the final training start? On a finished search, train its best architecture for the
same minutes two ways: going on from the best candidate's weights at the search's sizes, and from
scratch at larger sizes; print the validation and test P@5 each reaches.

    python benchmarks/final_start.py runs/worth/evolution-seed0 --minutes 3 --width 128
    python benchmarks/final_start.py RUN --mode continue        # one of the two, e.g. one per core

Each training uses one thread (two can run side by side on a 2-core machine); nothing is written to
the run. The demo budget's final training follows what this measured (benchmarks/RESULTS.md).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:  # this checkout's package and in-place build
    sys.path.insert(0, ROOT)


def train_best(run_path: str, mode: str, minutes: float, width: int, seed: int, epochs: int = 10,
               lr_schedule: str = "constant") -> dict:
    import torch

    from xmcnas_fast.candidate import train_candidate, worker_init
    from xmcnas_fast.contract import CandidateTask, ParentWeights
    from xmcnas_fast.fitness import ranked
    from xmcnas_fast.model import ModelConfig
    from xmcnas_fast.runs import Run
    from xmcnas_fast.scheduler.task import WorkerContext
    from xmcnas_fast.search import load_data
    from xmcnas_fast.train import TrainConfig

    torch.set_num_threads(1)
    run = Run.open(run_path)
    cfg = run.config
    data = load_data(cfg["data"])
    best = ranked({r["id"]: r for r in run.history.records})[0]
    model = dict(cfg["model"], genotype=best["genotype"])
    train = dict(cfg["train"], max_steps=None, max_epochs=epochs, max_minutes=minutes, seed=seed,
                 lr_schedule=lr_schedule)
    parent = None
    if mode == "continue":
        if not best.get("model_dir"):
            raise SystemExit(f"{run_path}: the best candidate's bundle was not kept")
        parent = ParentWeights(best["id"], best["genotype"], best["model_dir"])
    else:
        model.update(width=width, emb_dim=width, fc=[width])
    with tempfile.TemporaryDirectory() as tmp:
        task = CandidateTask(model=ModelConfig.from_dict(model), train=TrainConfig.from_dict(train),
                             model_dir=os.path.join(tmp, "m"), save_above=math.inf, parent=parent, threads=1)
        ctx = WorkerContext(device=torch.device("cpu"), shared=worker_init(data.cache_path, None), task_id="final",
                            worker="cpu", attempt=1, deadline=None, emit=lambda *a: None, stopped=lambda: False)
        rec = train_candidate(task, ctx)
    return {"run": run_path, "mode": mode, "candidate": best["id"], "candidate valid P@5": best["fitness"],
            "valid P@5": rec.valid["P@5"], "test P@1": rec.test["P@1"], "test P@5": rec.test["P@5"],
            "steps": rec.steps, "width": model["width"], "lr_schedule": lr_schedule,
            "inherited": (rec.inherited or {}).get("parts")}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run", help="a finished search directory whose best candidate's bundle was kept")
    p.add_argument("--mode", choices=["continue", "fresh", "both"], default="both")
    p.add_argument("--minutes", type=float, default=3.0, help="training minutes of each (default 3)")
    p.add_argument("--width", type=int, default=128, help="embedding, node and FC width of the fresh network")
    p.add_argument("--epochs", type=int, default=10, help="at most this many epochs (default 10)")
    p.add_argument("--lr-schedule", choices=["constant", "cosine"], default="constant")
    p.add_argument("--seed", type=int, default=777)
    args = p.parse_args(argv)
    for mode in ("continue", "fresh") if args.mode == "both" else (args.mode,):
        print(json.dumps(train_best(args.run, mode, args.minutes, args.width, args.seed, args.epochs,
                                    args.lr_schedule)), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
