"""config -> data + model -> LightningModule -> Trainer -> run directory.

`train(cfg)` is the whole pipeline; the CLI only parses arguments and calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import math
import os
import signal
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import TensorBoardLogger

from deepnets.checkpoint import RNGState, SafeCheckpointIO, load_checkpoint
from deepnets.config import Config, to_yaml
from deepnets.data import InMemoryDataModule
from deepnets.errors import UserError
from deepnets.hparams import HParamsRecorder
from deepnets.models import build_model
from deepnets.module import Classifier, LossProgressBar
from deepnets.monitor import GradientFlowMonitor
from deepnets.rundir import next_dir
from deepnets.tb import use_fast_crc

RUN_DIR_ENV = "DEEPNETS_RUN_DIR"  # rank 0 hands its run directory to the DDP ranks it launches


@dataclass
class RunResult:
    run_dir: Path | None
    status: str  # completed | early_stopped | diverged | interrupted | failed
    metrics: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    signum: int | None = None  # the signal that interrupted the run
    model: torch.nn.Module | None = None  # the trained network (last weights), for use from Python

    @property
    def ok(self) -> bool:
        return self.status in ("completed", "early_stopped")


class Diverged(Exception):
    def __init__(self, step: int) -> None:
        super().__init__(f"loss became non-finite at step {step}")
        self.step = step


class Interrupted(Exception):
    def __init__(self, signum: int, step: int) -> None:
        super().__init__(f"{signal.Signals(signum).name} received; stopped after step {step}")
        self.signum = signum


# ---------------------------------------------------------------- run directory


def _is_rank_zero() -> bool:
    for var in ("RANK", "SLURM_PROCID", "LOCAL_RANK"):
        if var in os.environ:
            return int(os.environ[var]) == 0 and int(os.environ.get("NODE_RANK", "0")) == 0
    return True


def make_run_dir(output_dir: str | Path, name: str) -> Path:
    """Create `<output_dir>/<name>/version_<n>/` with the next free n (atomic: concurrent runs differ)."""
    return next_dir(Path(output_dir) / name, "version", "output_dir")


def find_last_checkpoint(output_dir: str | Path, name: str) -> Path:
    """The newest intact `last.ckpt` among `<output_dir>/<name>/version_*` (by modification time)."""
    root = Path(output_dir) / name
    candidates = sorted(root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime, reverse=True)
    for path in candidates:
        try:
            load_checkpoint(path)
            return path
        except UserError as e:
            warnings.warn(f"skipping {path}: {e}", stacklevel=2)
    raise UserError(f"--resume last: no intact checkpoint under {root}/version_*/checkpoints/")


# ---------------------------------------------------------------- callbacks


class DivergenceGuard(Callback):
    """Stops the run when the training loss becomes non-finite, before it is checkpointed.

    `isfinite` is accumulated on the device every step; reading it back is a
    host sync, so on an accelerator it is read only on logging steps and
    before checkpoints (on the CPU it costs nothing and is read every step).
    Runs before ModelCheckpoint (Lightning orders checkpoint callbacks last),
    so a diverged step is never saved.
    """

    def __init__(self, check_every_n_steps: int, checkpoint_every_n_steps: int | None) -> None:
        self.every = check_every_n_steps
        self.ckpt_every = checkpoint_every_n_steps
        self._finite: torch.Tensor | None = None
        self.read_every_step: bool | None = None  # None: decided from the device at train start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.read_every_step is None:
            self.read_every_step = pl_module.device.type == "cpu"

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, dict) else outputs
        step = trainer.global_step
        if self.read_every_step:  # a CPU scalar: reading it is ~1 us, cheaper than isfinite + and + bool
            if not math.isfinite(float(loss)):
                raise Diverged(step)
            return
        finite = torch.isfinite(loss.detach())
        self._finite = finite if self._finite is None else self._finite & finite
        due = (
            step % self.every == 0
            or (self.ckpt_every is not None and step % self.ckpt_every == 0)
            or batch_idx + 1 >= trainer.num_training_batches
        )
        if due and not bool(self._finite):
            raise Diverged(step)


class LastCheckpoint(Callback):
    """Keeps last.ckpt current: at the end of every epoch, every `every_n_steps` steps, and on a signal.

    (Lightning's `ModelCheckpoint(save_last=True)` copies only checkpoints it
    saves anyway, i.e. the best ones, so its last.ckpt can lag behind.) On
    SIGTERM / SIGINT the step in flight finishes, last.ckpt is saved, and the
    run stops with `Interrupted`: the handlers replace Lightning's SIGTERM
    notifier during training and turn Ctrl+C from a KeyboardInterrupt mid-step
    into the same clean stop.
    """

    def __init__(self, ckpt_dir: Path | None, every_n_steps: int | None) -> None:
        self.ckpt_dir = ckpt_dir
        self.every_n_steps = every_n_steps
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        self.signum = signum

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                self._previous[sig] = signal.signal(sig, self._handler)

    def _restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        periodic = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        if self.ckpt_dir is not None and (periodic or self.signum is not None):
            trainer.save_checkpoint(self.ckpt_dir / "last.ckpt")
        if self.signum is not None:
            raise Interrupted(self.signum, trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ckpt_dir is not None:  # after validation, so best-model and early-stopping state are current
            trainer.save_checkpoint(self.ckpt_dir / "last.ckpt")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()


class _CachedStateKey:
    """`state_key` computed once. Lightning formats `callback.state_key` into a profiler label on
    every hook dispatch (six per training step); ModelCheckpoint and EarlyStopping build theirs
    from a dict repr each time (~5 us), fixed once constructed. The key names Lightning's class,
    as before, so checkpoints stay interchangeable with plain ModelCheckpoint / EarlyStopping."""

    _lightning_class: type[Callback]

    @functools.cached_property
    def state_key(self) -> str:
        key: str = super().state_key  # type: ignore[misc]
        return self._lightning_class.__qualname__ + key.removeprefix(type(self).__qualname__)


class BestCheckpoint(_CachedStateKey, ModelCheckpoint):
    _lightning_class = ModelCheckpoint


class EarlyStop(_CachedStateKey, EarlyStopping):
    _lightning_class = EarlyStopping


# ---------------------------------------------------------------- the pipeline


def build_trainer(cfg: Config, run_dir: Path | None, callbacks: list[Callback]) -> L.Trainer:
    t = cfg.trainer
    logger: Any = False
    if run_dir is not None and cfg.logging.tensorboard:
        use_fast_crc()
        logger = TensorBoardLogger(
            save_dir=str(run_dir.parent.parent),
            name=run_dir.parent.name,
            version=run_dir.name,
            default_hp_metric=False,
            # The writer thread flushes to disk every 10 s (TensorBoard's default is 120 s):
            # live dashboards without a synchronous flush on the training thread.
            flush_secs=10,
        )
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=t.strategy,
        num_nodes=t.num_nodes,
        precision=t.lightning_precision,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        fast_dev_run=t.fast_dev_run,
        overfit_batches=t.overfit_batches,
        limit_val_batches=t.limit_val_batches,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        gradient_clip_val=cfg.optim.grad_clip_norm,
        gradient_clip_algorithm="norm",
        detect_anomaly=t.detect_anomaly,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=any(isinstance(c, ModelCheckpoint) for c in callbacks),
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir) if run_dir else None,
        plugins=[SafeCheckpointIO()],
        num_sanity_val_steps=0,
    )


def _callbacks(
    cfg: Config, run_dir: Path | None
) -> tuple[list[Callback], ModelCheckpoint | None, EarlyStopping | None]:
    ckpt_dir = run_dir / "checkpoints" if run_dir else None
    callbacks: list[Callback] = [
        RNGState(),
        DivergenceGuard(cfg.trainer.log_every_n_steps, cfg.checkpoint.every_n_steps),
        LastCheckpoint(ckpt_dir if cfg.checkpoint.enabled else None, cfg.checkpoint.every_n_steps),
    ]
    if cfg.trainer.progress_bar:  # shows the loss without Lightning's per-step prog_bar .item()
        callbacks.append(LossProgressBar())
    if cfg.logging.grad_norm_every_n_steps > 0:
        callbacks.append(GradientFlowMonitor(cfg.logging, run_dir))
    if run_dir is not None and cfg.logging.tensorboard:  # layout, hyperparameters and outcome for TensorBoard
        callbacks.append(HParamsRecorder(cfg))
    early = None
    if cfg.early_stopping.enabled:
        e = cfg.early_stopping
        early = EarlyStop(monitor=e.monitor, mode=e.mode, patience=e.patience, min_delta=e.min_delta)
        callbacks.append(early)
    if run_dir is not None and cfg.logging.tensorboard and cfg.scheduler.name != "none":
        callbacks.append(LearningRateMonitor(logging_interval="step"))
    ckpt = None
    if ckpt_dir is not None and cfg.checkpoint.enabled:
        c = cfg.checkpoint
        ckpt = BestCheckpoint(
            dirpath=ckpt_dir,
            filename="best-{epoch:03d}-{step:06d}",
            monitor=c.monitor,
            mode=c.mode,
            save_top_k=c.save_top_k,
            save_last=False,  # LastCheckpoint keeps last.ckpt
            auto_insert_metric_name=False,
        )
        callbacks.append(ckpt)
    return callbacks, ckpt, early


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        value = float(v.item() if isinstance(v, torch.Tensor) else v)
        out[k.removesuffix("_epoch")] = value if math.isfinite(value) else str(value)  # type: ignore[assignment]
    return out


def write_metrics(run_dir: Path, payload: dict[str, Any]) -> None:
    tmp = run_dir / ".metrics.json.tmp"
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, run_dir / "metrics.json")


# model keys that do not change the parameters, so a resumed run may change them
_FREE_ON_RESUME = {"checkpointing", "channels_last", "dropout", "init", "init_std", "init_gain"}


def resolve_resume(cfg: Config, resume: str | None) -> tuple[Path | None, Path | None]:
    """(checkpoint to resume from, run directory to continue in) for `--resume last|PATH`."""
    if resume is None:
        return None, None
    path = find_last_checkpoint(cfg.output_dir, cfg.name) if resume == "last" else Path(resume)
    ckpt = load_checkpoint(path)  # fail now, with the file named, not deep inside Lightning
    # Weights only fit the architecture they were trained with: say which key differs, not a state_dict dump.
    saved = (ckpt.get("hyper_parameters") or {}).get("model")
    if isinstance(saved, dict):
        current = cfg.to_dict()["model"]
        for key in current:
            if key in saved and saved[key] != current[key] and key not in _FREE_ON_RESUME:
                raise UserError(
                    f"--resume {path}: the checkpoint has model.{key}={saved[key]!r}, the config model.{key}="
                    f"{current[key]!r}; resume with the run's own config ({path.parent.parent / 'config.yaml'})"
                )
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else None
    if run_dir is not None and not (run_dir / "config.yaml").is_file():
        run_dir = None
    return path, run_dir


def tune_learning_rate(cfg: Config, model: torch.nn.Module, run_dir: Path | None) -> Config:
    """`trainer.lr_find` / `trainer.lr_probe`: pick optim.lr on copies of `model`, record it in config.yaml."""
    from deepnets import tune

    if cfg.trainer.lr_find and cfg.trainer.lr_probe:
        raise UserError("trainer.lr_find and trainer.lr_probe both set: choose one")
    lr = tune.lr_probe(cfg, model, run_dir)[0] if cfg.trainer.lr_probe else tune.lr_find(cfg, model, run_dir)
    cfg = dataclasses.replace(cfg, optim=dataclasses.replace(cfg.optim, lr=lr))
    if run_dir is not None:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
    return cfg


def resolve_threads(threads: int | str) -> int:
    """`trainer.threads` as a count. auto: 1 on a machine of at most 2 cores (small models on a shared
    2-core box stall on descheduled threads), else torch's default."""
    if threads != "auto":
        return int(threads)
    cores = os.cpu_count() or 1
    return 1 if cores <= 2 else torch.get_num_threads()


