"""Step-size selection before training: Lightning's LR finder, and Bottou's probe on a subset."""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from deepnets.config import Config
from deepnets.data import InMemoryDataModule

PROBE_SUBSET = 1000  # samples: "a small subset" is enough to rank step sizes (Bottou 2012, sec. 4.2)


def _scratch_trainer(cfg: Config, max_steps: int) -> L.Trainer:
    """A trainer that logs, checkpoints and validates nothing: tuning must not touch the run."""
    t = cfg.trainer
    return L.Trainer(
        accelerator=t.accelerator,
        devices=1,
        precision=t.lightning_precision,
        max_steps=max_steps,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )


def lr_find(cfg: Config, model: nn.Module, run_dir: Path | None) -> float:
    """Run Lightning's LR range test on a copy of `model`; return its suggestion, plot the curve."""
    from lightning.pytorch.tuner import Tuner

    from deepnets.module import Classifier

    module = Classifier(copy.deepcopy(model), cfg)
    data = InMemoryDataModule(cfg.data, cfg.seed)
    finder = Tuner(_scratch_trainer(cfg, max_steps=-1)).lr_find(
        module, datamodule=data, min_lr=1e-6, max_lr=1.0, num_training=100, update_attr=False
    )
    suggestion = finder.suggestion() if finder is not None else None
    if suggestion is None or not math.isfinite(suggestion):
        return cfg.optim.lr
    if run_dir is not None:
        fig = finder.plot(suggest=True)
        fig.savefig(run_dir / "lr_find.png", dpi=100)
        import matplotlib.pyplot as plt

        plt.close(fig)
    return float(suggestion)


def lr_probe(cfg: Config, model: nn.Module, run_dir: Path | None) -> tuple[float, list[tuple[float, float]]]:
    """Bottou's trick: train a copy of `model` for `lr_probe_steps` steps on a small subset with
    each learning rate, and keep the one with the lowest training loss on that subset.

    Returns (best lr, [(lr, loss), ...]); the table is printed and saved as lr_probe.csv.
    """
    from deepnets.module import Classifier

    data_cfg = dataclasses.replace(cfg.data, label_noise=0.0)
    available = InMemoryDataModule(data_cfg, cfg.seed)
    available.setup()
    assert available.splits is not None
    n = min(PROBE_SUBSET, len(available.splits.y_train))
    data_cfg = dataclasses.replace(data_cfg, train_size=n)
    results: list[tuple[float, float]] = []
    for lr in cfg.trainer.lr_probe or []:
        probe_cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))
        module = Classifier(copy.deepcopy(model), probe_cfg)
        data = InMemoryDataModule(data_cfg, cfg.seed)
        _scratch_trainer(cfg, max_steps=cfg.trainer.lr_probe_steps).fit(module, datamodule=data)
        assert data.splits is not None
        with torch.no_grad():
            module.eval()
            x, y = data.splits.x_train.to(module.device), data.splits.y_train.to(module.device)
            loss = float(F.cross_entropy(module(x), y))
        results.append((lr, loss if math.isfinite(loss) else math.inf))
    best = min(results, key=lambda r: r[1])[0]
    lines = ["lr,train_loss", *(f"{lr:g},{loss:.6g}" for lr, loss in results)]
    if run_dir is not None:
        (run_dir / "lr_probe.csv").write_text("\n".join(lines) + "\n")
    width = max(len(f"{lr:g}") for lr, _ in results)
    print(f"lr probe ({cfg.trainer.lr_probe_steps} steps on {n} samples):")
    for lr, loss in results:
        print(f"  lr={lr:<{width}g}  train loss {loss:.4g}{'  <- best' if lr == best else ''}")
    return best, results
