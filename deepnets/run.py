"""config -> data + model -> LightningModule -> Trainer -> run directory.

`train(cfg)` is the whole pipeline; the CLI only parses arguments and calls it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import math
import os
import signal
import time
import warnings
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import (
    Callback,
    Checkpoint,
    EarlyStopping,
    LearningRateMonitor,
    ModelCheckpoint,
)
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException

from deepnets import console
from deepnets.checkpoint import RNGState, SafeCheckpointIO, check_resumable, load_checkpoint
from deepnets.config import Config, check_runtime, to_yaml
from deepnets.data import InMemoryDataModule
from deepnets.errors import UserError
from deepnets.hparams import HParamsRecorder
from deepnets.memory import check_fits, meta_model_for
from deepnets.models import build_model
from deepnets.module import LossProgressBar, TaskModule, module_from_config
from deepnets.monitor import GradientFlowMonitor
from deepnets.rundir import FULL, RunLock, check_writable, next_dir, read_json, remove_stale_temps, write_json_atomic
from deepnets.tb import use_fast_crc

RUN_DIR_ENV = "DEEPNETS_RUN_DIR"  # rank 0 hands its run directory to the DDP ranks it launches
# DDP: how long a rank waits for the others, at the rendezvous (all ranks of all nodes joining) and in
# every collective, before it fails with torch's timeout error. torch's default is 30 min; a rank
# that died mid-run is noticed by gloo/NCCL at once, a node that never comes after this long.
DDP_TIMEOUT = datetime.timedelta(seconds=float(os.environ.get("DEEPNETS_DDP_TIMEOUT_S", "300")))


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
    def __init__(self, step: int, what: str = "loss") -> None:
        super().__init__(f"{what} became non-finite at step {step}")
        self.step = step


class Interrupted(BaseException):
    """SIGTERM / SIGINT stopped the run. A BaseException, as KeyboardInterrupt is: code that handles
    `Exception` (a file reader turning any failure into "corrupt") must not swallow it."""

    def __init__(self, signum: int, step: int | None = None) -> None:
        where = "before training started" if step is None else f"stopped after step {step}"
        super().__init__(f"{signal.Signals(signum).name} received; {where}")
        self.signum = signum


class StopSignals:
    """SIGTERM and SIGINT (Ctrl+C) for the whole of `train()`.

    Until the run directory is made, a signal stops at once (nothing has been written). From
    `defer()` on it is only recorded: the run stops at the next safe point (after the training step
    in flight, after a validation pass in flight, after the test batch in flight, or before fit),
    saves last.ckpt where training had started, writes metrics.json and exits with 128 + the signal.
    Lightning replaces the SIGTERM handler at the start of each fit/test; `install()` is called
    again from the first hook of each (LastCheckpoint).
    """

    def __init__(self) -> None:
        self.signum: int | None = None
        self.deferred = False
        self._previous: dict[int, Any] = {}

    def _handler(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        if not self.deferred:
            raise Interrupted(signum)

    def install(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
                previous = signal.signal(sig, self._handler)
                self._previous.setdefault(sig, previous)

    def defer(self) -> None:
        self.deferred = True

    def check(self, step: int | None) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum, step)

    def __enter__(self) -> StopSignals:
        self.install()
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


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


def _relative(path: str | Path | None, run_dir: Path) -> str | None:
    """`path` relative to the run directory, so a moved run directory keeps its records true."""
    return None if path is None else os.path.relpath(Path(path).absolute(), run_dir.absolute())


class RunRecord:
    """metrics.json of one run directory, across every segment (the first run and each resume).

    Written when the segment starts (status `running`), at every last.ckpt save, and when it ends,
    however it ends. Each write goes through a temp file and a rename. A resume appends a segment
    and keeps the run's totals: `wall_seconds` over all segments, the last value of each train/val
    metric, the best checkpoint. A previous segment still marked `running` ended without a word
    (SIGKILL, power loss): it becomes `killed`.
    """

    def __init__(self, run_dir: Path, cfg: Config, resumed_from: Path | None, start_step: int) -> None:
        self.run_dir, self.cfg = run_dir, cfg
        self.path = run_dir / "metrics.json"
        self.start = time.perf_counter()
        previous = read_json(self.path) or {}
        self.segments: list[dict[str, Any]] = [s for s in previous.get("segments", []) if isinstance(s, dict)]
        if self.segments and self.segments[-1].get("status") == "running":
            self.segments[-1]["status"] = "killed"
        self.previous_seconds = sum(float(s.get("wall_seconds") or 0) for s in self.segments)
        old = previous.get("metrics") if isinstance(previous.get("metrics"), dict) else {}
        self.previous_metrics = {k: v for k, v in old.items() if not k.startswith("test/")}
        self.segment: dict[str, Any] = {
            "start_step": start_step,
            "end_step": start_step,
            "wall_seconds": 0.0,
            "status": "running",
            "resumed_from": _relative(resumed_from, run_dir),
        }
        self.best: tuple[str | None, float | None] = (previous.get("best_checkpoint"), previous.get("best_score"))
        self.epochs, self.steps = previous.get("epochs", 0), previous.get("steps", start_step)

    def write(
        self,
        status: str,
        error: str | None = None,
        metrics: dict[str, Any] | None = None,
        trainer: L.Trainer | None = None,
        ckpt: ModelCheckpoint | None = None,
    ) -> None:
        seconds = round(time.perf_counter() - self.start, 3)
        if trainer is not None:
            self.epochs, self.steps = trainer.current_epoch, trainer.global_step
        if ckpt is not None and ckpt.best_model_path and Path(ckpt.best_model_path).is_file():
            score = ckpt.best_model_score
            self.best = (_relative(ckpt.best_model_path, self.run_dir), None if score is None else float(score))
        best_path = self.best[0]
        if best_path is not None and not (self.run_dir / best_path).is_file():
            self.best = (None, None)  # never name a checkpoint that is not there (a failed save, a removed file)
        self.segment |= {"end_step": self.steps, "wall_seconds": seconds, "status": status}
        merged = {**self.previous_metrics, **(metrics or {})}
        write_json_atomic(
            self.path,
            {
                "status": status,
                "error": error,
                "metrics": merged,
                "epochs": self.epochs,
                "steps": self.steps,
                "wall_seconds": round(self.previous_seconds + seconds, 3),
                "best_checkpoint": self.best[0],
                "best_score": self.best[1],
                "monitor": self.cfg.checkpoint.monitor if self.cfg.checkpoint.enabled else None,
                "resumed_from": self.segment["resumed_from"],
                "seed": self.cfg.seed,
                "segments": [*self.segments, self.segment],
            },
        )


@dataclass
class RunDir:
    """The run directory a run writes into, held under its lock by rank 0 (None: writes nothing)."""

    path: Path | None
    record: RunRecord | None = None
    lock: RunLock | None = None
    stop: StopSignals | None = None  # the run's signal handling, for its callbacks

    def close(self) -> None:
        if self.lock is not None:
            self.lock.release()


@contextlib.contextmanager
def open_run_dir(cfg: Config, resume: Resume, stop: StopSignals, threads: int | None = None) -> Iterator[RunDir]:
    """Make (or, resuming this run, take back) the run directory: lock it, clean it, record the config
    (with the thread count used beside `trainer.threads: auto`).

    Called once config, data and model are known to be good, so a failure before leaves nothing.
    """
    if cfg.trainer.fast_dev_run:
        yield RunDir(None, stop=stop)
        return
    if not _is_rank_zero():  # a DDP rank launched by rank 0, which made the directory and writes it
        yield RunDir(Path(os.environ[RUN_DIR_ENV]) if RUN_DIR_ENV in os.environ else None, stop=stop)
        return
    stop.defer()  # from here on a signal is recorded and stops the run where its records can be written
    path = resume.run_dir if resume.run_dir is not None else make_run_dir(cfg.output_dir, cfg.name)
    run = RunDir(path, lock=RunLock(path), stop=stop)
    assert run.lock is not None
    run.lock.acquire()
    try:
        remove_stale_temps(path)  # ours now: temp files in it belong to a dead process
        try:
            (path / "config.yaml").write_text(to_yaml(cfg, threads))
        except OSError as e:
            raise UserError(f"cannot write {path / 'config.yaml'}: {e.strerror or e}") from None
        run.record = RunRecord(path, cfg, resume.path, resume.step)
        run.record.write("running")
        os.environ[RUN_DIR_ENV] = str(path)  # inherited by the processes Lightning's DDP launcher starts
        try:
            yield run
        except BaseException as e:  # failed before _fit_and_test took the record over (the LR finder, a
            # callback's or the Trainer's constructor): metrics.json says so, not `running` (read as killed)
            if run.record.segment["status"] == "running":
                run.record.write("failed", str(e) if isinstance(e, UserError) else f"{type(e).__name__}: {e}")
            raise
    finally:
        os.environ.pop(RUN_DIR_ENV, None)
        run.close()


# ---------------------------------------------------------------- callbacks


def nonfinite_weights(module: torch.nn.Module) -> bool:
    """Whether any parameter or floating-point buffer (BatchNorm statistics) holds an inf or NaN.

    One fused max-abs over all tensors (get_total_norm with norm_type=inf uses torch's foreach
    kernels) and one host read: cheap enough before every checkpoint. The inf-norm of finite values
    never overflows, unlike the 2-norm.
    """
    tensors = [t.detach() for t in module.parameters()]
    tensors += [b for b in module.buffers() if b.is_floating_point()]
    if not tensors:
        return False
    return not bool(torch.isfinite(torch.nn.utils.get_total_norm(tensors, norm_type=math.inf)))


class DivergenceGuard(Callback):
    """Stops the run when the training loss or the weights become non-finite, before they are checkpointed.

    The loss of step N is computed before step N's update, so a finite loss says nothing about the
    weights a checkpoint would hold: the weights are checked themselves before every save
    (`check_weights`, called by LastCheckpoint and, through the hooks below, before Lightning's
    ModelCheckpoint, which Lightning orders last). `isfinite` of the loss is accumulated on the
    device every step; reading it back is a host sync, so on an accelerator it is read only on
    logging steps and before checkpoints (on the CPU it costs nothing and is read every step).
    """

    def __init__(self, check_every_n_steps: int, checkpoint_every_n_steps: int | None) -> None:
        self.every = check_every_n_steps
        self.ckpt_every = checkpoint_every_n_steps
        self._finite: torch.Tensor | None = None
        self.read_every_step: bool | None = None  # None: decided from the device at train start

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.read_every_step is None:
            self.read_every_step = pl_module.device.type == "cpu"

    @staticmethod
    def check_weights(trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if nonfinite_weights(pl_module):
            raise Diverged(trainer.global_step, "weights")

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

    # ModelCheckpoint saves the best at validation end (or at epoch end without validation)
    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self.check_weights(trainer, pl_module)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.check_weights(trainer, pl_module)


class LastCheckpoint(Checkpoint):
    """Keeps last.ckpt current: at the end of every epoch, every `every_n_steps` steps, and on a signal;
    and stops the run on SIGTERM / SIGINT (see StopSignals) at the next safe point.

    A `Checkpoint`, listed after BestCheckpoint: Lightning runs checkpoint and early-stopping callbacks
    last, in list order, and ModelCheckpoint / EarlyStopping act at train-epoch end (after validation),
    so the epoch-end last.ckpt holds their state of this epoch, not the previous one's.

    (Lightning's `ModelCheckpoint(save_last=True)` copies only checkpoints it saves anyway, i.e. the
    best ones, so its last.ckpt can lag behind.) Safe points: after the training step in flight
    (last.ckpt is saved, mid-epoch), at the end of the epoch when the signal came during its last step
    or its validation (validation finishes, so its numbers are whole; last.ckpt is the epoch-end
    one), after the test batch in flight. Every checkpoint written is either mid-epoch (not after the
    epoch's last step) or at epoch end: both resume bitwise (tests/test_faults.py). Under DDP the
    ranks agree (an all-reduce of the signal) so all of them stop at the same step.
    """

    def __init__(
        self,
        ckpt_dir: Path | None,
        every_n_steps: int | None,
        stop: StopSignals | None = None,
        on_save: Any = None,
    ) -> None:
        self.ckpt_dir = ckpt_dir
        self.every_n_steps = every_n_steps
        self.stop = stop if stop is not None else StopSignals()  # none given: signals are left alone
        self._handles_signals = stop is not None
        self.on_save = on_save  # called after each save (metrics.json keeps up with last.ckpt)

    def _signal(self, trainer: L.Trainer) -> int | None:
        signum = self.stop.signum
        if trainer.world_size > 1:  # every rank must stop at the same step, or the others hang in a collective
            flag = torch.tensor(signum or 0, device=trainer.strategy.root_device)
            signum = int(trainer.strategy.reduce(flag, reduce_op="max")) or None
            self.stop.signum = self.stop.signum or signum
        return signum

    def _save(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self.ckpt_dir is None:
            return
        DivergenceGuard.check_weights(trainer, pl_module)
        trainer.save_checkpoint(self.ckpt_dir / "last.ckpt", weights_only=False)
        if self.on_save is not None and trainer.is_global_zero:
            self.on_save(trainer)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handles_signals:
            self.stop.install()  # over Lightning's SIGTERM notifier, which would stop mid-validation
        if self._signal(trainer) is not None:  # came before the first step: nothing to save
            raise Interrupted(self.stop.signum or 0, trainer.global_step)

    def on_test_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._handles_signals:
            self.stop.install()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if batch_idx + 1 >= trainer.num_training_batches:
            return  # the epoch's last step: validation follows, then the epoch-end save (and stop)
        periodic = self.every_n_steps is not None and trainer.global_step % self.every_n_steps == 0
        signum = self._signal(trainer)
        if periodic or signum is not None:
            self._save(trainer, pl_module)
        if signum is not None:
            raise Interrupted(signum, trainer.global_step)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer, pl_module)  # after validation, so best-model and early-stopping state are current
        if (signum := self._signal(trainer)) is not None:
            raise Interrupted(signum, trainer.global_step)

    def on_test_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int, *_: Any
    ) -> None:
        if (signum := self._signal(trainer)) is not None:
            raise Interrupted(signum, trainer.global_step)


# Lightning's checkpoint layout: the train loader's state (TensorBatches.state_dict) under the fit loop.
# Lightning loads it back only when it considers itself restarting mid-epoch; ResumeLoaderState
# reads it from here in every case. tests/test_faults.py fails if Lightning moves it.
LOADER_STATE_PATH = ("loops", "fit_loop", "state_dict", "combined_loader")


def loader_states(checkpoint: dict[str, Any]) -> list[dict[str, Any]] | None:
    node: Any = checkpoint
    for key in LOADER_STATE_PATH:
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node if isinstance(node, list) else None


class ResumeLoaderState(Callback):
    """Puts the train loader back where the checkpoint left it, epoch-end checkpoints included.

    Lightning restores the loader state only when it restarts mid-epoch: resumed from an epoch-end
    checkpoint, the loader would start over at epoch 0 and replay that epoch's order. The state is
    applied at train start, before the loader hands out its first batch (TensorBatches picks its
    epoch and position at the first batch, not at `iter()`).
    """

    def __init__(self) -> None:
        self._states: list[dict[str, Any]] | None = None

    def on_load_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._states = loader_states(checkpoint)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        loader = trainer.train_dataloader
        if self._states and hasattr(loader, "load_state_dict"):
            loader.load_state_dict(self._states[0])
        self._states = None


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


class RunCheckpointIO(SafeCheckpointIO):
    """SafeCheckpointIO whose failed writes (a full disk, a file-size limit) are one UserError naming the file.

    torch's zip writer reports a failed write as a RuntimeError ("file write failed", or an
    "enforce fail at inline_container.cc" when the failure is at the end of the file); the atomic
    save has already removed its temp file, so the previous checkpoint stays intact.
    """

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        try:
            super().save_checkpoint(checkpoint, path, storage_options)
        except OSError as e:
            raise UserError(f"cannot write checkpoint {path}: {e.strerror or e}") from None
        except RuntimeError as e:
            if not any(m in str(e) for m in ("write", "inline_container", "PytorchStreamWriter")):
                raise  # not torch's zip writer failing on the file
            raise UserError(f"cannot write checkpoint {path}: {_disk_reason(Path(path))}") from None


def _disk_reason(path: Path) -> str:
    """Why a write under `path` failed, as the OS would say it, when torch's message does not."""
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY:
        return f"File too large (the file-size limit is {soft} bytes)"
    with contextlib.suppress(OSError):
        st = os.statvfs(path.parent)
        if st.f_bavail * st.f_frsize < 64 << 20:
            return os.strerror(28)  # No space left on device
    return "write failed"


