"""Tasks (classification / regression) and the user's own optimizer: losses, reporting units, k > 1 targets,
torch.optim classes by name or from a file, and the one-line errors of everything a config can get wrong."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepnets.config import LOGGED_METRICS, DataConfig, load_config
from deepnets.data import InMemoryDataModule, Splits, _synthetic, load_splits
from deepnets.errors import UserError
from deepnets.models import build_model
from deepnets.module import OPTIMIZERS, TASKS, Classifier, TaskModule, module_from_config, target_stats
from deepnets.run import train
from deepnets.sweep import check_sweep, metric_direction

from .conftest import TINY, run_cli

TOL = {"rel": 2e-6, "abs": 1e-6}
REGRESSION = [*TINY, "task=regression", "optim.lr=0.02", "logging.grad_norm_every_n_steps=0"]


def regression(tmp_path: Path, *overrides: str) -> Any:
    return load_config(None, [*REGRESSION, f"output_dir={tmp_path / 'runs'}", *overrides])


class LastWeights(L.Callback):
    """The weights the test split saw."""

    state: dict[str, Tensor]

    def on_test_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
        self.state = {k: v.clone() for k, v in pl_module.model.state_dict().items()}


def _test_by_hand(cfg: Any, state: dict[str, Tensor], loss: str) -> dict[str, float]:
    """test/{loss, mse, mae, r2} in own units, float64, from the raw splits (independent of the module)."""
    s = load_splits(cfg.data, cfg.seed, "regression")
    y = s.y_train.double()
    mean, std = (y.mean(), y.std()) if cfg.data.standardize_target else (torch.tensor(0.0), torch.tensor(1.0))
    model = build_model(cfg.model, (8,), 1)
    model.load_state_dict(state)
    with torch.no_grad():
        out = model.eval()(s.x_test).double()[:, 0]  # (N,) fitted units
    pred, target = out * std + mean, s.y_test.double()
    err = pred - target
    if loss == "huber":  # Huber of the own-unit errors with delta = std (1 in the fitted units)
        a = err.abs()
        per = torch.where(a < std, 0.5 * err**2, std * (a - 0.5 * std))
    else:
        per = err**2
    r2 = 1 - (err**2).sum() / ((target - target.mean()) ** 2).sum()
    return {"loss": float(per.mean()), "mse": float((err**2).mean()), "mae": float(err.abs().mean()), "r2": float(r2)}


# ---------------------------------------------------------------- the tables and the config


def test_tables_name_what_validation_accepts() -> None:
    assert set(TASKS) == {"classification", "regression"} == set(LOGGED_METRICS)
    assert LOGGED_METRICS["regression"]["val/r2"] == "max" and LOGGED_METRICS["regression"]["val/mae"] == "min"
    assert "val/acc" not in LOGGED_METRICS["regression"]
    assert set(OPTIMIZERS) == {"sgd", "adam", "adamw", "rmsprop", "adagrad"}


def test_monitor_defaults_follow_the_task() -> None:
    cls = load_config(None, [])
    assert (cls.task, cls.checkpoint.monitor, cls.checkpoint.mode) == ("classification", "val/acc", "max")
    reg = load_config(None, ["task=regression", "data.name=synthetic"])
    assert (reg.checkpoint.monitor, reg.checkpoint.mode) == ("val/loss", "min")
    assert (reg.early_stopping.monitor, reg.early_stopping.mode) == ("val/loss", "min")
    r2 = load_config(
        None, ["task=regression", "data.name=synthetic", "checkpoint.monitor=val/r2"]
    )  # mode: the metric's
    assert r2.checkpoint.mode == "max"
    assert load_config(
        None, ["task=regression", "data.name=synthetic", "sweep.metric=test/r2", "sweep.params={optim.lr: [0.1]}"]
    )


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["task=regresion"],
            "task: expected one of classification, regression, got 'regresion'; did you mean regression?",
        ),
        (
            ["optim.loss=huber"],
            "optim.loss: huber is not a loss for task classification (allowed: auto, cross_entropy)",
        ),
        (
            ["task=regression", "optim.loss=cross_entropy"],
            "optim.loss: cross_entropy is not a loss for task regression",
        ),
        (
            ["task=regression", "data.name=synthetic", "checkpoint.monitor=val/acc"],
            "checkpoint.monitor: 'val/acc' is not a metric this run logs (task regression; val/acc is classification",
        ),
        (
            ["task=regression", "data.name=synthetic", "early_stopping.enabled=true", "early_stopping.monitor=val/r2"],
            "early_stopping.mode: min with early_stopping.monitor=val/r2 would keep the worst value (higher is better)",
        ),
        (["task=regression", "data.label_noise=0.1"], "data.label_noise: 0.1 acts on class labels; task regression"),
        (["task=regression", "optim.label_smoothing=0.1"], "optim.label_smoothing: 0.1 acts on class labels"),
        (["optim.name=nadam"], "optim.name: 'nadam' is not an optimizer; did you mean NAdam?"),
        (["optim.name=Adamm"], "optim.name: 'Adamm' is not an optimizer; did you mean Adam?"),
        (
            ["optim.name=torch.nn:Linear"],
            "optim.name: torch.nn:Linear is not a subclass of torch.optim.optimizer.Optimizer",
        ),
        (["optim.name=no_such_pkg:Opt"], "optim.name: no module named 'no_such_pkg'"),
        (
            ["optim.name=NAdam", "optim.kwargs={momentum_decay: 0.004, betass: [0.9, 0.99]}"],
            "optim.kwargs.betass: not an argument of torch.optim.NAdam (did you mean betas? allowed: betas, eps,",
        ),
        (["optim.name=NAdam", "optim.kwargs={lr: 0.1}"], "optim.kwargs.lr: set by deepnets (optim.lr)"),
        (["optim.name=sgd", "optim.kwargs={momentum: 0.5}"], "optim.kwargs.momentum: set by deepnets (optim.momentum)"),
        (["optim.name=RAdam", "optim.kwargs={betas: [1.5, 0.9]}"], "optim.kwargs: torch.optim.RAdam refuses"),
        (["optim.name=LBFGS", "optim.weight_decay=0.1"], "optim.weight_decay: torch.optim.LBFGS takes no weight_decay"),
    ],
)
def test_bad_task_and_optimizer_settings_are_one_error(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_sweep_metric_is_checked_against_the_task(tmp_path: Path) -> None:
    sweep = ["sweep.params={optim.lr: [0.1, 0.2]}"]
    with pytest.raises(UserError, match=r"sweep.metric: 'test/acc' is not a metric of task regression"):
        check_sweep(regression(tmp_path, *sweep, "sweep.metric=test/acc"))
    with pytest.raises(UserError, match=r"sweep.metric: .test/r. is not .*\(did you mean test/r2\? allowed"):
        check_sweep(regression(tmp_path, *sweep, "sweep.metric=test/r"))
    check_sweep(regression(tmp_path, *sweep, "sweep.metric=test/r2"))
    assert metric_direction("test/r2", "regression") == "maximize"
    assert metric_direction("test/mae", "regression") == "minimize"
    assert metric_direction("test/error") == "minimize" and metric_direction("val/acc") == "maximize"


def test_a_bad_optimizer_is_one_line_from_the_cli_and_writes_nothing(tmp_path: Path) -> None:
    (tmp_path / "opt.py").write_text("class NotAnOptimizer:\n    pass\n")
    (tmp_path / "run.yaml").write_text("task: regression\n")
    spec = f"optim.name={tmp_path / 'opt.py'}:NotAnOptimizer"
    r = run_cli("--config", str(tmp_path / "run.yaml"), *REGRESSION, f"output_dir={tmp_path / 'runs'}", spec)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [
        f"error: optim.name: {tmp_path / 'opt.py'}:NotAnOptimizer is not a subclass of torch.optim.optimizer.Optimizer"
    ]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- data and module


def test_synthetic_classification_is_unchanged() -> None:
    """The classification clusters are drawn exactly as before regression joined `_synthetic`."""
    cfg = DataConfig(name="synthetic", input_shape=[5], num_classes=3, num_samples=50, split_seed=7)
    g = torch.Generator().manual_seed(7 + 12345)
    means = torch.randn(3, 5, generator=g)
    y = torch.randint(0, 3, (50,), generator=g)
    x = means[y] + 2.0 * torch.randn(50, 5, generator=g)
    got_x, got_y = _synthetic(cfg)
    assert torch.equal(got_x, x) and torch.equal(got_y, y)
    rx, ry = _synthetic(cfg, "regression")
    assert ry.dtype == torch.float32 and ry.shape == (50,) and rx.shape == (50, 5)
    assert torch.equal(ry, _synthetic(cfg, "regression")[1])  # seeded


def test_target_stats_and_predict_outputs() -> None:
    y = torch.tensor([[1.0, 10.0, 5.0], [3.0, 30.0, 5.0], [5.0, 20.0, 5.0]])  # (N, 3); the last column constant
    mean, std = target_stats(y)
    assert mean.tolist() == pytest.approx([3.0, 20.0, 5.0])
    assert std.tolist() == pytest.approx([2.0, 10.0, 1.0])  # a constant output keeps std 1
    with pytest.raises(UserError, match="NaN or inf"):
        target_stats(torch.tensor([1.0, float("nan")]))
    model = nn.Linear(4, 3)
    module = TaskModule(model, task="regression", target_mean=mean, target_std=std)
    assert {"target_mean", "target_std"} <= set(module.state_dict())
    x = torch.randn(7, 4)
    with torch.no_grad():
        expected = model(x) * std + mean
    assert torch.allclose(module.predict_outputs(x), expected)
    classifier = TaskModule(nn.Linear(4, 3))
    assert set(classifier.state_dict()) == {"model.weight", "model.bias"}  # previous checkpoints still load
    probs = classifier.predict_outputs(x)
    assert torch.allclose(probs, classifier.model(x).softmax(1)) and torch.allclose(probs.sum(1), torch.ones(7))


def test_classifier_keeps_its_config_constructor(tmp_path: Path) -> None:
    cfg = load_config(None, [*TINY, "optim.label_smoothing=0.1"])
    module = Classifier(nn.Linear(8, 3), cfg)
    assert module.task == "classification" and module.label_smoothing == 0.1
    assert module.hparams["optim"]["label_smoothing"] == 0.1  # the run's config, as hyper_parameters


def test_k3_targets_metrics_by_hand() -> None:
    """(N, 3) targets of different scales through a real Trainer: R2 is the uniform average over outputs,
    MSE and MAE the mean over all N x 3 errors, all in own units; batches of 16 leave a last one of 6."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(118, 5, generator=g)
    W = torch.randn(5, 3, generator=g)
    y = x @ W * torch.tensor([1.0, 100.0, 0.01]) + torch.tensor([0.0, 500.0, -3.0])  # (N, 3)
    y = y + 0.3 * torch.randn(118, 3, generator=g) * torch.tensor([1.0, 100.0, 0.01])
    splits = Splits(x[:80], y[:80], x[80:118], y[80:118], x[80:118], y[80:118])
    cfg = load_config(None, [*REGRESSION, "data.batch_size=16", "data.eval_batch_size=16"])
    dm = InMemoryDataModule(cfg.data, 0, task="regression")
    dm.splits = splits
    L.seed_everything(0, verbose=False)
    model = nn.Sequential(nn.Linear(5, 16), nn.Tanh(), nn.Linear(16, 3))
    module = module_from_config(model, cfg, splits.y_train)
    trainer = L.Trainer(
        accelerator="cpu", devices=1, max_epochs=3, logger=False, enable_checkpointing=False,
        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
    )  # fmt: skip
    trainer.fit(module, datamodule=dm)
    logged = {k: float(v) for k, v in trainer.validate(module, datamodule=dm, verbose=False)[0].items()}
    mean, std = y[:80].double().mean(0), y[:80].double().std(0)
    with torch.no_grad():
        pred = model(splits.x_val).double() * std + mean  # (38, 3) own units
    target = splits.y_val.double()
    err = pred - target
    r2_each = 1 - (err**2).sum(0) / ((target - target.mean(0)) ** 2).sum(0)  # (3,)
    by_hand = {"mse": float((err**2).mean()), "mae": float(err.abs().mean()), "r2": float(r2_each.mean())}
    for name, value in by_hand.items():
        assert logged[f"val/{name}"] == pytest.approx(value, rel=1e-5), name
    assert logged["val/loss"] == pytest.approx(by_hand["mse"], rel=1e-5)
    assert module.predict_outputs(splits.x_val).shape == (38, 3)
    assert float(r2_each.min()) < float(r2_each.max()) - 1e-3  # outputs differ: the average is a real average


