"""The LightningModule: loss, metrics, optimizers and schedulers around any classifier `nn.Module`."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy

from deepnets.config import Config, OptimConfig, SchedulerConfig
from deepnets.errors import UserError
from deepnets.models import depth_ordered_layers


class Classifier(L.LightningModule):
    """Cross-entropy classification of `model`'s logits, configured by `cfg.optim` / `cfg.scheduler`.

    Logs `train/loss`, `train/acc`, `val/loss`, `val/acc`, `test/loss`, `test/acc`
    (and `train/l1` when `optim.l1` > 0). Nothing here calls `.item()`: values
    stay on the device until Lightning logs them every `log_every_n_steps`.
    """

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__()
        self.model = model
        self.optim_cfg, self.sched_cfg = cfg.optim, cfg.scheduler
        self.save_hyperparameters(cfg.to_dict())  # plain dicts: safe under weights_only loading
        num_classes = model.head.out_features if hasattr(model, "head") else None
        self.channels_last = cfg.model.channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # validate_args=False: argument checks inspect tensor values, i.e. a host sync per step
        acc = lambda: MulticlassAccuracy(num_classes or 2, average="micro", validate_args=False)  # noqa: E731
        self.train_acc, self.val_acc, self.test_acc = acc(), acc(), acc()
        self.val_loss, self.test_loss = MeanMetric(), MeanMetric()

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    def l1_penalty(self) -> Tensor:
        """optim.l1 * sum |W| over the depth-ordered weight matrices (biases and norms excluded)."""
        weights = [w for _, w in depth_ordered_layers(self.model)]
        return self.optim_cfg.l1 * torch.stack([w.abs().sum() for w in weights]).sum()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, ...), (B,)
        logits = self(x)  # (B, K)
        loss = F.cross_entropy(logits, y, label_smoothing=self.optim_cfg.label_smoothing)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        if self.optim_cfg.l1 > 0:
            l1 = self.l1_penalty()
            self.log("train/l1", l1, on_step=True, on_epoch=False)
            loss = loss + l1
        self.train_acc.update(logits.detach(), y)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        return loss

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits, y)
        loss_metric, acc = (self.val_loss, self.val_acc) if stage == "val" else (self.test_loss, self.test_acc)
        loss_metric.update(loss, weight=len(y))  # exact mean over uneven batches and ranks
        acc.update(logits, y)
        self.log(f"{stage}/loss", loss_metric, on_step=False, on_epoch=True, prog_bar=stage == "val")
        self.log(f"{stage}/acc", acc, on_step=False, on_epoch=True, prog_bar=stage == "val")

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def _schedule_length(self) -> tuple[int, int]:
        """(optimizer steps per epoch, in total), from the train loader's length.

        Not `trainer.estimated_stepping_batches`: it sets up the fit loop's data
        before a checkpoint's loop state is restored, so a resumed run would not
        restore the loader's position (Lightning 2.6).
        """
        trainer = self.trainer
        loader = trainer.datamodule.train_dataloader() if trainer.datamodule is not None else None
        batches = len(loader) if loader is not None else 1
        if trainer.overfit_batches:
            n = trainer.overfit_batches
            batches = int(n) if isinstance(n, int) or n >= 1 else max(1, int(n * batches))
        per_epoch = max(batches // trainer.accumulate_grad_batches, 1)
        total = trainer.max_steps if trainer.max_steps > 0 else per_epoch * max(trainer.max_epochs or 1, 1)
        return per_epoch, total

    def configure_optimizers(self) -> Any:
        optimizer = build_optimizer(self.model, self.optim_cfg)
        if self.sched_cfg.name == "none" and not self.sched_cfg.warmup_steps:
            return optimizer
        per_epoch, total = self._schedule_length()
        scheduler = build_scheduler(optimizer, self.sched_cfg, total, per_epoch, self.optim_cfg.lr)
        if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            sched = {"scheduler": scheduler, "interval": "epoch", "monitor": "val/loss"}
        else:
            sched = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": sched}


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict[str, Any]]:
    """Weight matrices get `weight_decay` (per layer with `layer_decay`); biases and norm
    parameters get none unless `decay_bias_and_norm` (decaying BN's scale only fights
    the normalisation it exists for)."""
    layers = depth_ordered_layers(model)
    layer_ids = {id(w) for _, w in layers}
    if isinstance(cfg.layer_decay, list):
        if len(cfg.layer_decay) != len(layers):
            raise UserError(
                f"optim.layer_decay: {len(cfg.layer_decay)} values for {len(layers)} layers "
                f"({', '.join(n for n, _ in layers)})"
            )
        decays = list(cfg.layer_decay)
    elif cfg.layer_decay is not None:  # a factor per depth: lambda_l = weight_decay * factor^l
        decays = [cfg.weight_decay * cfg.layer_decay**i for i in range(len(layers))]
    else:
        decays = [cfg.weight_decay] * len(layers)
    groups: list[dict[str, Any]] = []
    if cfg.layer_decay is None:
        groups.append({"params": [w for _, w in layers], "weight_decay": cfg.weight_decay, "names": "weights"})
    else:
        groups += [{"params": [w], "weight_decay": d, "names": n} for (n, w), d in zip(layers, decays, strict=True)]
    rest = [p for p in model.parameters() if id(p) not in layer_ids and p.requires_grad]
    if rest:
        rest_decay = cfg.weight_decay if cfg.decay_bias_and_norm else 0.0
        groups.append({"params": rest, "weight_decay": rest_decay, "names": "bias_and_norm"})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov and cfg.momentum > 0)
    if cfg.name in ("adam", "adamw"):
        if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
            raise UserError(f"optim.betas: need two values in [0, 1), got {cfg.betas}")
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return cls(groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, amsgrad=cfg.amsgrad)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps)
    return torch.optim.Adagrad(groups, lr=cfg.lr, eps=cfg.eps)


def build_scheduler(
    optimizer: torch.optim.Optimizer, cfg: SchedulerConfig, total_steps: int, steps_per_epoch: int, lr: float
) -> Any:
    """A per-step schedule (per-epoch for plateau), with optional linear warmup in front."""
    from torch.optim import lr_scheduler as S

    warmup = cfg.warmup_steps
    if cfg.name == "plateau":
        if warmup:
            raise UserError("scheduler.warmup_steps: not supported with scheduler.name=plateau")
        return S.ReduceLROnPlateau(optimizer, factor=cfg.gamma, patience=cfg.patience)
    if cfg.name == "onecycle":  # has its own warmup: warmup_steps sets its rising phase
        pct = warmup / total_steps if warmup else 0.3
        return S.OneCycleLR(optimizer, max_lr=lr, total_steps=max(total_steps, 2), pct_start=min(pct, 0.99))
    main: Any
    if cfg.name == "step":
        main = S.StepLR(optimizer, step_size=cfg.step_size * steps_per_epoch, gamma=cfg.gamma)
    elif cfg.name == "cosine":
        main = S.CosineAnnealingLR(optimizer, T_max=max(total_steps - warmup, 1), eta_min=cfg.min_lr)
    else:
        main = None
    if not warmup:
        return main
    ramp = S.LinearLR(optimizer, start_factor=1.0 / warmup, end_factor=1.0, total_iters=warmup)
    if main is None:
        return ramp
    return S.SequentialLR(optimizer, [ramp, main], milestones=[warmup])
