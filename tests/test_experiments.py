"""Fast versions of the experiments: the mathematical facts they show, and the files they write."""

from __future__ import annotations

import csv
import itertools
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from deepnets.experiments import autodiff, implicit
from deepnets.experiments.common import new_run_dir, write_table

CPU = torch.device("cpu")


# ---------------------------------------------------------------- common + CLI


def test_new_run_dir_never_reuses_a_version(tmp_path: Path) -> None:
    assert new_run_dir(tmp_path, "exp").name == "version_0"
    assert new_run_dir(tmp_path, "exp").name == "version_1"
    (tmp_path / "exp" / "version_7").mkdir()
    assert new_run_dir(tmp_path, "exp").name == "version_8"


def test_write_table_csv_and_markdown(tmp_path: Path) -> None:
    md = write_table([{"a": 1, "b": 0.123456789}, {"a": 2, "c": "x"}], tmp_path / "t")
    assert md.splitlines()[0] == "| a | b | c |"
    assert "0.1235" in md
    rows = _csv_rows(tmp_path / "t.csv")
    assert rows[0]["b"] == "0.123456789" and rows[1]["c"] == "x"
    assert (tmp_path / "t.md").read_text() == md


def _csv_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "deepnets.experiments", *args], capture_output=True, text=True, timeout=120
    )


def test_cli_unknown_experiment_is_one_error_line() -> None:
    r = _cli("no_such_thing")
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: unknown experiment 'no_such_thing'")
    assert "implicit" in lines[0] and "double_descent" in lines[0]


def test_cli_help_lists_experiments() -> None:
    r = _cli("--help")
    assert r.returncode == 0
    for name in ("implicit", "autodiff", "vanishing", "double_descent"):
        assert name in r.stdout


# ---------------------------------------------------------------- implicit regularisation


def test_gd_least_squares_finds_min_norm_and_nearest_to_w0() -> None:
    rows, _ = implicit.least_squares(n=10, d=30, steps=800, seed=0)
    from_zero, from_w0 = rows
    assert from_zero["rel dist to min-norm"] < 1e-6  # vs torch.linalg.pinv
    assert from_w0["rel dist to nearest-w0"] < 1e-6
    assert from_w0["rel dist to min-norm"] > 0.1  # a different interpolant
    assert from_zero["residual ||Xw - y||"] < 1e-8


def test_nearest_to_w0_minimises_distance_among_interpolants() -> None:
    g = torch.Generator().manual_seed(1)
    X = torch.randn(8, 20, generator=g, dtype=torch.float64)
    y = torch.randn(8, generator=g, dtype=torch.float64)
    w0 = torch.randn(20, generator=g, dtype=torch.float64)
    w, _ = implicit.gd_least_squares(X, y, w0, 800, targets={})
    null = torch.eye(20, dtype=torch.float64) - torch.linalg.pinv(X) @ X  # projector onto null(X)
    assert (null @ (w - w0)).norm() < 1e-8  # GD never moves along null(X)
    for _ in range(5):  # every other interpolant w + v, X v = 0, is farther from w0
        v = null @ torch.randn(20, generator=g, dtype=torch.float64)
        assert (X @ (w + v) - y).norm() < 1e-8
        assert (w + v - w0).norm() > (w - w0).norm()