@dataclass
class Resume:
    """What `--resume` continues from: the checkpoint, its step, and the run directory to continue in
    (None: start a new one)."""

    path: Path | None = None
    step: int = 0
    run_dir: Path | None = None


# ---------------------------------------------------------------- the pipeline


def _strategy(name: str) -> Any:
    """`trainer.strategy`, with DDP's rendezvous and collective timeout set (DDP_TIMEOUT)."""
    if name in ("ddp", "ddp_spawn"):
        from lightning.pytorch.strategies import DDPStrategy

        return DDPStrategy(start_method="popen" if name == "ddp" else "spawn", timeout=DDP_TIMEOUT)
    return name


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
    # The default 1.0 (all batches) goes as None: Lightning notes every explicit 1.0 (1, an int, is one batch).
    limit_val = None if isinstance(t.limit_val_batches, float) and t.limit_val_batches == 1.0 else t.limit_val_batches
    return L.Trainer(
        accelerator=t.accelerator,
        devices=t.devices,
        strategy=_strategy(t.strategy),
        num_nodes=t.num_nodes,
        precision=t.lightning_precision,
        max_epochs=t.max_epochs,
        max_steps=t.max_steps,
        deterministic=t.deterministic,
        log_every_n_steps=t.log_every_n_steps,
        fast_dev_run=t.fast_dev_run,
        overfit_batches=t.overfit_batches,
        limit_val_batches=limit_val,
        check_val_every_n_epoch=t.check_val_every_n_epoch,
        gradient_clip_val=cfg.optim.grad_clip_norm,
        gradient_clip_algorithm="norm",
        detect_anomaly=t.detect_anomaly,
        logger=logger,
        callbacks=callbacks,
        enable_checkpointing=True,  # LastCheckpoint is always there (a Checkpoint: no default one is added)
        enable_progress_bar=t.progress_bar,
        enable_model_summary=False,
        default_root_dir=str(run_dir) if run_dir else None,
        plugins=[RunCheckpointIO()],
        num_sanity_val_steps=0,
    )


