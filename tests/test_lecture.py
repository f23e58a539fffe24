"""The lecture's claims (depth, init, optimizers, gradients of samples, cheap gradients): their direction, measured."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deepnets.experiments import autodiff, depth, initialisation, optimizers
from deepnets.experiments.__main__ import EXPERIMENTS

CPU = torch.device("cpu")


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


# ---------------------------------------------------------------- depth


def test_exact_deep_net_is_the_sawtooth() -> None:
    for k in (1, 3, 6):
        net = depth.exact_deep_net(k)
        x = torch.linspace(0, 1, 4097, dtype=torch.float64)[:, None]  # every kink j / 2^k is on the grid
        y = depth.tent_power(x, k)
        assert (net(x) - y).abs().max() < 1e-12
        assert depth.params(net) == 6 * k + 1
        # 2^k pieces: the slope changes sign 2^k - 1 times between consecutive grid cells
        slope = torch.diff(y[:, 0]).sign()
        assert int((torch.diff(slope) != 0).sum()) == 2**k - 1


def test_shallow_net_with_few_units_cannot_be_the_sawtooth() -> None:
    k = 5
    x = ((torch.arange(512) + 0.5) / 512).double()[:, None]
    y = depth.tent_power(x, k)
    # piece count: width m has at most m + 1 pieces, so with the deep net's 31 parameters (m = 10)
    # even the best head (least squares, kinks wherever we like: on the grid) is far off
    net = depth.shallow_net(torch.linspace(0, 1, 10, dtype=torch.float64), torch.ones(10, dtype=torch.float64))
    depth.fit_head(net, x, y)
    assert depth.params(net) == 31
    assert depth.test_mse(net, x, y)[0] > 0.2 * depth.BASELINE
    exact = depth.exact_shallow_net(k, x, y)  # 2^k units do it
    assert depth.test_mse(exact, x, y)[1] < 1e-10


def test_depth_quick_run(tmp_path: Path) -> None:
    res = depth.run(tmp_path, replace(depth.QUICK, ks=(2, 4), deep_steps=100), seed=0)
    assert (tmp_path / "depth.png").stat().st_size > 1000
    rows = res["rows"]
    assert len(_csv_rows(tmp_path / "depth.csv")) == len(rows)
    for k in (2, 4):
        rk = [r for r in rows if r["k"] == k]
        deep = next(r for r in rk if r["family"] == "deep, exact")
        assert deep["max abs error"] < 1e-5
        same = [r for r in rk if r["family"] == "shallow, trained" and r["params"] <= deep["params"]]
        assert same and all(r["test mse"] > 0.3 * depth.BASELINE for r in same)
    s4 = next(r for r in res["summary_rows"] if r["k"] == 4)
    assert s4["agrees with the lecture?"].startswith("yes")
    assert s4["shallow: params at least"] > s4["deep exact: params"]


# ---------------------------------------------------------------- init


def test_init_quick_run_shows_each_claim(tmp_path: Path) -> None:
    res = initialisation.run(tmp_path, steps=60, every=10, lr=0.05, depth=3, width=32, seed=0)
    assert (tmp_path / "init.png").stat().st_size > 1000
    r = res["results"]
    ident = r["identical units"]
    assert ident["max_rank"] == 1  # every hidden W, at every recorded step
    assert all(p["max rank, hidden layers"] == 1 for p in ident["curve"])
    assert ident["moved"] > 0  # it did train, within the rank-1 set
    zero = r["all zero"]
    assert zero["moved"] == 0.0 and zero["acc"] < 0.25
    assert zero["loss"] == pytest.approx(math.log(10), abs=0.05)
    for name in ("zoo default", "kaiming"):
        assert r[name]["loss"] < 0.5 * r[name]["loss0"] and r[name]["max_rank"] == 32
    big = r["too large, relu: N(0, 1)"]
    assert big["loss0"] > 100 or big["diverged_at"] is not None
    tanh = r["too large, tanh: N(0, 1)"]
    assert tanh["saturation0"] > 0.5 and tanh["loss"] > 2 * r["kaiming"]["loss"]
    rows = _csv_rows(tmp_path / "init.csv")
    assert [row["init"] for row in rows] == list(r)
    assert all(row["agrees with the lecture?"].startswith("yes") for row in rows)


def test_layer_rank_counts_distinct_rows() -> None:
    m = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Linear(4, 3))
    with torch.no_grad():
        m[0].weight.copy_(torch.arange(5.0).expand(4, 5))
    assert initialisation.layer_ranks(m) == [1]


# ---------------------------------------------------------------- optimizers


# One quick run serves every optimizer claim: the four parts cost most of this file's CPU time.
QUICK_OPT = replace(optimizers.QUICK, scale_lrs=(1e-2, 1e-1, 1.0), scale_steps=400, reddi_steps=1500, prep_lrs=(0.3,))


@pytest.fixture(scope="module")
def opt_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("optimizers")
    return out, optimizers.run(out, QUICK_OPT, seed=0)


def test_momentum_slopes_half_of_gds(opt_run: tuple[Path, dict]) -> None:
    slopes = opt_run[1]["slopes"]
    assert 0.85 < slopes["gradient descent"] < 1.15
    for m in ("heavy ball", "nesterov"):
        assert slopes[m] < 0.7 and slopes[m] < slopes["gradient descent"] - 0.3
    # the theory's step sizes: GD's iterations ~ kappa ln(1/tol) / 2 within a factor 2
    gd = [r for r in opt_run[1]["quadratic"] if r["method"] == "gradient descent"]
    for r in gd:
        assert 0.5 < r["iterations"] / (r["kappa"] * math.log(1e6) / 2) < 2


def test_adam_drifts_to_plus_one_amsgrad_to_minus_one(opt_run: tuple[Path, dict]) -> None:
    adam, ams = opt_run[1]["adam"]
    assert adam["final x"] > 0.9 and ams["final x"] < -0.9
    assert adam["average regret R_T / T"] > 3 * ams["average regret R_T / T"] > 0
    assert all(r["min x"] >= -1 and r["max x"] <= 1 for r in (adam, ams))  # projected after every step
    traj = _csv_rows(opt_run[0] / "adam_failure_trajectory.csv")
    assert float(traj[-1]["x"]) == pytest.approx(ams["final x"])


def test_per_coordinate_methods_beat_sgd_on_bad_scaling(opt_run: tuple[Path, dict]) -> None:
    rows = opt_run[1]["scaling"]
    key = next(k for k in rows[0] if k.startswith("steps to"))
    steps = {r["optimizer"]: r[key] for r in rows}
    assert not isinstance(steps["sgd (full batch)"], int)  # never reached at any lr of the grid
    assert all(isinstance(steps[m], int) for m in ("adagrad", "rmsprop", "adam"))


def test_optimizers_quick_run_writes_everything(opt_run: tuple[Path, dict]) -> None:
    out, res = opt_run
    for stem in ("quadratic", "scaling", "adam_failure", "preprocessing"):
        assert (out / f"{stem}.png").stat().st_size > 1000
        assert (out / f"{stem}.md").exists()
    assert [r["inputs"] for r in res["preprocessing"]] == ["none", "standardize", "zca"]
    key = next(k for k in res["preprocessing"][0] if k.startswith("steps to"))
    prep = {r["inputs"]: r[key] for r in res["preprocessing"]}
    raw = prep["none"] if isinstance(prep["none"], int) else math.inf
    assert isinstance(prep["standardize"], int) and prep["standardize"] < raw
    assert len(_csv_rows(out / "summary.csv")) == 4


def test_preprocessing_uses_the_framework_pipeline() -> None:
    from deepnets.config import DataConfig
    from deepnets.data import load_splits

    raw = load_splits(DataConfig(**optimizers.PREPROCESSING["none"]), seed=0).x_train.flatten(1)
    zca = load_splits(DataConfig(**optimizers.PREPROCESSING["zca"]), seed=0).x_train.flatten(1)
    std = load_splits(DataConfig(**optimizers.PREPROCESSING["standardize"]), seed=0).x_train.flatten(1)
    assert raw.min() >= 0 and raw.max() <= 1  # pixels / 16
    assert abs(float(std.mean())) < 1e-4 and abs(float(std.std()) - 1) < 1e-3  # digits: one channel
    cov = torch.cov(zca.T.double())
    lam = torch.linalg.eigvalsh(cov)
    assert lam.max() < 1.01  # whitened: no direction has more than unit variance


# ---------------------------------------------------------------- autodiff: samples and cheap gradients


def test_sample_has_no_gradient() -> None:
    r = autodiff.sample_gradient(1.0)
    assert r["requires_grad"] is False and r["grad_fn"] == "None"
    assert r["autograd.grad"].startswith("RuntimeError")


def test_rsample_and_score_function_are_unbiased_and_rsample_varies_less() -> None:
    mu = 1.0
    rows = autodiff.sample_estimators(mu, (10, 100), repeats=1000, seed=0)
    for r in rows:
        se = math.sqrt(r["variance of the estimate"] / 1000)
        assert abs(r["mean of 1000 estimates"] - 2 * mu) < 4 * se
        # the measured variance matches the theory's per-sample variance / N within sampling error
        assert r["variance of the estimate"] == pytest.approx(r["theory: per-sample variance / N"], rel=0.35)
    for n in (10, 100):
        rep, score = (r for r in rows if r["N samples"] == n)
        assert rep["variance of the estimate"] < score["variance of the estimate"] / 3


def test_cheap_gradient_ratio_within_bound() -> None:
    rows = autodiff.cheap_gradient_zoo(("mlp (Linear-BN-ReLU)", "resnet basic"), 64, 4, 5, CPU, seed=0)
    for r in rows:
        # the op count: backward is two products per forward product (less where no input gradient is needed)
        assert 2.0 < r["flop ratio (matmul + conv)"] <= 3.0 + 1e-9
        assert r["forward ms"] > 0 and r["forward + backward ms"] > 0  # times: too load-dependent to bound here


def test_autodiff_run_has_the_new_tables(tmp_path: Path) -> None:
    sizes = replace(
        autodiff.QUICK,
        jac_dims=(2,),
        jac_hidden=4,
        jac_min_time=0.001,
        ckpt_depth=2,
        ckpt_width=8,
        ckpt_batch=16,
        ckpt_segments=(2,),
        ckpt_reps=1,
        gradcheck_models=("densemlp",),
        sample_sizes=(10,),
        sample_repeats=100,
        cheap_rounds=1,
        cheap_models=("densemlp",),
    )
    res = autodiff.run(tmp_path, sizes, CPU, seed=0)
    assert len(_csv_rows(tmp_path / "sample_gradients.csv")) == 2
    assert len(_csv_rows(tmp_path / "cheap_gradient.csv")) == 1
    assert _csv_rows(tmp_path / "sample_no_gradient.csv")[0]["requires_grad"] == "False"
    assert "gradient of a sample" in res["summary"] and "cheap gradient" in res["summary"]


# ---------------------------------------------------------------- CLI


def test_cli_lists_the_new_experiments() -> None:
    r = subprocess.run(
        [sys.executable, "-m", "deepnets.experiments", "--help"], capture_output=True, text=True, timeout=60
    )
    assert r.returncode == 0
    for name in ("depth", "init", "optimizers", "autodiff"):
        assert f"  {name} " in r.stdout


def test_cli_quick_init_writes_a_fresh_version(tmp_path: Path) -> None:
    (tmp_path / "init" / "version_0").mkdir(parents=True)  # an earlier run: never reused
    cmd = [sys.executable, "-m", "deepnets.experiments", "init", "--quick", "--steps", "20", "--out", str(tmp_path)]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert not any((tmp_path / "init" / "version_0").iterdir())
    out = tmp_path / "init" / "version_1"
    assert (out / "init.md").exists() and (out / "init.png").stat().st_size > 1000
    assert "agrees with the lecture?" in r.stdout and str(out) in r.stdout
    assert _noise(r.stderr) == [], r.stderr


# What a library prints about itself (deprecations, banners, advertisements): never in an experiment's output.
NOISE = ("Warning", "warn(", "deprecated", "GPU available", "TPU available", "Tip:", "litlogger", "LOCAL_RANK")


def _noise(text: str) -> list[str]:
    return [line for line in text.splitlines() if any(n in line for n in NOISE)]


@pytest.mark.parametrize("name", sorted(EXPERIMENTS))  # 4-11 s each on an idle 2-core VM
def test_every_quick_experiment_prints_no_library_noise(tmp_path: Path, name: str) -> None:
    cmd = [sys.executable, "-m", "deepnets.experiments", name, "--quick", "--out", str(tmp_path)]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # warnings as a user sees them
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    assert _noise(r.stdout + r.stderr) == [], r.stdout + r.stderr


def test_cli_bad_flag_is_one_error_line_and_writes_nothing(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deepnets.experiments", "init", "--every", "0", "--out", str(tmp_path / "runs")]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: --every: must be >= 1, got 0"]
    assert not (tmp_path / "runs").exists()


def test_double_descent_bad_override_is_one_error_line_and_writes_nothing(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deepnets.experiments", "double_descent", "--threads", "bogus", "--ridge"]
    r = subprocess.run([*cmd, "--out", str(tmp_path / "runs")], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines() == ["error: trainer.threads: expected int or auto, got 'bogus'"]
    assert not (tmp_path / "runs").exists()
