"""The LightningModule: a task's loss and metrics (`TASKS`), optimizers (`OPTIMIZERS`) and schedulers around any
`nn.Module`."""

from __future__ import annotations

import math
import shutil
import sys
import time
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import TQDMProgressBar
from lightning.pytorch.callbacks.progress.tqdm_progress import Tqdm, convert_inf
from torch import Tensor, nn
from torchmetrics import MeanAbsoluteError, MeanSquaredError, Metric, R2Score

from deepnets.config import Config, OptimConfig, SchedulerConfig
from deepnets.errors import UserError
from deepnets.models import depth_ordered_layers
from deepnets.optimizers import OPTIMIZERS, optimizer_class
from deepnets.tasks import TASKS

__all__ = [
    "OPTIMIZERS",
    "TASKS",
    "Classifier",
    "TaskModule",
    "build_optimizer",
    "module_from_config",
    "target_stats",
]


def is_logging_step(trainer: L.Trainer) -> bool:
    """Whether Lightning writes step metrics to the loggers after the current training batch."""
    connector = getattr(trainer, "_logger_connector", None)
    if connector is None:  # not a Lightning 2.x Trainer: log every step
        return True
    return bool(connector.should_update_logs or trainer.fast_dev_run)


class RunningMean(Metric):
    """Weighted mean of per-batch sums: `update(sum, weight)`, synced across ranks like any Metric.

    `update` is deliberately not torchmetrics' wrapped update: that wrapper costs
    ~50-100 us per call on a CPU; this is two in-place adds on the device (no
    checks, no host sync), called once per training step.
    """

    full_state_update = False

    def __init__(self) -> None:
        super().__init__()
        self.add_state("total", torch.zeros(()), dist_reduce_fx="sum")  # float32: MPS has no float64
        self.add_state("weight", torch.zeros(()), dist_reduce_fx="sum")
        self.update = self._add  # type: ignore[method-assign]  # replaces the wrapper set by Metric.__init__

    def _add(self, total: Tensor, weight: Tensor | float) -> None:
        self.total.add_(total)
        self.weight.add_(weight)
        # What the wrapper would do, written only when it changes: each assignment on a
        # Metric (an nn.Module) goes through Module.__setattr__, ~2 us. compute() only
        # checks the count for zero, and its cached result is stale after an update.
        if not self._update_count:
            self._update_count = 1
        if self._computed is not None:
            self._computed = None

    def update(self, total: Tensor, weight: Tensor | float) -> None:  # type: ignore[override]
        self._add(total, weight)

    def compute(self) -> Tensor:
        return (self.total / self.weight).float()


BAR_COLUMNS = 80  # the widest a progress bar line gets (narrower terminals: their width)
MIN_BAR = 5  # columns kept for the bar itself; metrics that do not fit beside it are left out, whole


class _FittedBar(Tqdm):
    """Lightning's Tqdm whose metrics (`name value` pairs) are dropped from the end, whole, until the line
    fits `ncols` with a bar of at least MIN_BAR columns: tqdm itself would cut the line at `ncols`,
    mid-number."""

    @staticmethod
    def format_meter(n: float, total: float, elapsed: float, ncols: int | None = None, **kwargs: Any) -> str:
        postfix, bar_format = kwargs.pop("postfix", None), kwargs.get("bar_format")
        if ncols and postfix and bar_format:
            words = str(postfix).split(" ")
            nobar = {**kwargs, "bar_format": bar_format.replace("{bar}", "")}
            while words and len(Tqdm.format_meter(n, total, elapsed, postfix=" ".join(words), **nobar)) > (
                ncols - MIN_BAR
            ):
                del words[-2:]
            postfix = " ".join(words) or None
        return Tqdm.format_meter(n, total, elapsed, ncols=ncols, postfix=postfix, **kwargs)

    def set_postfix(self, ordered_dict: dict[str, Any] | None = None, refresh: bool = True, **kwargs: Any) -> None:
        """`loss 0.123 val_acc 0.944` rather than tqdm's `loss=0.123, val_acc=0.944`."""
        items = {**(ordered_dict or {}), **kwargs}
        self.set_postfix_str(" ".join(f"{k} {_num(v)}" for k, v in items.items()), refresh=refresh)