def _callbacks(cfg: Config, run: RunDir) -> tuple[list[Callback], ModelCheckpoint | None, EarlyStopping | None]:
    run_dir = run.path
    ckpt_dir = run_dir / "checkpoints" if run_dir else None
    record = run.record
    callbacks: list[Callback] = [
        RNGState(),
        ResumeLoaderState(),
        DivergenceGuard(cfg.trainer.log_every_n_steps, cfg.checkpoint.every_n_steps),
    ]
    if cfg.trainer.progress_bar:  # shows the loss without Lightning's per-step prog_bar .item()
        callbacks.append(LossProgressBar())
    if cfg.logging.grad_norm_every_n_steps > 0:
        callbacks.append(GradientFlowMonitor.from_config(cfg.logging, run_dir))
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
    last = LastCheckpoint(  # after BestCheckpoint: see LastCheckpoint
        ckpt_dir if cfg.checkpoint.enabled else None,
        cfg.checkpoint.every_n_steps,
        run.stop,
        on_save=None if record is None else lambda trainer: record.write("running", trainer=trainer),
    )
    callbacks.append(last)
    return callbacks, ckpt, early


def _scalar_metrics(metrics: dict[str, Any]) -> dict[str, float]:
    out = {}
    for k, v in metrics.items():
        if k.startswith("lr-"):  # LearningRateMonitor's per-step lr: on TensorBoard, not a final metric
            continue
        value = float(v.item() if isinstance(v, torch.Tensor) else v)
        out[k.removesuffix("_epoch")] = value if math.isfinite(value) else str(value)  # type: ignore[assignment]
    return out


