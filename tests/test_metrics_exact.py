"""Every metric a run reports is the exact per-sample value, checked against the model applied by hand.

The splits are sized so that the last batch of every loader is smaller than the others (train 360 = 11 x 32
+ 8, val 40 = 24 + 16, test 100 = 4 x 24 + 4): a mean of batch means differs from the per-sample mean there.
The hand computation is plain torch with float64 sums over the whole split, from snapshots of the weights
each evaluation saw; the logged numbers must match it in callback_metrics, metrics.json and TensorBoard.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
from torch import Tensor, nn

from deepnets.config import Config, load_config
from deepnets.data import load_splits
from deepnets.export import evaluate, export_run, load_exported
from deepnets.handeval import by_hand
from deepnets.models import build_model
from deepnets.run import train

EPOCHS = 3
TOL = {"rel": 2e-6, "abs": 1e-6}  # float32 accumulation of ~100 terms


def config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(
        None,
        [
            "name=exact",
            f"output_dir={tmp_path / 'runs'}",
            "model.arch=mlp",  # no BatchNorm, no dropout: a training-mode forward equals the eval forward
            "model.depth=2",
            "model.width=16",
            "data.name=synthetic",
            "data.input_shape=[6]",
            "data.num_classes=4",
            "data.num_samples=500",  # test 100, val 40, train 360
            "data.batch_size=32",
            "data.eval_batch_size=24",
            "optim.name=sgd",
            "optim.lr=0.05",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            f"trainer.max_epochs={EPOCHS}",
            "trainer.log_every_n_steps=1",
            "trainer.progress_bar=false",
            "logging.grad_norm_every_n_steps=0",
            *overrides,
        ],
    )


class Record(L.Callback):
    """The weights each evaluation saw, the per-step losses, and the training epochs computed by hand."""

    def __init__(self) -> None:
        self.val_states: list[dict[str, Tensor]] = []
        self.test_states: list[dict[str, Tensor]] = []
        self.steps: list[list[tuple[float, int]]] = []  # per epoch: (step loss, batch size)
        self.train_sums: list[list[float]] = []  # per epoch: [loss sum, correct, n] by hand, float64

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.steps.append([])
        self.train_sums.append([0.0, 0.0, 0.0])

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        x, y = batch  # the weights the coming step's forward uses
        with torch.no_grad():
            logits = pl_module.model(x)
        sums = self.train_sums[-1]
        sums[0] += float(F.cross_entropy(logits, y, reduction="none").double().sum())
        sums[1] += float((logits.argmax(1) == y).sum())
        sums[2] += len(y)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.steps[-1].append((float(outputs["loss"]), len(batch[1])))

    def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.val_states.append(copy.deepcopy(pl_module.model.state_dict()))

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.test_states.append(copy.deepcopy(pl_module.model.state_dict()))


def scalars(run_dir: Path) -> dict[str, list[float]]:
    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: [e.value for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("exact")
    cfg = config(tmp_path)
    record = Record()
    result = train(cfg, callbacks=[record])
    assert result.status == "completed", result.error
    splits = load_splits(cfg.data, cfg.seed)
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (360, 40, 100)

    def model_with(state: dict[str, Tensor]) -> nn.Module:
        model = build_model(cfg.model, tuple(splits.x_train.shape[1:]), cfg.data.num_classes)
        model.load_state_dict(state)
        return model.eval()

    val = [by_hand(model_with(s), splits.x_val, splits.y_val) for s in record.val_states]
    (test_state,) = record.test_states
    test = by_hand(model_with(test_state), splits.x_test, splits.y_test)
    return {"cfg": cfg, "result": result, "record": record, "val": val, "test": test, "splits": splits}


def test_uneven_batches_make_a_difference(run: dict[str, Any]) -> None:
    """The check can fail: the mean of the test split's batch means is not the per-sample mean."""
    s = run["splits"]
    model = build_model(run["cfg"].model, (6,), 4)
    model.load_state_dict(run["record"].test_states[0])
    with torch.no_grad():
        batches = zip(s.x_test.split(24), s.y_test.split(24), strict=True)
        means = [F.cross_entropy(model(x), y).item() for x, y in batches]
    assert abs(sum(means) / len(means) - run["test"][0]) > 1e-4