def apply_threads(threads: int | str) -> int:
    n = resolve_threads(threads)
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # settable only before the first inter-op parallel work
        torch.set_num_interop_threads(n)
    return n


def train(cfg: Config, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Fit, test the best checkpoint, and write the run directory; returns how the run ended.

    `callbacks` join the run's own (a sweep's pruner, for one).
    """
    start = time.perf_counter()
    apply_threads(cfg.trainer.threads)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    ckpt_path, run_dir = resolve_resume(cfg, resume)
    rank_zero = _is_rank_zero()
    if cfg.trainer.fast_dev_run:
        run_dir = None
    elif not rank_zero:  # a DDP rank launched by rank 0, which made the directory
        run_dir = Path(os.environ[RUN_DIR_ENV]) if RUN_DIR_ENV in os.environ else None
    elif run_dir is None:
        run_dir = make_run_dir(cfg.output_dir, cfg.name)
    if run_dir is not None and rank_zero:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        os.environ[RUN_DIR_ENV] = str(run_dir)  # inherited by the processes Lightning's DDP launcher starts

    data = InMemoryDataModule(cfg.data, cfg.seed)
    data.setup("fit")  # read files now: missing or corrupt data fails before a model is built
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    if cfg.trainer.compile:
        model.compile()  # in place: state_dict keys stay those of the plain model
    if (cfg.trainer.lr_find or cfg.trainer.lr_probe) and ckpt_path is None:  # a resumed optimizer keeps its lr
        cfg = tune_learning_rate(cfg, model, run_dir if rank_zero else None)
    module = Classifier(model, cfg)
    run_callbacks, ckpt, early = _callbacks(cfg, run_dir)
    trainer = build_trainer(cfg, run_dir, [*run_callbacks, *callbacks])

    result = RunResult(run_dir, "completed", model=model)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
        if early is not None and early.stopped_epoch > 0:
            result.status = "early_stopped"
    except Diverged as e:
        result.status, result.error = "diverged", str(e)
    except Interrupted as e:
        result.status, result.error, result.signum = "interrupted", str(e), e.signum
    except BaseException as e:  # a bug or an unexpected failure: still leave metrics.json behind
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
        raise
    finally:
        if rank_zero:
            os.environ.pop(RUN_DIR_ENV, None)
        result.metrics = _scalar_metrics(trainer.callback_metrics)
        best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
        if result.ok and cfg.trainer.test:
            use_best = best is not None and cfg.early_stopping.restore_best
            trainer.test(
                module, datamodule=data, ckpt_path=best if use_best else None, verbose=False, weights_only=True
            )
            tested = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
            result.metrics.update(_scalar_metrics(tested))
        if run_dir is not None and trainer.is_global_zero:
            write_metrics(
                run_dir,
                {
                    "status": result.status,
                    "error": result.error,
                    "metrics": result.metrics,
                    "epochs": trainer.current_epoch,
                    "steps": trainer.global_step,
                    "wall_seconds": round(time.perf_counter() - start, 3),
                    "best_checkpoint": best,
                    "resumed_from": str(ckpt_path) if ckpt_path else None,
                    "seed": cfg.seed,
                },
            )
    return result
