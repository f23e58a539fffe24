"""The tasks a run can train: what config validation needs to know about each, as plain data.

`TASKS` is the extension table that validation reads (`task:`, `optim.loss`, monitors, `sweep.metric`);
the LightningModule (`deepnets.module.TaskModule`, which re-exports this table) implements each entry's
loss and metrics. No torch import here: loading a config stays fast.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Mode = Literal["min", "max"]


@dataclass(frozen=True)
class Task:
    """One task: the losses it takes (the first is `optim.loss: auto`), the metrics it logs per split
    with the mode that means "better", and the checkpoint / early-stopping monitor it defaults to."""

    losses: tuple[str, ...]
    metrics: dict[str, Mode]  # per split: {"loss": "min", ...}, logged as train/<name>, val/<name>, test/<name>
    monitor: str  # checkpoint.monitor's default
    monitor_mode: Mode


TASKS: dict[str, Task] = {
    # top-1 accuracy; a sweep's table adds <split>/error = 1 - acc
    "classification": Task(("cross_entropy",), {"loss": "min", "acc": "max"}, "val/acc", "max"),
    # MSE, MAE and R2 in the target's own units (R2 of k > 1 targets: the uniform average over the k outputs)
    "regression": Task(("mse", "huber"), {"loss": "min", "mse": "min", "mae": "min", "r2": "max"}, "val/loss", "min"),
}

SPLITS = ("train", "val", "test")


def logged_metrics(task: str, splits: tuple[str, ...] = SPLITS) -> dict[str, Mode]:
    """`<split>/<metric>` -> mode for every metric a run of `task` logs on `splits`."""
    metrics = TASKS[task].metrics
    return {f"{s}/{m}": mode for s in splits for m, mode in metrics.items()}


def sweep_metrics(task: str) -> dict[str, Mode]:
    """What `sweep.metric` may name: the logged metrics, plus `<split>/error` (1 - acc) for classification."""
    out = logged_metrics(task)
    if "acc" in TASKS[task].metrics:
        out |= {f"{s}/error": "min" for s in SPLITS}
    return out
