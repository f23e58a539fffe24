"""Where `python -m deepnets.experiments double_descent --ridge` spends its extra time: subnormal floats.

    python bench/subnormals.py [--config double_descent_ridge] [--threads 2] [--block 200]

The config's 36 nets (12 widths x 3 seeds) as `train_stacked` builds them (StackedClassifier, StackedBatches,
the stacked optimizer and the config's lr schedule), trained for the config's 2,000 steps without Lightning.
Every `--block` steps: milliseconds per step, and how many parameters and optimizer-state values are subnormal
(0 < |x| < 2^-126), which x86 CPUs compute many times slower than normal floats. With weight decay the
weights of units that stopped learning decay towards 0 into the subnormal range and the matmuls slow down;
without it (`--config double_descent`) only optimizer-state values (Adam's second moments of gradients that
vanished) are subnormal, and the step keeps its speed.
"""

from __future__ import annotations

import argparse
import time

import torch
from stacked_step import stacked_sweep  # bench/, this script's folder

from deepnets import stacked as S
from deepnets.module import build_scheduler

TINY = torch.finfo(torch.float32).tiny  # 2^-126, the smallest normal float32


def subnormal(t: torch.Tensor) -> int:
    a = t.detach().abs()
    return int(((a > 0) & (a < TINY)).sum())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="double_descent_ridge")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--block", type=int, default=200)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    cfgs, module, optimizer, loader = stacked_sweep(args.config)
    base = cfgs[0]
    total = len(loader) * base.trainer.max_epochs
    scheduler = build_scheduler(optimizer, base.scheduler, total, len(loader), base.optim.lr)
    print(f"{args.config}: {len(cfgs)} nets, {total} steps, {args.threads} threads")
    step, start = 0, time.perf_counter()
    for _ in range(base.trainer.max_epochs):
        for x, y in loader:  # each pass is the next epoch's order
            loss = S.cross_entropy(module(x, train=True), y).mean(1).sum()
            loss.backward()
            optimizer.step()
            scheduler.step()
            module._zero_grad()
            step += 1
            if step % args.block == 0:
                ms = (time.perf_counter() - start) / args.block * 1e3
                params = sum(subnormal(t) for t in module.parameters())
                state = sum(subnormal(v) for st in optimizer.state.values() for k, v in st.items() if k != "step")
                print(
                    f"steps {step - args.block:5d}-{step - 1:5d}: {ms:7.2f} ms/step; subnormal: {params} weights, "
                    f"{state} optimizer-state values",
                    flush=True,
                )
                start = time.perf_counter()


if __name__ == "__main__":
    main()
