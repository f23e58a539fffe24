"""The independent computation every reported metric is checked against: the model applied by hand.

Per-sample cross-entropy and correctness, summed in float64 over the whole split and divided by its size:
the exact per-sample mean, whatever batches the run used. Shared by tests/test_metrics_exact.py (CPU) and
bench/exact_metrics.py (the same check on a GPU, from `bench/gpu_check.sh`). Plain torch on purpose: no
Lightning, no torchmetrics, nothing of the code under test.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def by_hand(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    batch_size: int | None = None,
    autocast: torch.dtype | None = None,
) -> tuple[float, float]:
    """(mean cross-entropy, accuracy) over all samples: per-sample values summed in float64.

    The forward runs in the dtype and on the device of `model` and `x` (pass both as float64 for a float64
    reference). `batch_size` only splits the forward (same kernels as the run's eval loader, e.g. under
    autocast); the reduction is always over every sample at once. `autocast` (e.g. torch.bfloat16) runs the
    forward under torch.autocast on x's device, as a mixed-precision run does; the logits are then taken to
    float64 before the loss.
    """
    losses, correct = [], []
    chunks = zip(x.split(batch_size), y.split(batch_size), strict=True) if batch_size else [(x, y)]
    ctx = torch.autocast(x.device.type, dtype=autocast) if autocast is not None else contextlib.nullcontext()
    with torch.no_grad():
        for xb, yb in chunks:
            with ctx:
                logits = model(xb)  # (B, K)
            logits = logits.double()
            losses.append(F.cross_entropy(logits, yb, reduction="none"))  # (B,)
            correct.append((logits.argmax(1) == yb).double())  # (B,)
    n = len(y)
    return float(torch.cat(losses).sum() / n), float(torch.cat(correct).sum() / n)


def mean_of_batch_means(model: nn.Module, x: Tensor, y: Tensor, batch_size: int) -> float:
    """The wrong number a weight-dropping reduction reports: the plain mean of per-batch mean losses.

    A check is only able to fail if this differs from `by_hand`'s loss by more than its tolerance.
    """
    with torch.no_grad():
        means = [
            float(F.cross_entropy(model(xb).double(), yb))
            for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True)
        ]
    return sum(means) / len(means)
