"""Issue 9's training tricks: each toggle changes what it claims."""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from deepnets.checkpoint import load_checkpoint
from deepnets.config import load_config
from deepnets.data import load_splits
from deepnets.models import build_model
from deepnets.module import Classifier, build_optimizer
from deepnets.run import train


def test_l1_term_is_coefficient_times_sum_of_absolute_weights() -> None:
    cfg = load_config(None, ["optim.l1=0.01", "model.depth=2", "model.width=8"])
    model = build_model(cfg.model, (1, 8, 8), 10)
    module = Classifier(model, cfg)
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    expected = 0.01 * sum(float(m.weight.abs().sum()) for m in linears)  # biases excluded
    assert float(module.l1_penalty()) == pytest.approx(expected, rel=1e-6)
    x, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 1, 2, 3])
    with_l1 = module.training_step((x, y), 0)
    plain = nn.functional.cross_entropy(module(x), y)
    assert float(with_l1 - plain) == pytest.approx(expected, rel=1e-5)


def test_layer_decay_sets_lambda_per_layer() -> None:
    cfg = load_config(None, ["optim.weight_decay=0.1", "optim.layer_decay=0.5", "model.depth=3", "model.width=8"])
    model = build_model(cfg.model, (1, 8, 8), 10)
    opt = build_optimizer(model, cfg.optim)
    linears = [m.weight for m in model.modules() if isinstance(m, nn.Linear)]
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert [decay_of[id(w)] for w in linears] == pytest.approx([0.1, 0.05, 0.025, 0.0125])
    assert all(decay_of[id(m.bias)] == 0 for m in model.modules() if isinstance(m, nn.Linear))
    explicit = load_config(None, ["optim.layer_decay=[0.0, 0.1, 0.2, 0.3]", "model.depth=3", "model.width=8"])
    opt = build_optimizer(model, explicit.optim)
    decay_of = {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]}
    assert [decay_of[id(w)] for w in linears] == [0.0, 0.1, 0.2, 0.3]


def test_layer_decay_list_length_is_checked() -> None:
    from deepnets.errors import UserError

    cfg = load_config(None, ["optim.layer_decay=[0.1, 0.2]", "model.depth=3"])
    with pytest.raises(UserError, match=r"optim.layer_decay: 2 values for 4 layers"):
        build_optimizer(build_model(cfg.model, (1, 8, 8), 10), cfg.optim)


def test_optimizer_keys_reach_the_optimizer() -> None:
    model = nn.Linear(3, 2)
    cfg = load_config(None, ["optim.name=adam", "optim.betas=[0.8, 0.9]", "optim.eps=1e-6", "optim.amsgrad=true"])
    g = build_optimizer(model, cfg.optim).param_groups[0]
    assert g["betas"] == (0.8, 0.9) and g["eps"] == 1e-6 and g["amsgrad"] is True
    sgd = build_optimizer(model, load_config(None, ["optim.nesterov=true"]).optim).param_groups[0]
    assert sgd["nesterov"] is True and sgd["momentum"] == 0.9


@pytest.mark.parametrize("init", ["default", "kaiming", "xavier", "orthogonal", "normal"])
def test_no_two_units_start_identical(init: str) -> None:
    cfg = load_config(None, [f"model.init={init}", "model.depth=3", "model.width=32", "model.init_gain=0.5"])
    model = build_model(cfg.model, (1, 8, 8), 10)
    for m in model.modules():
        if isinstance(m, nn.Linear):
            rows = m.weight.detach()
            assert torch.unique(rows, dim=0).shape[0] == rows.shape[0]  # "small but different"
            assert float(rows.abs().max()) < 5.0


def test_init_gain_scales_weights() -> None:
    w = {
        g: build_model(load_config(None, ["model.init=xavier", f"model.init_gain={g}"]).model, (1, 8, 8), 10)
        .layers[0][0]
        .weight.std()
        .item()
        for g in (1.0, 2.0)
    }
    assert w[2.0] / w[1.0] == pytest.approx(2.0, rel=0.05)


def test_zca_option_whitens_the_training_split() -> None:
    data = load_config(
        None,
        [
            "data.name=synthetic",
            "data.input_shape=[6]",
            "data.num_samples=2000",
            "data.whiten=zca",
            "data.whiten_eps=1e-8",
        ],
    ).data
    s = load_splits(data, seed=0)
    x = s.x_train - s.x_train.mean(0)
    cov = x.T @ x / (len(x) - 1)
    assert torch.allclose(cov, torch.eye(6), atol=1e-3)


