"""Sweeps: the grid, its run directories, the results table and plot; errors named before anything runs."""

from __future__ import annotations

import csv
import re
from pathlib import Path

import pytest
import torch

from deepnets.config import load_config
from deepnets.errors import UserError
from deepnets.experiments import double_descent
from deepnets.experiments.__main__ import main as experiments_main
from deepnets.sweep import grid, run_sweep, series

from .conftest import TINY, run_cli

FAST = [
    "data.num_samples=96",
    "trainer.max_steps=2",
    "trainer.max_epochs=-1",
    "logging.tensorboard=false",
    "logging.grad_norm_every_n_steps=0",
    "checkpoint.enabled=false",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny nets on shared cores: threads only contend
    yield
    torch.set_num_threads(threads)


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cfg(tmp_path: Path, *overrides: str):
    return load_config(None, [*TINY, *FAST, f"output_dir={tmp_path / 'runs'}", *overrides])


def test_sweep_runs_the_grid_into_its_own_directories(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 16]}", "sweep.seeds=[0, 1]", "sweep.metric=test/error")
    assert run_sweep(cfg) is True
    sweep_dir = tmp_path / "runs" / "tiny" / "sweep_0"
    rows = _csv(sweep_dir / "results.csv")
    assert [(r["width"], r["seed"]) for r in rows] == [("4", "0"), ("4", "1"), ("16", "0"), ("16", "1")]
    assert {r["status"] for r in rows} == {"completed"}
    # 2-layer-deep MLP on 8 inputs, 3 classes: 8w + w + (w w + w) + 3w + 3
    assert [int(r["params"]) for r in rows] == [4 * 4 + 13 * 4 + 3] * 2 + [16 * 16 + 13 * 16 + 3] * 2
    for r in rows:
        run_dir = sweep_dir / r["run_dir"]
        assert run_dir.parent.name == f"width={r['width']},seed={r['seed']}"
        assert (run_dir / "metrics.json").is_file() and (run_dir / "config.yaml").is_file()
        assert abs(float(r["test/error"]) + float(r["test/acc"]) - 1) < 1e-6
        assert int(r["steps"]) == 2
    assert len(list(sweep_dir.glob("*/version_0"))) == 4
    saved = load_config(str(sweep_dir / rows[2]["run_dir"] / "config.yaml"))
    assert (saved.model.width, saved.seed, saved.sweep.params) == (16, 0, {})  # the point's config, sweep cleared
    assert (sweep_dir / "sweep.png").stat().st_size > 1000
    md = (sweep_dir / "results.md").read_text()
    assert md.splitlines()[0].startswith("| width | seed | status | params |") and len(md.splitlines()) == 6
    assert md in capsys.readouterr().out  # the table is printed


def test_sweep_series_groups_seeds_and_other_keys() -> None:
    rows = [
        {"width": 4, "lr": 0.1, "seed": 0, "m": 1.0},
        {"width": 4, "lr": 0.1, "seed": 1, "m": 3.0},
        {"width": 8, "lr": 0.1, "seed": 0, "m": 2.0},
        {"width": 4, "lr": 0.2, "seed": 0, "m": 5.0},
        {"width": 8, "lr": 0.2, "seed": 0, "m": "nan"},  # failed run: skipped
    ]
    assert series(rows, "width", "m", ["lr"]) == {(0.1,): [(4, [1.0, 3.0]), (8, [2.0])], (0.2,): [(4, [5.0])]}


def test_sweep_grid_is_the_product_with_seeds_innermost(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 8], optim.lr: [0.1, 0.01]}", "sweep.seeds=[3, 4]")
    points = grid(cfg)
    assert [p.label for p in points][:3] == ["width=4,lr=0.1,seed=3", "width=4,lr=0.1,seed=4", "width=4,lr=0.01,seed=3"]
    assert len(points) == 8
    last = points[-1].cfg
    assert (last.model.width, last.optim.lr, last.seed, last.sweep.params) == (8, 0.01, 4, {})