# model keys that do not change the parameters, so a resumed run may change them
_FREE_ON_RESUME = {"checkpointing", "channels_last", "dropout", "init", "init_std", "init_gain"}


def _own_run_dir(cfg: Config, path: Path) -> Path | None:
    """The run directory `path` belongs to if it is a run of this config: a checkpoint under
    `<output_dir>/<name>/version_<n>/checkpoints/` for the config's own output_dir and name."""
    ckpt_dir = path.absolute().parent
    run_dir = ckpt_dir.parent
    runs = (Path(cfg.output_dir) / cfg.name).absolute()
    if ckpt_dir.name != "checkpoints" or not run_dir.name.startswith("version_"):
        return None
    if os.path.realpath(run_dir.parent) != os.path.realpath(runs) or not (run_dir / "config.yaml").is_file():
        return None
    return run_dir


def resolve_resume(cfg: Config, resume: str | None) -> Resume:
    """What `--resume last|PATH` continues from, and where.

    A checkpoint of this run (`last`, or a PATH under `<output_dir>/<name>/version_<n>/checkpoints/`
    of the config being run) continues in its run directory; any other checkpoint (another name or
    output_dir, a loose file) starts a new run directory that records it as `resumed_from`, and the
    other run is left as it is.
    """
    if resume is None:
        return Resume()
    path = find_last_checkpoint(cfg.output_dir, cfg.name) if resume == "last" else Path(resume)
    ckpt = load_checkpoint(path)  # fail now, with the file named, not deep inside Lightning
    # Weights only fit the architecture they were trained with: say which key differs, not a state_dict dump.
    hparams = ckpt.get("hyper_parameters") or {}
    # what the weights were fitted to: the task, and (regression) the target scaling in the checkpoint's buffers
    saved_data = hparams.get("data") if isinstance(hparams.get("data"), dict) else {}
    for key, old, new in (
        ("task", hparams.get("task", "classification"), cfg.task),
        ("data.standardize_target", saved_data.get("standardize_target", True), cfg.data.standardize_target),
    ):
        if old != new and (key == "task" or cfg.task == "regression"):
            raise UserError(
                f"--resume {path}: the checkpoint has {key}={old!r}, the config {key}={new!r}; "
                f"resume with the run's own config ({path.parent.parent / 'config.yaml'})"
            )
    saved = hparams.get("model")
    if isinstance(saved, dict):
        current = cfg.to_dict()["model"]
        for key in current:
            if key in saved and saved[key] != current[key] and key not in _FREE_ON_RESUME:
                raise UserError(
                    f"--resume {path}: the checkpoint has model.{key}={saved[key]!r}, the config model.{key}="
                    f"{current[key]!r}; resume with the run's own config ({path.parent.parent / 'config.yaml'})"
                )
    check_resumable(ckpt, meta_model_for(cfg), path)  # shapes (other data?) and optimizer state, in one line
    step = ckpt.get("global_step", 0)
    return Resume(path, step if isinstance(step, int) else 0, _own_run_dir(cfg, path))


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