def test_final_metrics_equal_the_model_applied_by_hand(run: dict[str, Any]) -> None:
    result = run["result"]
    (val_loss, val_acc), (test_loss, test_acc) = run["val"][-1], run["test"]
    on_disk = json.loads((result.run_dir / "metrics.json").read_text())["metrics"]
    for metrics in (result.metrics, on_disk):  # callback_metrics via train(), and metrics.json
        assert metrics["val/loss"] == pytest.approx(val_loss, **TOL)
        assert metrics["val/acc"] == pytest.approx(val_acc, **TOL)
        assert metrics["test/loss"] == pytest.approx(test_loss, **TOL)
        assert metrics["test/acc"] == pytest.approx(test_acc, **TOL)
        loss_sum, correct, n = run["record"].train_sums[-1]
        assert metrics["train/loss"] == pytest.approx(loss_sum / n, **TOL)
        assert metrics["train/acc"] == pytest.approx(correct / n, **TOL)


def test_tensorboard_scalars_per_epoch_equal_the_model_applied_by_hand(run: dict[str, Any]) -> None:
    tb = scalars(run["result"].run_dir)
    record = run["record"]
    assert len(run["val"]) == len(tb["val/loss"]) == EPOCHS
    for (loss, acc), logged_loss, logged_acc in zip(run["val"], tb["val/loss"], tb["val/acc"], strict=True):
        assert logged_loss == pytest.approx(loss, **TOL)
        assert logged_acc == pytest.approx(acc, **TOL)
    assert tb["test/loss"] == [pytest.approx(run["test"][0], **TOL)]
    assert tb["test/acc"] == [pytest.approx(run["test"][1], **TOL)]
    assert len(tb["train/loss_epoch"]) == len(tb["train/acc"]) == EPOCHS
    for (loss_sum, correct, n), loss, acc, steps in zip(
        record.train_sums, tb["train/loss_epoch"], tb["train/acc"], record.steps, strict=True
    ):
        assert n == 360 and sorted({b for _, b in steps}) == [8, 32]
        assert loss == pytest.approx(loss_sum / n, **TOL)
        assert acc == pytest.approx(correct / n, **TOL)
        # and the sample-weighted mean of the losses the training steps returned
        assert loss == pytest.approx(sum(v * b for v, b in steps) / sum(b for _, b in steps), **TOL)


def test_evaluate_of_an_export_equals_the_test_metrics(run: dict[str, Any]) -> None:
    result = run["result"]
    export = export_run(result.run_dir)
    model, _ = load_exported(export)
    tested = run["record"].test_states[0]
    assert all(torch.equal(model.state_dict()[k], v) for k, v in tested.items())  # the weights test saw
    evaluated = evaluate(export)
    assert evaluated["test/loss"] == pytest.approx(run["test"][0], **TOL)
    assert evaluated["test/acc"] == pytest.approx(run["test"][1], **TOL)
    assert evaluated["test/loss"] == pytest.approx(result.metrics["test/loss"], **TOL)
    assert evaluated["test/acc"] == pytest.approx(result.metrics["test/acc"], **TOL)


# ---------------------------------------------------------------- regression (task: regression)
#
# The same splits (train 360 = 11 x 32 + 8, val 40 = 24 + 16, test 100 = 4 x 24 + 4) of the synthetic teacher
# regression, whose targets have mean ~100: the network fits standardised targets, and every number it
# reports must be in the target's own units. By hand: the training targets' mean/std, the model's outputs
# mapped back to own units, and MSE / MAE / R2 / loss as float64 sums over the whole split.


def regression_by_hand(model: nn.Module, x: Tensor, y: Tensor, mean: Tensor, std: Tensor) -> dict[str, float]:
    """{loss, mse, mae, r2} in own units; R2 = 1 - RSS / TSS per output, averaged over outputs (uniform)."""
    with torch.no_grad():
        pred = model(x).double() * std.double() + mean.double()  # (N, k), own units
    target = y.reshape(len(y), -1).double()  # (N, k)
    err = pred - target
    rss = (err**2).sum(0)
    tss = ((target - target.mean(0)) ** 2).sum(0)
    mse = float((err**2).mean())
    return {"loss": mse, "mse": mse, "mae": float(err.abs().mean()), "r2": float((1 - rss / tss).mean())}


