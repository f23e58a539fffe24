"""What keeps training as fast as a hand-written loop, checked structurally (nothing here is timed).

bench/overhead.py measures the speed; these tests pin down the reasons:
no host reads or `self.log` calls on non-logging steps, one gather per batch
in the loader, fused / foreach optimizers.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import pytest
import torch
from torchmetrics.classification import MulticlassAccuracy

import deepnets.module as module
import deepnets.run as run
from deepnets.config import LOGGED_METRICS, load_config
from deepnets.data import TensorBatches
from deepnets.models import build_model
from deepnets.module import LossProgressBar, RunningMean, TaskModule, build_optimizer, is_logging_step

LOG_EVERY = 5
# Tensor methods that read a value back to the host (a device sync on an accelerator).
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "numpy")


class QuietSteps(L.Callback):
    """Marks the training batches on which nothing is due: not a logging step, not a monitor step."""

    def __init__(self, monitor_every: int) -> None:
        self.monitor_every = monitor_every
        self.quiet = False
        self.quiet_steps = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        step = trainer.global_step  # before this batch's optimizer step
        first_or_last = step < 2 or batch_idx + 1 >= trainer.num_training_batches
        self.quiet = not (is_logging_step(trainer) or step % self.monitor_every == 0 or first_or_last)
        self.quiet_steps += self.quiet

    def _loud(self, *args: Any) -> None:
        self.quiet = False

    on_train_epoch_end = on_validation_start = on_train_end = _loud  # type: ignore[assignment]


@pytest.mark.parametrize("task", ["classification", "regression"])
def test_no_host_read_and_no_log_call_on_non_logging_steps(tmp_path, monkeypatch, task: str) -> None:
    """The whole pipeline (TensorBoard, progress bar, checkpoints, divergence guard, gradient monitor)
    reads nothing back from tensors and calls `self.log` only on logging steps; on an accelerator
    each read would be a host sync. The divergence guard reads every step on the CPU only (a CPU
    scalar is free): here it is told it is on an accelerator."""
    cfg = load_config(
        None,
        [
            f"output_dir={tmp_path}",
            "model.depth=2",
            "model.width=16",
            "data.name=synthetic",
            "data.input_shape=[8]",
            "data.num_samples=2000",
            "data.batch_size=32",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            "trainer.max_epochs=2",
            f"trainer.log_every_n_steps={LOG_EVERY}",
            "trainer.progress_bar=true",
            "trainer.test=false",
            f"logging.grad_norm_every_n_steps={3 * LOG_EVERY}",
            "checkpoint.every_n_steps=1000",
            f"task={task}",
        ],
    )
    spy = QuietSteps(monitor_every=3 * LOG_EVERY)
    reads: list[str] = []
    for name in READS:
        original = getattr(torch.Tensor, name)

        def counted(self: torch.Tensor, *args: Any, __name: str = name, __original: Any = original) -> Any:
            if spy.quiet:
                reads.append(__name)
            return __original(self, *args)

        monkeypatch.setattr(torch.Tensor, name, counted)
    log_calls: list[str] = []
    original_log = TaskModule.log

    def counted_log(self: TaskModule, name: str, *args: Any, **kwargs: Any) -> None:
        if spy.quiet:
            log_calls.append(name)
        original_log(self, name, *args, **kwargs)

    monkeypatch.setattr(TaskModule, "log", counted_log)
    original_callbacks = run._callbacks

    def patched(c: Any, run_dir: Any) -> Any:
        callbacks, ckpt, early = original_callbacks(c, run_dir)
        for cb in callbacks:
            if isinstance(cb, run.DivergenceGuard):
                cb.read_every_step = False  # as on an accelerator
        return [spy, *callbacks], ckpt, early

    monkeypatch.setattr(run, "_callbacks", patched)
    result = run.train(cfg)
    assert result.status == "completed"
    assert spy.quiet_steps > 20  # the check covered most steps
    assert reads == [], f"host reads on non-logging steps: {sorted(set(reads))}"
    assert log_calls == [], f"self.log on non-logging steps: {sorted(set(log_calls))}"
    for key in LOGGED_METRICS[task]:  # every metric still logged
        assert key in result.metrics


class Spy:
    """Stands in for the data tensor of a TensorBatches; records how it is indexed."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x, self.device, self.calls = x, x.device, []

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, idx: Any) -> torch.Tensor:
        self.calls.append(idx)
        return self.x[idx]

    def index_select(self, dim: int, idx: torch.Tensor) -> torch.Tensor:
        assert dim == 0
        self.calls.append(idx)
        return self.x.index_select(dim, idx)