# torch's own default, read before any run sets it: one thread per physical core, or OMP_NUM_THREADS
_TORCH_THREADS = torch.get_num_threads()


def available_cores() -> int:
    """CPUs this process may use: its affinity mask (taskset, cpusets), capped by a cgroup v2 CPU quota
    (`docker --cpus`), which os.cpu_count() ignores."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    with contextlib.suppress(OSError, ValueError):
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()
        if quota != "max":
            cores = min(cores, max(1, int(quota) // int(period)))
    return cores


# `trainer.threads: auto`, measured on a shared 2-core VM (bench/threads.py; README "Threads"): a second
# intra-op thread pays only when (a) the model's ops are big enough to split and (b) a core is free for it.
# (a) The digits MLPs (7-26 MFLOP per forward of a batch) run no faster with 2 threads on an idle machine;
# the conv nets (98-156 MFLOP) run 1.1-1.35x faster. (b) Next to one CPU-bound process, 2 threads make
# every config 2.4-2.8x slower (each parallel region waits for the thread whose core is taken).
SMALL_FORWARD_FLOPS = 50e6  # forward FLOPs of one batch below which auto takes 1 thread, load or not
LOAD_SAMPLE_S = 0.15  # how long auto samples the machine's load (/proc/stat) at the start of a run
FREE_MARGIN = 0.2  # a core counts as free when at most this fraction of it was busy during the sample


def auto_threads(cores: int, busy: float | None, forward_flops: float | None, default: int) -> int:
    """The `auto` decision: 1 thread for a small model or a one-core machine; else one per free core
    (`cores - busy`, a core at most FREE_MARGIN busy counting as free), capped by torch's default (one
    per physical core) and the usable cores. `busy`: cores' worth of CPU time other processes used
    during the sample (None: not measurable here; then 1 on <= 2 cores, else the cap)."""
    cap = max(1, min(default, cores))
    if cores <= 1 or (forward_flops is not None and forward_flops < SMALL_FORWARD_FLOPS):
        return 1
    if busy is None:
        return 1 if cores <= 2 else cap
    return max(1, min(cap, math.floor(cores - busy + FREE_MARGIN)))


def _cpu_times(stat: str, cpus: set[int]) -> tuple[int, int]:
    """(busy, total) clock ticks of `cpus` in a /proc/stat text. Idle and iowait count as free; steal
    (the hypervisor running another guest) counts as busy: that time is not ours either."""
    busy = total = 0
    for line in stat.splitlines():
        name, *fields = line.split()
        if not (name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in cpus):
            continue
        ticks = [int(f) for f in fields[:8]]  # user nice system idle iowait irq softirq steal
        total += sum(ticks)
        busy += sum(ticks) - ticks[3] - ticks[4]
    return busy, total


def busy_cores(before: str, after: str, cpus: set[int]) -> float | None:
    """Cores' worth of CPU time used between two /proc/stat readings (0 .. len(cpus)); None: no ticks."""
    b0, t0 = _cpu_times(before, cpus)
    b1, t1 = _cpu_times(after, cpus)
    if t1 <= t0:
        return None
    return len(cpus) * (b1 - b0) / (t1 - t0)