class RegressionRecord(Record):
    """Record, with the training epochs' own-unit sums by hand: [sum err^2, sum |err|, n] and the targets."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.steps.append([])
        self.train_sums.append([])  # per epoch: (pred, target) pairs, float64

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        x, y = batch
        with torch.no_grad():
            pred = pl_module.model(x).double() * pl_module.target_std.double() + pl_module.target_mean.double()
        self.train_sums[-1].append((pred, y.reshape(len(y), -1).double()))


@pytest.fixture(scope="module")
def regression_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    tmp_path = tmp_path_factory.mktemp("exact_regression")
    cfg = config(tmp_path, "task=regression", "optim.lr=0.02")
    record = RegressionRecord()
    result = train(cfg, callbacks=[record])
    assert result.status == "completed", result.error
    splits = load_splits(cfg.data, cfg.seed, "regression")
    assert (len(splits.y_train), len(splits.y_val), len(splits.y_test)) == (360, 40, 100)
    assert splits.y_train.dtype == torch.float32 and splits.y_train.dim() == 1
    y = splits.y_train.double()
    mean, std = y.mean().reshape(1), y.std().reshape(1)  # what the network fits: (y - mean) / std
    assert float(mean) > 50  # far from 0: a metric in standardised units would be off by orders of magnitude

    def model_with(state: dict[str, Tensor]) -> nn.Module:
        model = build_model(cfg.model, (6,), 1)
        model.load_state_dict(state)
        return model.eval()

    val = [regression_by_hand(model_with(s), splits.x_val, splits.y_val, mean, std) for s in record.val_states]
    (test_state,) = record.test_states
    test = regression_by_hand(model_with(test_state), splits.x_test, splits.y_test, mean, std)
    return {"cfg": cfg, "result": result, "record": record, "val": val, "test": test, "mean": mean, "std": std}


def test_regression_metrics_equal_the_model_applied_by_hand(regression_run: dict[str, Any]) -> None:
    result, val, test = regression_run["result"], regression_run["val"][-1], regression_run["test"]
    on_disk = json.loads((result.run_dir / "metrics.json").read_text())
    assert on_disk["monitor"] == "val/loss"  # the regression default
    pairs = regression_run["record"].train_sums[-1]
    pred, target = torch.cat([p for p, _ in pairs]), torch.cat([t for _, t in pairs])
    assert len(pairs) == 12 and len(target) == 360
    rss, tss = ((pred - target) ** 2).sum(0), ((target - target.mean(0)) ** 2).sum(0)
    mse = float(((pred - target) ** 2).mean())
    train_by_hand = {"loss": mse, "mse": mse, "mae": float((pred - target).abs().mean()), "r2": float(1 - rss / tss)}
    for metrics in (result.metrics, on_disk["metrics"]):
        assert not any(k.endswith("/acc") for k in metrics)
        for name in ("loss", "mse", "mae", "r2"):
            assert metrics[f"val/{name}"] == pytest.approx(val[name], **TOL), name
            assert metrics[f"test/{name}"] == pytest.approx(test[name], **TOL), name
            assert metrics[f"train/{name}"] == pytest.approx(train_by_hand[name], **TOL), name


def test_regression_tensorboard_per_epoch_and_uneven_batches(regression_run: dict[str, Any]) -> None:
    tb = scalars(regression_run["result"].run_dir)
    assert len(tb["val/r2"]) == EPOCHS
    for by_hand_epoch, *logged in zip(
        regression_run["val"], tb["val/loss"], tb["val/mse"], tb["val/mae"], tb["val/r2"], strict=True
    ):
        assert logged == [pytest.approx(by_hand_epoch[n], **TOL) for n in ("loss", "mse", "mae", "r2")]
    # the check can fail: the mean of the test batches' MSEs is not the per-sample MSE
    cfg, test = regression_run["cfg"], regression_run["test"]
    splits = load_splits(cfg.data, cfg.seed, "regression")
    model = build_model(cfg.model, (6,), 1)
    model.load_state_dict(regression_run["record"].test_states[0])
    mean, std = regression_run["mean"], regression_run["std"]
    batches = zip(splits.x_test.split(24), splits.y_test.split(24), strict=True)
    means = [regression_by_hand(model, x, y, mean, std)["mse"] for x, y in batches]
    assert abs(sum(means) / len(means) - test["mse"]) > 1e-3 * test["mse"]


def test_regression_checkpoint_holds_the_target_statistics(regression_run: dict[str, Any]) -> None:
    from deepnets.checkpoint import load_checkpoint

    run_dir = regression_run["result"].run_dir
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")["state_dict"]  # weights_only loading
    assert state["target_mean"].tolist() == pytest.approx(regression_run["mean"].tolist(), rel=1e-6)
    assert state["target_std"].tolist() == pytest.approx(regression_run["std"].tolist(), rel=1e-6)


def test_regression_evaluate_of_an_export_equals_the_test_metrics(regression_run: dict[str, Any]) -> None:
    from tests.conftest import run_cli

    result = regression_run["result"]
    export = export_run(result.run_dir)
    evaluated = evaluate(export)
    assert set(evaluated) == {"test/loss", "test/mse", "test/mae", "test/r2"}
    for name, value in evaluated.items():
        assert value == pytest.approx(regression_run["test"][name.split("/")[1]], **TOL), name
        assert value == pytest.approx(result.metrics[name], **TOL), name
    r = run_cli("--evaluate", str(export))
    assert r.returncode == 0, r.stderr
    assert f"test/r2={result.metrics['test/r2']:.4f}" in r.stdout