# ---------------------------------------------------------------- through train()


@pytest.mark.parametrize(
    ("overrides", "loss"),
    [(["optim.loss=huber"], "huber"), (["data.standardize_target=false", "optim.lr=0.002"], "mse")],
)
def test_huber_and_unstandardised_targets_report_own_units(tmp_path: Path, overrides: list[str], loss: str) -> None:
    cfg = regression(tmp_path, *overrides)
    weights = LastWeights()
    result = train(cfg, callbacks=[weights])
    assert result.status == "completed", result.error
    by_hand = _test_by_hand(cfg, weights.state, loss)
    on_disk = json.loads((result.run_dir / "metrics.json").read_text())["metrics"]
    for name, value in by_hand.items():
        assert on_disk[f"test/{name}"] == pytest.approx(value, **TOL), name
    if loss == "huber":
        assert on_disk["test/loss"] < on_disk["test/mse"]  # Huber is not MSE
    assert on_disk["test/mae"] > 1  # own units: the targets' std is ~20, not 1


def test_torch_optimizer_by_name_and_from_a_file_with_kwargs(tmp_path: Path) -> None:
    (tmp_path / "my_opt.py").write_text(
        "import torch\n\n\n"
        "class ScaledSGD(torch.optim.SGD):\n"
        "    def __init__(self, params, lr=0.1, scale=1.0, weight_decay=0.0):\n"
        "        super().__init__(params, lr=lr * scale, weight_decay=weight_decay)\n"
        "        self.scale = scale\n"
    )

    class Seen(L.Callback):
        def on_train_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            self.optimizer = trainer.optimizers[0]

    seen = Seen()
    cfg = regression(tmp_path, "optim.name=NAdam", "optim.kwargs={momentum_decay: 0.005}", "trainer.max_epochs=1")
    assert train(cfg, callbacks=[seen]).status == "completed"
    assert type(seen.optimizer) is torch.optim.NAdam
    assert all(g["momentum_decay"] == 0.005 and g["lr"] == 0.02 for g in seen.optimizer.param_groups)
    spec = f"{tmp_path / 'my_opt.py'}:ScaledSGD"
    cfg = load_config(
        None, [*TINY, f"output_dir={tmp_path / 'runs'}", f"optim.name={spec}", "optim.kwargs={scale: 0.5}"]
    )
    result = train(cfg, callbacks=[seen])
    assert result.status == "completed"
    assert type(seen.optimizer).__name__ == "ScaledSGD" and seen.optimizer.scale == 0.5
    assert all(g["lr"] == pytest.approx(0.05) for g in seen.optimizer.param_groups)
    # the run's config.yaml records the file's absolute path and reloads (resume, export)
    saved = load_config(str(result.run_dir / "config.yaml"))
    assert saved.optim.name == spec and saved.optim.kwargs == {"scale": 0.5}
    assert math.isfinite(result.metrics["test/loss"])