def _num(v: float) -> str:
    """Three decimals; small and large values in exponent form (a loss of 4e-4 is not 0.000)."""
    return f"{v:.3f}" if v == 0 or 0.01 <= abs(v) < 100 else f"{v:.1e}"


class LossProgressBar(TQDMProgressBar):
    """Lightning's TQDM bar in at most 80 columns, redrawn at most `min_interval_s` apart:

        epoch 3/12 |████     | 12/21 [00:01<00:00, loss 0.123 val_acc 0.944 val_loss 0.184]

    (val_loss, then val_acc, left out whole where they do not fit). No validation or test bars:
    in-memory evaluation takes a moment, and its metrics appear on the training bar.

    With `self.log(..., prog_bar=True)` Lightning converts every progress-bar
    value to a Python number after *every* batch (`.item()`, a host sync per
    step on an accelerator, even when the value is stale). Here the loss is
    read on logging steps only, the validation metrics once per validation,
    and the bar shows the last values read.

    A redraw (two tqdm writes plus Lightning's metric collection) costs
    ~0.3 ms; Lightning's count-based `refresh_rate` redraws a 1 ms/step model
    hundreds of times a second. A time-based gate (like tqdm's own `mininterval`)
    keeps the bar live for slow models and free for fast ones.
    """

    BAR_FORMAT = "{desc} |{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}{postfix}]"

    def __init__(self, min_interval_s: float = 0.1) -> None:
        super().__init__(refresh_rate=1)
        self.min_interval_s = min_interval_s
        self._loss: float | None = None
        self._val: dict[str, float] = {}
        self._last_draw = -math.inf

    def init_train_tqdm(self) -> Tqdm:
        columns = min(shutil.get_terminal_size((BAR_COLUMNS, 24)).columns, BAR_COLUMNS)
        return _FittedBar(
            desc="epoch",
            position=2 * self.process_position,
            disable=self.is_disabled,
            leave=True,
            ncols=columns,
            file=sys.stdout,
            smoothing=0,
            bar_format=self.BAR_FORMAT,
        )

    def init_validation_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def init_test_tqdm(self) -> Tqdm:
        return Tqdm(disable=True)

    def _should_update(self, current: int, total: int | float) -> bool:  # Lightning's per-batch redraw check
        if not self.is_enabled:
            return False
        now = time.monotonic()
        if current == total or now - self._last_draw >= self.min_interval_s:
            self._last_draw = now
            return True
        return False

    def on_train_epoch_start(self, trainer: L.Trainer, *_: Any) -> None:  # Lightning's, with our description
        bar = self.train_progress_bar
        bar.reset()
        bar.total = convert_inf(self.total_train_batches)
        bar.initial = 0
        epochs = trainer.max_epochs if trainer.max_epochs is not None and trainer.max_epochs > 0 else None
        epoch = trainer.current_epoch + 1  # 1-based: "epoch 12/12" is the last
        bar.set_description_str(f"epoch {epoch}/{epochs}" if epochs else f"epoch {epoch}")

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.is_enabled and is_logging_step(trainer):
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if isinstance(loss, Tensor):
                self._loss = float(loss)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.state.fn == "fit" and not trainer.sanity_checking:  # once per validation: a host read
            for key in ("val/acc", "val/loss"):  # in the order they give way when the line is full
                if isinstance(value := trainer.callback_metrics.get(key), Tensor):
                    self._val[key.replace("/", "_")] = float(value)
        super().on_validation_end(trainer, pl_module)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        if self._train_progress_bar is not None:  # end the bar's line: what follows is not glued onto it
            self.train_progress_bar.close()

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        """What the bar shows: the last logged training loss and the last validation's loss and accuracy
        (no `v_num`: the header names the run directory)."""
        items = {"loss": self._loss} if self._loss is not None else {}
        return {**items, **self._val}