@pytest.mark.parametrize(
    ("params", "culprit"),
    [
        ("{model.widht: [4, 8]}", "sweep.params.model.widht"),  # unknown key, named with the nearest one
        ("{modle.width: [4]}", "sweep.params.modle.width"),  # unknown section
        ("{model.width: [4, 3.5]}", "sweep.params.model.width"),  # wrong type
        ("{optim.lr: [0.1, -1.0]}", "sweep.params.optim.lr"),  # out of range
        ("{model.activation: [relu, rleu]}", "sweep.params.model.activation"),  # not an allowed value
        ("{model: [1]}", "sweep.params.model"),  # a whole section
        ("{seed: [1, 2]}", "sweep.params.seed"),  # seeds go in sweep.seeds
        ("{model.depth: []}", "sweep.params.model.depth"),  # nothing to run
    ],
)
def test_sweep_bad_key_or_value_is_a_user_error_before_anything_runs(tmp_path: Path, params: str, culprit: str) -> None:
    cfg = _cfg(tmp_path, f"sweep.params={params}")
    with pytest.raises(UserError, match="^" + re.escape(culprit) + ":"):
        run_sweep(cfg)
    assert not (tmp_path / "runs").exists()  # nothing ran, not even a sweep directory


def test_sweep_unknown_key_names_the_nearest_valid_one(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"sweep\.params\.model\.widht: .*did you mean model\.width"):
        grid(_cfg(tmp_path, "sweep.params={model.widht: [4]}"))


def test_sweep_x_key_must_be_swept(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"^sweep\.x_key: 'optim\.lr' is not swept"):
        grid(_cfg(tmp_path, "sweep.params={model.width: [4]}", "sweep.x_key=optim.lr"))


def test_cli_sweep_bad_key_is_one_error_line(tmp_path: Path) -> None:
    r = run_cli("--config", "mlp", f"output_dir={tmp_path}", "sweep.params={model.widht: [4, 8]}")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == [r.stderr.strip()] and "sweep.params.model.widht" in r.stderr
    assert "Traceback" not in r.stderr


def test_double_descent_configs_load_and_sweep_width() -> None:
    for name in ("double_descent", "double_descent_ridge", "cifar10_resnet18_width_sweep"):
        cfg = load_config(name)
        assert list(cfg.sweep.params) == ["model.width"] and cfg.sweep.metric == "test/error"
        assert not cfg.early_stopping.enabled and not cfg.early_stopping.restore_best
        assert grid(cfg)  # every point validates
    plain, ridge = load_config("double_descent"), load_config("double_descent_ridge")
    assert (plain.model.arch, plain.model.depth, plain.data.name) == ("mlp", 1, "digits")
    assert plain.optim.weight_decay == 0 and ridge.optim.weight_decay > 0
    assert plain.data.label_noise > 0 and plain.sweep.params == ridge.sweep.params
    cifar = load_config("cifar10_resnet18_width_sweep")
    assert cifar.data.label_noise == 0.15 and cifar.data.download
    assert min(cifar.sweep.params["model.width"]) == 1 and max(cifar.sweep.params["model.width"]) == 64


def test_double_descent_summary_finds_threshold_and_peak() -> None:
    rows = [
        {"width": w, "params": 10 * w, "seed": s, "status": "completed", "train/error": tr, "test/error": te + s / 100}
        for s in (0, 1)
        # underfit (high test error), sweet spot, peak, threshold, second descent
        for w, tr, te in [(1, 0.5, 0.6), (2, 0.3, 0.2), (4, 0.05, 0.4), (8, 0.0, 0.3), (16, 0.0, 0.1)]
    ]
    c = double_descent.summarise([*rows, {"width": 8, "status": "diverged"}], "plain")
    assert c.width == [1, 2, 4, 8, 16] and c.failed == 1
    assert c.threshold(0.01) == 3 and c.peak(0.01) == 2  # not the underfit width 1
    assert c.test_min[2] == pytest.approx(0.4) and c.test_max[2] == pytest.approx(0.41)


def test_double_descent_quick_writes_its_files(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # in-process: `python -m deepnets.experiments double_descent --quick` without another Lightning import
    assert experiments_main(["double_descent", "--quick", "--out", str(tmp_path)]) == 0
    stdout = capsys.readouterr().out
    out = tmp_path / "double_descent" / "version_0"
    assert (out / "double_descent.png").stat().st_size > 1000
    rows = _csv(out / "double_descent.csv")
    assert [int(row["width"]) for row in rows] == [4, 64]
    assert (out / "double_descent.md").read_text() in stdout
    sweep_dir = out / "double_descent" / "sweep_0"
    assert len(_csv(sweep_dir / "results.csv")) == 2 and (sweep_dir / "sweep.png").is_file()
    assert "interpolation threshold" in stdout and "figure:" in stdout
