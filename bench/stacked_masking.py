"""Width sweeps stacked two ways (issue 20: "join by masking ... if measurement shows it pays"):

- shape groups (what deepnets/stacked.py does): one batched matmul chain per width, its seeds stacked;
- masked: every member padded to the widest width in one batched chain, the units beyond its own width
  masked to zero (their weights get no gradient, so each member trains as its own width).

    python bench/stacked_masking.py [--rounds 5] [--steps 200] [--threads 1]

The shipped double-descent sweep's shapes (12 widths 4..512 x 3 seeds, 64 inputs, 10 classes, batch 200):
one training step each way (forward, cross-entropy, backward, Adam), timed over `--steps` steps in A B A B
rounds. Prints the median per-step milliseconds of each and their ratio.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
WIDTHS = [4, 8, 16, 24, 32, 40, 48, 64, 96, 128, 256, 512]
SEEDS = 3
D, K, B = 64, 10, 200


def grouped() -> tuple[list[torch.Tensor], Loss]:
    params = []
    for w in WIDTHS:
        params += [
            (torch.randn(SEEDS, w, D) * 0.1).requires_grad_(),
            torch.zeros(SEEDS, w).requires_grad_(),
            (torch.randn(SEEDS, K, w) * 0.1).requires_grad_(),
            torch.zeros(SEEDS, K).requires_grad_(),
        ]

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # x (M, B, D), y (M, B)
        total = x.new_zeros(())
        for g in range(len(WIDTHS)):
            w1, b1, w2, b2 = params[4 * g : 4 * g + 4]
            s = slice(g * SEEDS, (g + 1) * SEEDS)
            h = torch.baddbmm(b1.unsqueeze(1), x[s], w1.transpose(1, 2)).relu()  # (S, B, w)
            out = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))  # (S, B, K)
            total = (
                total
                + F.cross_entropy(out.reshape(-1, K), y[s].reshape(-1), reduction="none").view(SEEDS, B).mean(1).sum()
            )
        return total

    return params, loss


def masked() -> tuple[list[torch.Tensor], Loss]:
    M, W = len(WIDTHS) * SEEDS, max(WIDTHS)
    mask = torch.zeros(M, 1, W)
    for g, w in enumerate(WIDTHS):
        mask[g * SEEDS : (g + 1) * SEEDS, :, :w] = 1
    params = [
        (torch.randn(M, W, D) * 0.1).requires_grad_(),
        torch.zeros(M, W).requires_grad_(),
        (torch.randn(M, K, W) * 0.1).requires_grad_(),
        torch.zeros(M, K).requires_grad_(),
    ]

    def loss(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        w1, b1, w2, b2 = params
        h = torch.baddbmm(b1.unsqueeze(1), x, w1.transpose(1, 2)).relu() * mask  # (M, B, W): beyond width -> 0
        out = torch.baddbmm(b2.unsqueeze(1), h, w2.transpose(1, 2))  # (M, B, K)
        return F.cross_entropy(out.reshape(-1, K), y.reshape(-1), reduction="none").view(M, B).mean(1).sum()

    return params, loss


def time_steps(build: Callable[[], tuple[list[torch.Tensor], Loss]], steps: int) -> float:
    torch.manual_seed(0)
    params, loss = build()
    opt = torch.optim.Adam(params, lr=1e-3, foreach=True)
    M = len(WIDTHS) * SEEDS
    x, y = torch.randn(M, B, D), torch.randint(0, K, (M, B))
    for _ in range(5):  # warm-up
        opt.zero_grad(set_to_none=True)
        loss(x, y).backward()
        opt.step()
    start = time.perf_counter()
    for _ in range(steps):
        opt.zero_grad(set_to_none=True)
        loss(x, y).backward()
        opt.step()
    return (time.perf_counter() - start) / steps * 1e3


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    times: dict[str, list[float]] = {"groups": [], "masked": []}
    for r in range(args.rounds):
        order = [("groups", grouped), ("masked", masked)]
        for name, build in order if r % 2 == 0 else order[::-1]:
            times[name].append(time_steps(build, args.steps))
    g, m = statistics.median(times["groups"]), statistics.median(times["masked"])
    print(
        f"{len(WIDTHS)} widths x {SEEDS} seeds, batch {B}, {args.threads} thread(s), {args.rounds} rounds of "
        f"{args.steps} steps: shape groups {g:.2f} ms/step, masked to width {max(WIDTHS)} {m:.2f} ms/step "
        f"(masked / groups = {m / g:.2f})"
    )


if __name__ == "__main__":
    main()
