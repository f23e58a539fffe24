"""Step-size selection before training: Lightning's LR finder, and Bottou's probe on a subset."""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import tempfile
from collections.abc import Iterator
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

from deepnets.checkpoint import SafeCheckpointIO
from deepnets.config import Config
from deepnets.data import InMemoryDataModule
from deepnets.errors import UserError

PROBE_SUBSET = 1000  # samples: "a small subset" is enough to rank step sizes (Bottou 2012, sec. 4.2)


@contextlib.contextmanager
def _scratch_dir() -> Iterator[Path]:
    """A private temporary directory for what Lightning writes while tuning.

    Lightning's LR finder saves the model to `<default_root_dir>/.lr_find_<uuid>.ckpt` and restores it
    afterwards; the default root is the working directory, which may be read-only (or someone else's).
    """
    try:
        scratch = tempfile.TemporaryDirectory(prefix="deepnets-tune-")
    except OSError as e:  # no writable temporary directory (TMPDIR)
        raise UserError(f"trainer.lr_find / lr_probe: cannot make a scratch directory: {e}") from None
    with scratch as d:
        yield Path(d)


def _scratch_trainer(cfg: Config, max_steps: int, root: Path) -> L.Trainer:
    """A trainer that logs, checkpoints and validates nothing: tuning must not touch the run."""
    t = cfg.trainer
    return L.Trainer(
        default_root_dir=str(root),
        plugins=[SafeCheckpointIO()],  # the finder's own checkpoint, too, is loaded weights-only
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
    with _scratch_dir() as root:
        finder = Tuner(_scratch_trainer(cfg, max_steps=-1, root=root)).lr_find(
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
    each learning rate, and keep the one with the lowest training loss on that subset among those that
    did not diverge (a loss that became non-finite or ended above the untrained model's).

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
    start_loss = math.inf
    with _scratch_dir() as root:
        for lr in cfg.trainer.lr_probe or []:
            probe_cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))
            module = Classifier(copy.deepcopy(model), probe_cfg)
            data = InMemoryDataModule(data_cfg, cfg.seed)
            data.setup()
            if not results:  # every rate starts from the same weights: their loss on the subset is the bar
                start_loss = _subset_loss(module, data)
            _scratch_trainer(cfg, max_steps=cfg.trainer.lr_probe_steps, root=root).fit(module, datamodule=data)
            results.append((lr, _subset_loss(module, data)))
    # A rate whose loss became non-finite, or ended above where it started, diverged: it is never kept, however
    # the others did (the lowest loss among diverged rates would be a number, not a choice).
    converged = [r for r in results if math.isfinite(r[1]) and r[1] <= start_loss]
    lines = ["lr,train_loss", *(f"{lr:g},{loss:.6g}" for lr, loss in results)]
    if run_dir is not None:
        (run_dir / "lr_probe.csv").write_text("\n".join(lines) + "\n")
    if not converged:
        tried = ", ".join(f"{lr:g} -> {loss:.4g}" for lr, loss in results)
        raise UserError(
            f"trainer.lr_probe: every rate diverged (training loss from {start_loss:.4g} after "
            f"{cfg.trainer.lr_probe_steps} steps: {tried}); try smaller rates"
        )
    best = min(converged, key=lambda r: r[1])[0]
    width = max(len(f"{lr:g}") for lr, _ in results)
    print(f"lr probe ({cfg.trainer.lr_probe_steps} steps on {n} samples, starting loss {start_loss:.4g}):")
    for lr, loss in results:
        mark = "  <- best" if lr == best else ("  diverged" if (lr, loss) not in converged else "")
        print(f"  lr={lr:<{width}g}  train loss {loss:.4g}{mark}")
    return best, results


@torch.no_grad()
def _subset_loss(module: nn.Module, data: InMemoryDataModule) -> float:
    """Mean cross-entropy of `module` (in eval mode) on the probe subset; inf where it is not finite."""
    assert data.splits is not None
    was_training = module.training
    module.eval()
    device = next(module.parameters()).device
    x, y = data.splits.x_train.to(device), data.splits.y_train.to(device)
    loss = float(F.cross_entropy(module(x), y))
    module.train(was_training)
    return loss if math.isfinite(loss) else math.inf