def test_logistic_gd_direction_approaches_svm() -> None:
    X, y = implicit.separable_data(n=100, d=5, gap=0.1, seed=0)
    w_svm = implicit.svm_direction(X, y)
    assert (y * (X @ w_svm)).min() > 0  # separates the data
    hist = implicit.gd_logistic(X, y, steps=1000, w_svm=w_svm)
    cos = [h["cos(w, w_svm)"] for h in hist]
    assert all(b >= a - 1e-12 for a, b in itertools.pairwise(cos))  # monotone here
    assert cos[-1] > 0.99 and cos[-1] > cos[0]
    margins = [h["normalised margin"] for h in hist]
    assert margins[-1] <= hist[0]["svm margin"] + 1e-9  # the SVM's margin is the max
    assert margins[-1] > margins[len(margins) // 2]


def test_legendre_double_descent_peaks_at_interpolation_threshold() -> None:
    n = 10
    degrees = (*range(1, 16), 30, 60, 120)
    rows = implicit.legendre_double_descent(n, degrees, noise=0.2, trials=5, seed=0)
    test = {r["degree"]: r["test mse (median)"] for r in rows}
    peak = max(test, key=test.get)
    assert abs(peak - (n - 1)) <= 1
    assert test[120] < test[peak] / 100  # second descent
    assert min(test[d] for d in range(1, n - 2)) < test[peak] / 100
    assert all(r["train mse (median)"] < 1e-12 for r in rows if r["params"] >= n)  # interpolates


def test_implicit_run_writes_tables_and_pngs(tmp_path: Path) -> None:
    sizes = replace(implicit.QUICK, ls_steps=300, logit_steps=300, poly_trials=2, poly_degrees=(1, 5, 9, 12, 40))
    res = implicit.run(tmp_path, sizes, seed=0)
    for stem in ("least_squares", "logistic", "legendre"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000
        assert (tmp_path / f"{stem}.md").exists()
    assert len(_csv_rows(tmp_path / "legendre.csv")) == 5
    assert len(_csv_rows(tmp_path / "least_squares.csv")) == 2
    assert "least squares GD from 0" in res["summary"]


# ---------------------------------------------------------------- autodiff


def test_relu_table_is_what_pytorch_computes() -> None:
    rows = {r["f"]: r for r in autodiff.relu_table()}
    # PyTorch's relu'(0) = 0 makes the chain rule give these, although every f_i(x) = x.
    assert {f: r["autograd (reverse)"] for f, r in rows.items()} == {"f1": 1.0, "f2": 0.0, "f3": 10.0, "f4": 0.0}
    assert {f: r["jacfwd (forward)"] for f, r in rows.items()} == {"f1": 1.0, "f2": 0.0, "f3": 10.0, "f4": 0.0}
    assert all(r["central difference"] == pytest.approx(1.0) for r in rows.values())
    for f in ("f2", "f3", "f4"):  # AD is right away from the kink
        fn = autodiff.relu_functions()[f][1]
        x = torch.tensor(0.3, requires_grad=True)
        assert torch.autograd.grad(fn(x), x)[0].item() == pytest.approx(1.0)


def test_jacfwd_and_jacrev_agree_and_are_timed() -> None:
    rows = autodiff.jacobian_timing((2, 16), hidden=8, min_time=0.001, seed=0)
    assert len(rows) == 4
    assert all(r["jacfwd ms"] > 0 and r["jacrev ms"] > 0 for r in rows)


def test_checkpointing_reduces_activation_memory() -> None:
    rows = {r["variant"]: r for r in autodiff.checkpointing_memory(8, 64, 256, (4,), 1, CPU, seed=0)}
    none = rows["none"]["held after forward MiB"]
    assert none > 0
    # Linear-BN-ReLU: recomputing each layer drops the BN input, keeps the layer input
    assert rows["model.checkpointing (per layer)"]["held after forward MiB"] < 0.7 * none
    assert rows["checkpoint_sequential, 4 segments"]["held after forward MiB"] < 0.6 * none


@pytest.mark.parametrize("name", ["mlp (Linear-BN-act)", "skipnet", "resmlp preact", "densemlp"])
def test_gradcheck_fc_blocks(name: str) -> None:
    assert autodiff.gradcheck_block(name, fast=True, seed=0)["gradcheck"] == "pass"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(autodiff.GRADCHECK_MODELS))
def test_gradcheck_every_block_full(name: str) -> None:
    assert autodiff.gradcheck_block(name, fast=False, seed=0)["gradcheck"] == "pass"


def test_finite_differences_v_curve_and_ad_beats_it() -> None:
    curve, best = autodiff.finite_difference_errors(seed=0)
    by = {(r["dtype"], r["scheme"]): r for r in best}
    for dtype, eps in (("float32", 1.2e-7), ("float64", 2.2e-16)):
        fwd, cen = by[(dtype, "forward")], by[(dtype, "central")]
        assert cen["min rel error"] < fwd["min rel error"]  # O(h^2) vs O(h) truncation
        assert 1e-3 * eps**0.5 < fwd["best h"] < 1e3 * eps**0.5  # bottom of the V near sqrt(eps)
        assert fwd["AD rel error"] < fwd["min rel error"]
        errs = [r["rel error"] for r in curve if r["dtype"] == dtype and r["scheme"] == "forward"]
        assert errs[0] > 100 * fwd["min rel error"] and errs[-1] > 100 * fwd["min rel error"]  # a V


def test_autodiff_run_writes_tables_and_pngs(tmp_path: Path) -> None:
    sizes = replace(
        autodiff.QUICK,
        jac_dims=(2, 8),
        jac_hidden=8,
        jac_min_time=0.001,
        ckpt_depth=4,
        ckpt_width=16,
        ckpt_batch=32,
        ckpt_segments=(2,),
        ckpt_reps=1,
        gradcheck_models=("densemlp",),
    )
    res = autodiff.run(tmp_path, sizes, CPU, seed=0)
    for stem in ("jacfwd_vs_jacrev", "checkpointing_cpu", "finite_differences"):
        assert (tmp_path / f"{stem}.png").stat().st_size > 1000
    assert len(_csv_rows(tmp_path / "relu_at_zero.csv")) == 4
    assert len(_csv_rows(tmp_path / "jacfwd_vs_jacrev.csv")) == 4
    assert len(_csv_rows(tmp_path / "checkpointing_cpu.csv")) == 3
    assert "ReLU at 0" in res["summary"]