def test_restore_best_false_tests_the_last_weights(tiny) -> None:
    result = train(tiny("early_stopping.restore_best=false", "trainer.max_epochs=3", "optim.lr=0.5"))
    last = load_checkpoint(result.run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    cfg = tiny()
    model = build_model(cfg.model, (8,), 3)
    model.load_state_dict({k.removeprefix("model."): v for k, v in last.items() if k.startswith("model.")})
    s = load_splits(cfg.data, cfg.seed)
    acc = (model(s.x_test).argmax(1) == s.y_test).float().mean().item()
    assert acc == pytest.approx(result.metrics["test/acc"], abs=1e-6)


def test_lr_find_writes_plot_and_changes_lr(tiny) -> None:
    result = train(tiny("trainer.lr_find=true", "optim.lr=0.123", "trainer.max_epochs=1"))
    assert (result.run_dir / "lr_find.png").stat().st_size > 1000
    used = load_config(str(result.run_dir / "config.yaml")).optim.lr
    assert used != 0.123 and 1e-6 <= used <= 1.0
    assert json.loads((result.run_dir / "metrics.json").read_text())["status"] == "completed"


def test_lr_probe_keeps_the_best_step_size(tiny, capsys: pytest.CaptureFixture[str]) -> None:
    result = train(tiny("trainer.lr_probe=[1e-5, 0.1, 1e4]", "trainer.lr_probe_steps=20", "trainer.max_epochs=1"))
    rows = (result.run_dir / "lr_probe.csv").read_text().splitlines()
    assert rows[0] == "lr,train_loss" and len(rows) == 4
    losses = {float(r.split(",")[0]): float(r.split(",")[1]) for r in rows[1:]}
    best = min(losses, key=losses.get)
    assert best == 0.1  # 1e-5 barely moves, 1e4 blows up
    assert load_config(str(result.run_dir / "config.yaml")).optim.lr == 0.1
    assert "<- best" in capsys.readouterr().out


def _lrs(name: str, *extra: str, total: int = 100, per_epoch: int = 10) -> list[float]:
    from deepnets.module import build_scheduler

    cfg = load_config(None, [f"scheduler.name={name}", *extra])
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = build_scheduler(opt, cfg.scheduler, total, per_epoch, 0.1)
    lrs = []
    for _ in range(total):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step(1.0) if name == "plateau" else sched.step()
    return lrs


def test_schedulers_follow_their_shapes() -> None:
    step = _lrs("step", "scheduler.step_size=3", "scheduler.gamma=0.5")  # epochs of 10 steps
    assert step[29] == pytest.approx(0.1) and step[30] == pytest.approx(0.05) and step[60] == pytest.approx(0.025)
    cos = _lrs("cosine", "scheduler.min_lr=0.001")
    assert cos[0] == pytest.approx(0.1) and cos[50] == pytest.approx(0.0505, rel=0.02) and cos[-1] < 0.002
    warm = _lrs("cosine", "scheduler.warmup_steps=10")
    assert (
        warm[0] == pytest.approx(0.01)
        and warm[5] < warm[9] < warm[10] == pytest.approx(0.1)
        and warm[-1] < warm[50] < 0.1
    )
    one = _lrs("onecycle")
    assert max(one) == pytest.approx(0.1, rel=1e-3) and one[0] < 0.01 and one[-1] < 1e-3
    plateau = _lrs("plateau", "scheduler.patience=2", "scheduler.gamma=0.5", total=8)
    assert plateau[0] == 0.1 and plateau[-1] < 0.1  # a constant loss is no improvement
    with pytest.raises(Exception, match="warmup_steps: not supported with scheduler.name=plateau"):
        _lrs("plateau", "scheduler.warmup_steps=5")


def test_console_script_matches_train_py() -> None:
    import subprocess
    import sys
    from pathlib import Path

    script = Path(sys.executable).parent / "deepnets"
    if not script.exists():
        pytest.skip("console script not installed in this environment")
    r = subprocess.run([str(script), "--config", "mlp", "--print-config"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "arch: mlp" in r.stdout
    r = subprocess.run([str(script), "--config", "mlp", "optim.nam=adam"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip() == "error: unknown key optim.nam; did you mean optim.name?"
