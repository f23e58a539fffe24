"""One step of the stacked double-descent sweep, part by part, with torch's Adam step against the stacked run's
own (`deepnets.stacked.Adam`: one fused call per param group, one add for every step counter).

    python bench/stacked_step.py [--rounds 3] [--steps 200] [--threads 2]

The shipped sweep's 36 nets (12 widths x 3 seeds) built as `train_stacked` builds them (StackedClassifier,
StackedBatches, build_stacked_optimizer), then `--steps` training steps timed by part: forward + loss,
backward, optimizer step, zero_grad. Without Lightning: its per-step overhead is apart (bench/overhead.py).
Rounds alternate the optimizer (A B A B); prints the median per-step milliseconds of each part, and checks
that both optimizers leave every weight equal bit for bit.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import time

import torch

from deepnets import stacked as S
from deepnets.config import Config, load_config

PARTS = ("forward", "backward", "optimizer", "zero_grad")


def stacked_sweep(config: str) -> tuple[list[Config], S.StackedClassifier, torch.optim.Optimizer, S.StackedBatches]:
    """The sweep's points (its params x seeds; model.width here) as `train_stacked` builds them, without
    Lightning: configs, module, optimizer, training batches."""
    base = load_config(config, [])
    cfgs = [
        dataclasses.replace(base, seed=s, model=dataclasses.replace(base.model, width=w))
        for w in base.sweep.params["model.width"]
        for s in base.sweep.seeds
    ]
    data, y_train, _, _ = S._load_data(cfgs)
    models, gens = S.build_members(cfgs, data)
    optimizer, _ = S.build_stacked_optimizer(models, cfgs)
    s = data.splits
    assert s is not None
    loader = S.StackedBatches(s.x_train, y_train, [c.seed for c in cfgs], base.data.batch_size, False)
    return cfgs, S.StackedClassifier(cfgs, models, gens), optimizer, loader


def build(torch_adam: bool) -> tuple[S.StackedClassifier, torch.optim.Optimizer, list[tuple[torch.Tensor, ...]]]:
    _, module, optimizer, loader = stacked_sweep("double_descent")
    if torch_adam:  # the same param groups, torch's own class (its step)
        optimizer = torch.optim.Adam([dict(g) for g in optimizer.param_groups], fused=True)
    return module, optimizer, list(loader)


def steps(module: S.StackedClassifier, optimizer: torch.optim.Optimizer, batches: list, n: int) -> dict[str, float]:
    t = dict.fromkeys(PARTS, 0.0)
    for i in range(n):
        x, y = batches[i % len(batches)]
        a = time.perf_counter()
        loss = S.cross_entropy(module(x, train=True), y).mean(1).sum()
        b = time.perf_counter()
        loss.backward()
        c = time.perf_counter()
        optimizer.step()
        d = time.perf_counter()
        module._zero_grad()
        e = time.perf_counter()
        for part, dt in zip(PARTS, (b - a, c - b, d - c, e - d), strict=True):
            t[part] += dt
    return {k: v / n * 1e3 for k, v in t.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    runs = {"torch Adam": build(True), "one-call Adam": build(False)}
    times: dict[str, list[dict[str, float]]] = {k: [] for k in runs}
    for run in runs.values():
        steps(*run, 20)  # warm-up (the first step creates the optimizer state)
    for r in range(args.rounds):
        for name, run in runs.items():
            times[name].append(steps(*run, args.steps))
            print(f"round {r + 1}: {name:14s} " + "  ".join(f"{k} {v:.2f}" for k, v in times[name][-1].items()))
    a, b = (runs[k][0] for k in runs)
    same = all(torch.equal(p, q) for p, q in zip(a.parameters(), b.parameters(), strict=True))
    print(f"threads {args.threads}, {args.steps} steps x {args.rounds} rounds; median ms per step:")
    for name in runs:
        med = {k: statistics.median(t[k] for t in times[name]) for k in PARTS}
        print(f"  {name:14s} " + "  ".join(f"{k} {v:.2f}" for k, v in med.items()) + f"  total {sum(med.values()):.2f}")
    print(f"weights equal bit for bit after {20 + args.rounds * args.steps} steps: {same}")
    if not same:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