def test_loader_gathers_each_batch_at_once() -> None:
    x, y = torch.randn(1000, 4), torch.arange(1000)
    sx, sy = Spy(x), Spy(y)
    loader = TensorBatches(sx, sy, 64, shuffle=True, seed=0)  # type: ignore[arg-type]
    batches = list(loader)
    assert len(batches) == len(loader) == 16
    for spy in (sx, sy):
        assert len(spy.calls) == len(loader)  # one gather per batch, never per sample
        assert all(isinstance(i, torch.Tensor) and i.dtype == torch.int64 and i.dim() == 1 for i in spy.calls)
    seen = torch.cat([b[1] for b in batches])
    assert torch.equal(seen.sort().values, y)  # every sample once


@pytest.mark.parametrize("name", ["sgd", "adam", "adamw", "adagrad", "rmsprop"])
def test_optimizer_uses_a_multi_tensor_implementation(name: str) -> None:
    model = build_model({"arch": "mlp", "depth": 2, "width": 8}, (4,), 3)
    opt = build_optimizer(model, load_config(None, [f"optim.name={name}"]).optim)
    if name == "rmsprop":  # torch has no fused RMSprop
        assert opt.defaults["foreach"] is True
    else:
        assert opt.defaults["fused"] is True


def test_running_mean_accuracy_equals_torchmetrics() -> None:
    g = torch.Generator().manual_seed(0)
    ours, ref = RunningMean(), MulticlassAccuracy(5, average="micro")
    for n in (7, 32, 3):
        logits, y = torch.randn(n, 5, generator=g), torch.randint(0, 5, (n,), generator=g)
        ours.update((logits.argmax(1) == y).sum(), n)
        ref.update(logits, y)
    assert torch.allclose(ours.compute(), ref.compute())
    ours.reset()
    assert ours.total == 0 and ours.weight == 0


def test_progress_bar_redraws_by_time_not_by_step(monkeypatch) -> None:
    """A redraw costs ~0.3 ms: at 1 ms per step the bar redraws every min_interval_s, not every step,
    and always on the last batch. `_should_update` is the Lightning hook this relies on."""
    from lightning.pytorch.callbacks import TQDMProgressBar

    assert callable(getattr(TQDMProgressBar, "_should_update", None))  # renamed upstream: fix LossProgressBar
    clock = [100.0]
    monkeypatch.setattr(module.time, "monotonic", lambda: clock[0])
    bar = LossProgressBar(min_interval_s=0.125)  # binary fractions: exact clock arithmetic
    drawn = []
    for n in range(1, 301):
        clock[0] += 1 / 1024  # ~1 ms per step
        if bar._should_update(n, 300):
            drawn.append(n)
    assert drawn == [1, 129, 257, 300]
    slow = LossProgressBar(min_interval_s=0.125)
    clock[0] += 10
    assert slow._should_update(1, 250) and slow._should_update(2, 250) is False
    clock[0] += 0.5  # a slow step: redrawn at once
    assert slow._should_update(3, 250)


def test_checkpoint_and_early_stopping_state_keys_are_computed_once() -> None:
    """Lightning formats `state_key` on every hook dispatch; ours are cached and equal to Lightning's,
    so checkpoints written with plain ModelCheckpoint / EarlyStopping still resume."""
    from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint

    for ours, theirs in (
        (run.BestCheckpoint(monitor="val/acc", mode="max"), ModelCheckpoint(monitor="val/acc", mode="max")),
        (run.EarlyStop(monitor="val/loss", patience=3), EarlyStopping(monitor="val/loss", patience=3)),
    ):
        assert ours.state_key == theirs.state_key
        assert "state_key" in vars(ours)  # served from the instance from now on