def sample_busy(seconds: float = LOAD_SAMPLE_S) -> float | None:
    """The load on this process's CPUs over `seconds` (this process sleeps meanwhile, so all of it is
    other processes'), or None where /proc/stat is unreadable (not Linux)."""
    try:
        cpus = os.sched_getaffinity(0)
        stat = Path("/proc/stat")
        before = stat.read_text()
        time.sleep(seconds)
        return busy_cores(before, stat.read_text(), cpus)
    except (OSError, AttributeError, ValueError):
        return None


def _count_forward_flops(model_cfg: dict[str, Any], shape: tuple[int, ...], classes: int, batch: int) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    from deepnets.memory import meta_model

    model = meta_model(model_cfg, shape, classes).train()
    with torch.random.fork_rng(devices=[]), FlopCounterMode(display=False) as counter:
        model(torch.empty(batch, *shape, device="meta"))
    return counter.get_total_flops()


def forward_flops(cfg: Config) -> float | None:
    """FLOPs of one training batch's forward pass, counted by torch's FlopCounterMode on the meta device
    (no memory, no data read), or None where it cannot be counted (an op without a meta kernel, say).
    A meta forward costs Python time per layer (~0.3 ms), so a model deeper than 8 layers is counted at
    depths 1, 2, 3 and extrapolated (Newton's forward differences: exact up to degree 2 in depth, which
    every zoo model is, as in memory.estimate)."""
    from deepnets.memory import input_spec

    try:
        model_cfg = cfg.to_dict()["model"]
        shape, classes = input_spec(cfg)
        batch, depth = cfg.data.batch_size, model_cfg.get("depth")
        if isinstance(depth, int) and depth > 8 and not isinstance(model_cfg.get("width"), list):
            f = [_count_forward_flops({**model_cfg, "depth": d}, shape, classes, batch) for d in (1, 2, 3)]
            k = depth - 1
            return float(max(0, f[0] + k * (f[1] - f[0]) + k * (k - 1) // 2 * (f[2] - 2 * f[1] + f[0])))
        return float(_count_forward_flops(model_cfg, shape, classes, batch))
    except Exception:  # a decision input, never a reason to fail the run
        return None


def resolve_threads(
    threads: int | str, cfg: Config | None = None, count_flops: Callable[[], float | None] | None = None
) -> int:
    """`trainer.threads` as a count. auto: OMP_NUM_THREADS where the environment sets it; else
    `auto_threads` from the usable cores, the model's forward FLOPs (of `cfg`, or what `count_flops`
    returns, e.g. a stacked run's members together; unknown without either) and the load sampled now
    (only where the model is big enough for it to matter). So auto can pick differently from one run to
    the next; a fixed `trainer.threads: N` is the reproducible choice."""
    if threads != "auto":
        return int(threads)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit() and int(os.environ["OMP_NUM_THREADS"]) > 0:
        return int(os.environ["OMP_NUM_THREADS"])
    cores = available_cores()
    if count_flops is None and cfg is not None:
        count_flops = functools.partial(forward_flops, cfg)
    flops = count_flops() if count_flops is not None and cores > 1 else None
    small = cores <= 1 or (flops is not None and flops < SMALL_FORWARD_FLOPS)
    busy = None if small else sample_busy()
    return auto_threads(cores, busy, flops, _TORCH_THREADS)


def apply_threads(threads: int | str, cfg: Config | None = None) -> int:
    """Set torch's intra-op and inter-op thread counts; returns the count."""
    n = resolve_threads(threads, cfg)
    torch.set_num_threads(n)
    with contextlib.suppress(RuntimeError):  # settable once, before the first inter-op parallel work
        torch.set_num_interop_threads(n)
    return n


def _header(
    cfg: Config,
    run_dir: Path | None,
    data: InMemoryDataModule,
    model: torch.nn.Module,
    trainer: L.Trainer,
    threads: int,
    resumed_from: Path | None,
) -> str:
    assert data.splits is not None
    sizes = (len(data.splits.y_train), len(data.splits.y_val), len(data.splits.y_test))
    params = sum(p.numel() for p in model.parameters())
    name = cfg.model.preset or cfg.model.arch
    device, precision = console.device_name(trainer), str(trainer.precision)
    return console.header(run_dir, name, params, cfg.data.name, sizes, device, precision, threads, resumed_from)


def train(cfg: Config, resume: str | None = None, callbacks: Sequence[Callback] = ()) -> RunResult:
    """Fit, test the best checkpoint, and write the run directory; returns how the run ended.

    `callbacks` join the run's own (a sweep's pruner, for one). Nothing is written until the
    config, data and model are known to be good; metrics.json is written however the run ends.
    """
    check_runtime(cfg)  # devices, strategy and precision this machine can run: one error line, nothing written
    threads = apply_threads(cfg.trainer.threads, cfg)
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    check_fits(cfg)  # a model that cannot fit fails now, from a meta-device estimate
    with StopSignals() as stop:
        try:
            origin = resolve_resume(cfg, resume)
            if not cfg.trainer.fast_dev_run and origin.run_dir is None:
                check_writable(cfg.output_dir)  # fail before reading data; the directory comes later
            data = InMemoryDataModule(cfg.data, cfg.seed, task=cfg.task)
            data.setup("fit")  # read files now: missing or corrupt data fails before a model is built
            model = build_model(cfg.model, data.input_shape, data.num_outputs)
            if cfg.trainer.compile:
                model.compile()  # in place: state_dict keys stay those of the plain model
        except Interrupted as e:  # nothing was written yet
            return RunResult(None, "interrupted", error=str(e), signum=e.signum)
        with open_run_dir(cfg, origin, stop, threads) as run:
            tune = cfg.trainer.lr_find or cfg.trainer.lr_probe
            try:
                if tune and origin.path is None:  # a resumed optimizer keeps its lr
                    cfg = tune_learning_rate(cfg, model, run.path if _is_rank_zero() else None)
            except SIGTERMException:  # the LR finder's Trainer got the signal first
                pass
            if stop.signum is not None:  # while the directory was made, or while tuning
                result = RunResult(run.path, "interrupted", error=str(Interrupted(stop.signum)), signum=stop.signum)
                if run.record is not None:
                    run.record.write(result.status, result.error)
                return result
            # hparams.yaml and the checkpoints record the thread count used (it changes results);
            # config.yaml keeps `auto`, with the count as a comment
            used = dataclasses.replace(cfg, trainer=dataclasses.replace(cfg.trainer, threads=threads))
            assert data.splits is not None
            module = module_from_config(model, used, data.splits.y_train)  # regression: the target statistics
            run_callbacks, ckpt, early = _callbacks(cfg, run)
            trainer = build_trainer(cfg, run.path, [*run_callbacks, *callbacks])
            if _is_rank_zero() and cfg.trainer.progress_bar:
                print(_header(cfg, run.path, data, model, trainer, threads, origin.path))
            return _fit_and_test(cfg, run, trainer, module, data, origin.path, ckpt, early, stop)


def _fit_and_test(
    cfg: Config,
    run: RunDir,
    trainer: L.Trainer,
    module: TaskModule,
    data: InMemoryDataModule,
    ckpt_path: Path | None,
    ckpt: ModelCheckpoint | None,
    early: EarlyStopping | None,
    stop: StopSignals,
) -> RunResult:
    result = RunResult(run.path, "completed", model=module.model)
    try:
        try:
            trainer.fit(module, datamodule=data, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
            if early is not None and early.stopped_epoch > 0:
                result.status = "early_stopped"
            result.metrics = _scalar_metrics(trainer.callback_metrics)
            stop.check(trainer.global_step)  # arrived after the last check in fit
            best = ckpt.best_model_path if ckpt is not None and ckpt.best_model_path else None
            if result.ok and cfg.trainer.test:
                use_best = best is not None and cfg.early_stopping.restore_best
                trainer.test(
                    module, datamodule=data, ckpt_path=best if use_best else None, verbose=False, weights_only=True
                )
                tested = {k: v for k, v in trainer.callback_metrics.items() if k.startswith("test/")}
                result.metrics.update(_scalar_metrics(tested))
                stop.check(trainer.global_step)
        except Diverged as e:
            result.status, result.error = "diverged", str(e)
        except (Interrupted, SIGTERMException) as e:  # SIGTERMException: Lightning's notifier got it first
            signum = getattr(e, "signum", None) or stop.signum or signal.SIGTERM
            result.status, result.signum = "interrupted", signum
            result.error = str(Interrupted(signum, trainer.global_step))
        if not result.metrics:
            result.metrics = _scalar_metrics(
                {k: v for k, v in trainer.callback_metrics.items() if not k.startswith("test/")}
            )
    except UserError as e:  # a full disk, a bad file found mid-run: one line from the CLI, the record kept
        result.status, result.error = "failed", str(e)
        raise
    except MisconfigurationException as e:  # Lightning refusing the config, e.g. a resume past max_epochs
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        result.status, result.error = "failed", first
        raise UserError(f"--resume {ckpt_path}: {first}" if ckpt_path else first) from None
    except OSError as e:
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
        if e.errno in FULL:  # a write of Lightning's or a callback's, not through our checkpoint I/O
            result.error = f"cannot write {e.filename or f'into {run.path}'}: {e.strerror}"
            raise UserError(result.error) from None
        raise
    except BaseException as e:  # a bug or an unexpected failure: still leave metrics.json behind
        result.status, result.error = "failed", f"{type(e).__name__}: {e}"
        if (why := _ddp_failure(e, cfg)) is not None:  # not a bug here: say what happened, no traceback
            result.error = why
            return result
        raise
    finally:
        if run.record is not None and trainer.is_global_zero:
            run.record.write(result.status, result.error, result.metrics, trainer, ckpt)
    return result


def _ddp_failure(e: BaseException, cfg: Config) -> str | None:
    """One line for a DDP rendezvous that timed out or a peer rank that died (gloo / NCCL), else None."""
    t = cfg.trainer
    if t.strategy not in ("ddp", "ddp_spawn") and t.num_nodes == 1:
        return None
    first = (str(e).strip().splitlines() or [type(e).__name__])[0].split(". This is typically")[0]
    seconds = int(DDP_TIMEOUT.total_seconds())
    if isinstance(e, torch.distributed.DistStoreError) or "waiting for clients" in first:
        return (
            f"DDP rendezvous failed within {seconds} s ({first}); trainer.num_nodes={t.num_nodes}: start the "
            "same command on every node (torchrun or SLURM, see README), or set trainer.num_nodes=1"
        )
    peer = ("Connection reset", "Connection closed", "Broken pipe", "gloo", "NCCL", "timed out", "Timed out")
    if isinstance(e, (torch.distributed.DistError, RuntimeError)) and any(m in first for m in peer):
        return f"DDP: another rank failed, was killed or stopped answering within {seconds} s ({first})"
    return None