class R2(R2Score):
    """torchmetrics' R2Score (its sums: sum y, sum y^2, residual sum of squares, count; exact over uneven
    batches and ranks), with its own compute: torchmetrics sets R2 to 1 where the residual sum is below an
    *absolute* 1e-4 and to 0 where the total sum is, which depends on the target's units. Here R2 =
    1 - RSS / TSS per output, the uniform average over outputs, NaN where it is undefined (fewer than two
    samples, a constant target)."""

    def compute(self) -> Tensor:
        n = self.total
        if int(n) < 2:
            return torch.tensor(float("nan"), dtype=self.residual.dtype, device=self.residual.device)
        tss = self.sum_squared_error - self.sum_error * self.sum_error / n  # (k,): sum (y - mean)^2
        return (1 - self.residual / tss).mean()


def target_stats(y_train: Tensor) -> tuple[Tensor, Tensor]:
    """Mean and std (k,) of regression targets (N,) or (N, k), per output, from the training split: what the
    network fits is (y - mean) / std. A constant output keeps std 1 (nothing to scale)."""
    y = y_train.reshape(len(y_train), -1).double()  # (N, k)
    if not bool(torch.isfinite(y).all()):
        raise UserError("data: the training targets hold NaN or inf values")
    if len(y) < 2:
        raise UserError(f"data: {len(y)} training target(s); standardising needs at least 2")
    mean, std = y.mean(0), y.std(0)
    std = torch.where(std > 0, std, torch.ones_like(std))
    return mean.float(), std.float()


TASK_BUFFERS = ("target_mean", "target_std")  # regression's buffers in a TaskModule's state_dict


def _metric_dtype(device: torch.device) -> torch.dtype:
    """float64 sums for the regression metrics (an R2 total sum of squares is a difference of large sums);
    MPS has no float64."""
    return torch.float32 if device.type == "mps" else torch.float64


