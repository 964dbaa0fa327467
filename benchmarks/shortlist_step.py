"""Peak memory of one training step of a shortlisted network at an extreme label count, each in a fresh
process (the high-water mark is the process's own): the attentionxml preset's network, a batch of
random token ids and random shortlists, forward, BCE over the K slots, backward, the optimizers' step.

    python benchmarks/shortlist_step.py --labels 670091 --k 1000
    python benchmarks/shortlist_step.py --labels 100000 --k 1000 --dense     # every label, for comparison

Peak memory is the process's maximum resident set (what the operating system counts); the step's time
is printed too, but on a shared machine only ratios taken side by side mean anything.
"""
from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch
import torch.nn.functional as F


def main(argv=None) -> int:
    from xmcnas_fast.model import build_model, preset
    from xmcnas_fast.optim import optimizers

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--labels", type=int, default=670_091)
    p.add_argument("--k", type=int, default=1000, help="shortlist size (ignored with --dense)")
    p.add_argument("--dense", action="store_true", help="score every label (no shortlist)")
    p.add_argument("--batch", type=int, default=40)
    p.add_argument("--tokens", type=int, default=100)
    p.add_argument("--vocab", type=int, default=100_000)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--threads", type=int, default=0)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = preset("attentionxml")
    cfg.shortlist = 0 if args.dense else args.k
    model = build_model(cfg, args.vocab, args.labels, seed=0)
    _, opts = optimizers(model, 1e-3)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(2, args.vocab, (args.batch, args.tokens), generator=g)
    mask = torch.ones(args.batch, args.tokens, dtype=torch.bool)
    after_build = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        if args.dense:
            logits = model(tokens, mask)
            targets = torch.zeros_like(logits)
            targets[:, :5] = 1.0
        else:
            slots = torch.stack([torch.randperm(args.labels, generator=g)[: args.k] for _ in range(args.batch)])
            logits = model(tokens, mask, slots)
            targets = (slots < 5).float()
        loss = F.binary_cross_entropy_with_logits(logits, targets)
        for o in opts:
            o.zero_grad(set_to_none=True)
        loss.backward()
        for o in opts:
            o.step()
        times.append(time.perf_counter() - t0)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    shape = f"L={args.labels:,} B={args.batch} N={args.tokens} D={model.head.attention.shape[1]}"
    what = "dense" if args.dense else f"shortlist K={args.k}"
    print(f"{what}, {shape}: peak memory {peak:.2f} GiB (after building the model and optimizers "
          f"{after_build:.2f} GiB), step {np.median(times[1:] or times):.2f} s (median of {args.steps})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