def test_built_in_names_keep_their_tuned_paths() -> None:
    from deepnets.module import build_optimizer

    cfg = load_config(None, ["optim.name=adamw", "optim.kwargs={maximize: false}"])
    opt = build_optimizer(nn.Linear(3, 2), cfg.optim)
    assert type(opt) is torch.optim.AdamW
    assert any(opt.defaults.get(k) for k in ("fused", "foreach"))  # the kernel choice of the built-in name
    plain = build_optimizer(nn.Linear(3, 2), load_config(None, ["optim.name=AdamW"]).optim)
    assert not plain.defaults.get("fused")  # a class name is built as torch builds it


def test_regression_loss_scales_exactly() -> None:
    """std^2 x the fitted (standardised) loss is the own-unit loss, for MSE and for Huber with delta std."""
    a, b, s = torch.randn(50, dtype=torch.float64), torch.randn(50, dtype=torch.float64), 7.0
    assert float(F.mse_loss(s * a, s * b)) == pytest.approx(s**2 * float(F.mse_loss(a, b)))
    assert float(F.huber_loss(s * a, s * b, delta=s)) == pytest.approx(s**2 * float(F.huber_loss(a, b, delta=1.0)))


def test_regression_resumes_and_refuses_other_target_scaling(tmp_path: Path) -> None:
    first = train(regression(tmp_path, "data.standardize_target=false", "trainer.max_epochs=1"))
    assert first.status == "completed"
    with pytest.raises(UserError, match=r"the checkpoint has data.standardize_target=False, the config .*=True"):
        train(regression(tmp_path, "trainer.max_epochs=2"), resume="last")
    with pytest.raises(UserError, match=r"the checkpoint has task='regression', the config task='classification'"):
        train(load_config(None, [*TINY, f"output_dir={tmp_path / 'runs'}", "trainer.max_epochs=2"]), resume="last")
    again = train(regression(tmp_path, "data.standardize_target=false", "trainer.max_epochs=2"), resume="last")
    assert again.status == "completed" and again.run_dir == first.run_dir
    segments = json.loads((first.run_dir / "metrics.json").read_text())["segments"]
    assert [s["status"] for s in segments] == ["completed", "completed"]