class TaskModule(L.LightningModule):
    """`model` trained for a task (`deepnets.tasks.TASKS`), with the optimizer and schedule of `optim` / `scheduler`.

    classification: cross-entropy of the logits (N, C); logs `<split>/loss`, `<split>/acc`.
    regression: targets (N,) or (N, k) in their own units; the network fits z = (y - target_mean) /
    target_std (buffers: they travel in every checkpoint's state_dict); loss MSE or Huber (delta 1) on z.
    Every logged value is in the target's own units: `<split>/mse`, `/mae`, `/r2` (torchmetrics; R2 of
    k > 1 outputs is the uniform average over outputs) of the predictions y_hat = out * std + mean, and
    `<split>/loss` = the loss of the own-unit errors, i.e. std^2 x the fitted loss per output (for Huber:
    delta std in own units), the per-sample mean over the split.

    Logs `train/loss_step` (and `train/l1`) on logging steps, the epoch metrics once per epoch. Nothing
    here reads a value back to the host except on logging steps (every `log_every_n_steps`). Step
    scalars go to the loggers directly (`_log_step`); `self.log` runs only at epoch ends, where
    Lightning reduces and syncs the epoch Metric objects.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        task: str = "classification",
        optim: OptimConfig | None = None,
        scheduler: SchedulerConfig | None = None,
        loss: str = "auto",
        label_smoothing: float = 0.0,
        target_mean: Tensor | None = None,
        target_std: Tensor | None = None,
        channels_last: bool = False,
        hparams: dict[str, Any] | None = None,
    ) -> None:
        """`hparams`: what the checkpoints record as hyper_parameters (a run's resolved config, plain dicts:
        safe under weights_only loading; `--resume` compares its model section)."""
        super().__init__()
        if task not in TASKS:
            raise UserError(f"task: {task!r} is not a task (allowed: {', '.join(TASKS)})")
        self.model = model
        self.task = task
        self.optim_cfg = optim if optim is not None else OptimConfig()
        self.sched_cfg = scheduler if scheduler is not None else SchedulerConfig()
        self.loss_name = TASKS[task].losses[0] if loss == "auto" else loss
        if self.loss_name not in TASKS[task].losses:
            raise UserError(
                f"optim.loss: {loss} is not a loss for task {task} (allowed: auto, {', '.join(TASKS[task].losses)})"
            )
        self.label_smoothing = label_smoothing
        if hparams is not None:
            self.save_hyperparameters(hparams)
        self.channels_last = channels_last
        if self.channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        # Every reported loss and accuracy is a per-sample mean: sum over the samples / their count, each a
        # RunningMean (summed across ranks by Lightning at the epoch end). Not torchmetrics' MeanMetric: its
        # nan_strategy="disable" (needed to avoid a NaN check, i.e. a host sync, per batch) drops the batch
        # weights in torchmetrics 1.9 and returns the mean of batch means. Top-1 accuracy as
        # (argmax == y).sum() / n is micro accuracy (MulticlassAccuracy(average="micro")) at a fraction of its cost.
        self.train_loss, self.val_loss, self.test_loss = RunningMean(), RunningMean(), RunningMean()
        if task == "classification":
            self.train_acc, self.val_acc, self.test_acc = RunningMean(), RunningMean(), RunningMean()
        else:
            if target_mean is None or target_std is None:
                raise ValueError("task regression needs target_mean and target_std (deepnets.module.target_stats)")
            self.register_buffer("target_mean", target_mean.detach().float().reshape(-1).clone())  # (k,)
            self.register_buffer("target_std", target_std.detach().float().reshape(-1).clone())  # (k,)
            # torchmetrics' sums over the split (exact over uneven batches; synced across ranks). MSE and MAE
            # with num_outputs=1 flatten (N, k): the mean over all N k errors = the uniform average over outputs.
            self.regression_metrics = nn.ModuleDict(
                {
                    f"{split}_{name}": metric()
                    for split in ("train", "val", "test")
                    for name, metric in (("mse", MeanSquaredError), ("mae", MeanAbsoluteError), ("r2", R2))
                }
            )
            self._set_metric_dtype(torch.float64)

    def _set_metric_dtype(self, dtype: torch.dtype) -> None:
        self._mdtype = dtype
        for m in self.regression_metrics.values():
            m.set_dtype(dtype)

    def setup(self, stage: str) -> None:
        if self.task == "regression" and self._trainer is not None:
            dtype = _metric_dtype(self.trainer.strategy.root_device)
            if dtype != self._mdtype:
                self._set_metric_dtype(dtype)

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.dim() == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.model(x)

    @torch.no_grad()
    def predict_outputs(self, x: Tensor) -> Tensor:
        """Class probabilities (N, C), or regression outputs in the target's own units (N, k); eval mode."""
        was_training = self.training
        self.eval()
        try:
            out = self(x)
            if self.task == "classification":
                return out.float().softmax(dim=1)
            return out.float() * self.target_std + self.target_mean
        finally:
            self.train(was_training)

    def l1_penalty(self) -> Tensor:
        """optim.l1 * sum |W| over the depth-ordered weight matrices (biases and norms excluded)."""
        weights = [w for _, w in depth_ordered_layers(self.model)]
        return self.optim_cfg.l1 * torch.stack([w.abs().sum() for w in weights]).sum()

    def _regression_losses(self, out: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(fitted loss: the mean over z, per-sample own-unit loss (B,), own-unit predictions (B, k))."""
        n = y.shape[0]
        target = y.reshape(n, -1).to(out.dtype)  # (B, k), own units
        if out.shape != target.shape:
            raise UserError(
                f"model: outputs of shape {tuple(out.shape)} for regression targets of shape {tuple(target.shape)}"
            )
        z = (target - self.target_mean) / self.target_std  # (B, k), what the network fits
        if self.loss_name == "huber":
            per = F.huber_loss(out, z, reduction="none", delta=1.0)  # (B, k)
        else:
            per = F.mse_loss(out, z, reduction="none")  # (B, k)
        # Both losses scale exactly: loss(s a, s b; delta s) = s^2 loss(a, b; delta), so std^2 x per is the loss of
        # the own-unit errors (Huber with delta std per output).
        own = (per.detach() * self.target_std.square()).mean(1)  # (B,)
        pred = out.detach() * self.target_std + self.target_mean  # (B, k), own units
        return per.mean(), own, pred

    def _update_regression(self, split: str, pred: Tensor, y: Tensor) -> None:
        target = y.reshape(y.shape[0], -1).to(self._mdtype)  # (B, k)
        pred = pred.to(self._mdtype)
        for name in ("mse", "mae", "r2"):
            self.regression_metrics[f"{split}_{name}"].update(pred, target)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (B, ...), (B,) or (B, k)
        out = self(x)  # (B, C) logits or (B, k) outputs
        n = y.shape[0]  # not len(): Tensor.__len__ is Python-level
        if self.task == "classification":
            loss = F.cross_entropy(out, y, label_smoothing=self.label_smoothing)
            self.train_loss.update(loss.detach() * n, n)  # exact mean over uneven batches
            self.train_acc.update((out.detach().argmax(1) == y).sum(), n)
            shown = loss
        else:
            loss, own, pred = self._regression_losses(out, y)
            self.train_loss.update(own.sum(), n)
            self._update_regression("train", pred, y)
            shown = own.mean()
        log_now = self._trainer is not None and is_logging_step(self.trainer)
        step_scalars = {"train/loss_step": shown} if log_now else None
        if self.optim_cfg.l1 > 0:
            l1 = self.l1_penalty()
            if step_scalars is not None:
                step_scalars["train/l1"] = l1
            loss = loss + l1
        if step_scalars is not None:
            self._log_step(step_scalars)
        return loss

    def _log_step(self, scalars: dict[str, Tensor]) -> None:
        """Step scalars straight to the loggers: what Lightning writes for `self.log(on_step=True)`
        (same tags, same step, plus `epoch`), without `self.log`. Lightning 2.6's `self.log` costs
        ~0.5 ms of Python per call on a CPU (it re-walks its stored result with
        `apply_to_collection`, copying its metadata), more than a small model's whole step;
        the logger write itself is ~0.2 ms. Rank zero only, like Lightning's loggers."""
        trainer = self.trainer
        if not trainer.loggers or not trainer.is_global_zero:
            return
        values: dict[str, float] = {k: float(v.detach()) for k, v in scalars.items()}  # the logging step's host read
        values["epoch"] = trainer.current_epoch
        for logger in trainer.loggers:
            logger.log_metrics(values, step=trainer.global_step)

    def _epoch_metrics(self, split: str) -> dict[str, Metric]:
        """The Metric objects of `split` by logged name (loss first)."""
        metrics: dict[str, Metric] = {f"{split}/loss": getattr(self, f"{split}_loss")}
        if self.task == "classification":
            metrics[f"{split}/acc"] = getattr(self, f"{split}_acc")
        else:
            metrics |= {f"{split}/{m}": self.regression_metrics[f"{split}_{m}"] for m in ("mse", "mae", "r2")}
        return metrics

    def on_train_epoch_end(self) -> None:
        # Metric objects: Lightning computes (and syncs across ranks) and resets them at the epoch end.
        metrics = self._epoch_metrics("train")
        loss = metrics.pop("train/loss")
        self.log("train/loss_epoch", loss, on_step=False, on_epoch=True)
        self.log("train/loss", loss, on_step=False, on_epoch=True, logger=False)  # for monitors
        for name, metric in metrics.items():
            self.log(name, metric, on_step=False, on_epoch=True)

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        x, y = batch  # (B, ...), (B,) or (B, k)
        out = self(x)  # (B, C) or (B, k)
        n = y.shape[0]
        loss_metric = self.val_loss if stage == "val" else self.test_loss
        if self.task == "classification":
            loss_metric.update(F.cross_entropy(out, y, reduction="sum"), n)  # exact mean over uneven batches and ranks
            (self.val_acc if stage == "val" else self.test_acc).update((out.argmax(1) == y).sum(), n)
        else:
            _, own, pred = self._regression_losses(out, y)
            loss_metric.update(own.sum(), n)
            self._update_regression(stage, pred, y)

    def _log_eval(self, stage: str) -> None:
        """Once per evaluation epoch: logging the Metric objects every batch costs ~ms each (Lightning)."""
        for name, metric in self._epoch_metrics(stage).items():  # the bar reads val/loss (LossProgressBar)
            self.log(name, metric, on_step=False, on_epoch=True)

    @torch.no_grad()
    def evaluate(self, batches: Any, stage: str = "test") -> dict[str, float]:
        """`<stage>/<metric>` over `batches` of (x, y), in plain PyTorch (no Trainer): an export's `--evaluate`."""
        was_training = self.training
        self.eval()
        metrics = self._epoch_metrics(stage)
        for m in metrics.values():
            m.reset()
        try:
            for batch in batches:
                self._eval_step(batch, stage)
            return {name: float(m.compute()) for name, m in metrics.items()}
        finally:
            for m in metrics.values():
                m.reset()
            self.train(was_training)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def on_validation_epoch_end(self) -> None:
        self._log_eval("val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    def on_test_epoch_end(self) -> None:
        self._log_eval("test")

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


class Classifier(TaskModule):
    """The classification TaskModule configured from a whole Config (the previous constructor, kept for callers
    that have only a config, e.g. the LR tuners)."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        super().__init__(
            model,
            task="classification",
            optim=cfg.optim,
            scheduler=cfg.scheduler,
            loss=cfg.optim.loss,
            label_smoothing=cfg.optim.label_smoothing,
            channels_last=cfg.model.channels_last,
            hparams=cfg.to_dict(),
        )


def module_from_config(model: nn.Module, cfg: Config, y_train: Tensor | None = None) -> TaskModule:
    """The TaskModule of a run: the config's sections as explicit arguments; for regression the target
    statistics of `y_train` (mean 0, std 1 with data.standardize_target false: the network fits own units)."""
    mean = std = None
    if cfg.task == "regression":
        if y_train is None:
            raise ValueError("task regression: module_from_config needs the training targets")
        mean, std = target_stats(y_train)  # also refuses non-finite targets
        if not cfg.data.standardize_target:
            mean, std = torch.zeros_like(mean), torch.ones_like(std)
    return TaskModule(
        model,
        task=cfg.task,
        optim=cfg.optim,
        scheduler=cfg.scheduler,
        loss=cfg.optim.loss,
        label_smoothing=cfg.optim.label_smoothing,
        target_mean=mean,
        target_std=std,
        channels_last=cfg.model.channels_last,
        hparams=cfg.to_dict(),
    )


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


def _fast(cls: type[torch.optim.Optimizer], groups: list[dict[str, Any]], **kwargs: Any) -> torch.optim.Optimizer:
    """`cls(groups, fused=True, ...)` where torch has a fused kernel for these parameters, else `foreach=True`.

    torch picks the one-kernel-per-parameter-list paths by default only on CUDA; on
    the CPU its default is a Python loop over parameters. Fused SGD on a 2-core CPU:
    tiny MLP 0.34 -> 0.17 ms per step, ResNet-20 3.1 -> 1.2 ms (bench/overhead.py).
    """
    try:
        return cls(groups, fused=True, **kwargs)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this optimizer / device / dtype
        return cls(groups, foreach=True, **kwargs)


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """The built-in names (OPTIMIZERS) on their tuned paths; any other class as `cls(groups, lr=..., **kwargs)`.
    Either way the parameter groups carry the weight decay (param_groups) and `optim.kwargs` go to the class."""
    groups = param_groups(model, cfg)
    for g in groups:
        g.pop("names")
    extra = dict(cfg.kwargs)
    if cfg.name not in OPTIMIZERS:
        return optimizer_class(cfg.name)(groups, lr=cfg.lr, **extra)
    if cfg.name == "sgd":
        return _fast(
            torch.optim.SGD,
            groups,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            **extra,
        )
    if cfg.name in ("adam", "adamw"):
        if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
            raise UserError(f"optim.betas: need two values in [0, 1), got {cfg.betas}")
        cls = torch.optim.Adam if cfg.name == "adam" else torch.optim.AdamW
        return _fast(cls, groups, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, amsgrad=cfg.amsgrad, **extra)
    if cfg.name == "rmsprop":  # no fused kernel
        return torch.optim.RMSprop(groups, lr=cfg.lr, momentum=cfg.momentum, eps=cfg.eps, foreach=True, **extra)
    return _fast(torch.optim.Adagrad, groups, lr=cfg.lr, eps=cfg.eps, **extra)


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
