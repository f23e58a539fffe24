"""Implicit regularisation of gradient descent: which of many solutions plain GD picks.

Three facts, each measured:

1. Least squares with more unknowns than equations (d > n): GD from w0 with step
   size < 2 / sigma_max(X)^2 converges to the interpolating solution nearest w0,
   w0 + X^+ (y - X w0); from w0 = 0 that is the minimum-norm solution X^+ y.
   GD's iterates never leave w0 + rowspace(X), and the only interpolant there is
   that one.
2. Logistic regression on linearly separable data: ||w|| grows like log t and
   the direction w / ||w|| converges to the hard-margin SVM direction, but only
   at rate O(1 / log t) (Soudry et al., 2018, "The Implicit Bias of Gradient
   Descent on Separable Data").
3. Minimum-norm polynomial regression in the Legendre basis: test error against
   degree p rises to a peak at the interpolation threshold p + 1 = n and falls
   again beyond it: double descent in 1-D (Belkin et al., 2019).
"""

from __future__ import annotations

import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from numpy.polynomial import legendre
from torch import Tensor

from deepnets.experiments.common import base_parser, new_run_dir, plt, save_figure, write_table

DTYPE = torch.float64  # 1e-6 agreement with pinv needs more than float32's 1e-7 epsilon


@dataclass
class Sizes:
    """Problem sizes of one run (`--quick` shrinks them)."""

    ls_n: int = 50  # equations
    ls_d: int = 200  # unknowns
    ls_steps: int = 1000
    logit_n: int = 100
    logit_d: int = 5
    logit_gap: float = 0.1  # minimum distance of a point from the true separating plane
    logit_steps: int = 1_000_000
    poly_n: int = 20
    poly_noise: float = 0.2
    poly_trials: int = 20
    poly_degrees: tuple[int, ...] = (*range(1, 41), 50, 60, 80, 100, 150, 200, 300, 500, 1000)


QUICK = Sizes(
    ls_n=10,
    ls_d=30,
    ls_steps=1000,
    logit_steps=2000,
    poly_n=10,
    poly_trials=5,
    poly_degrees=(*range(1, 21), 30, 50, 100, 200),
)


# ---------------------------------------------------------------- least squares


def gd_least_squares(
    X: Tensor, y: Tensor, w0: Tensor, steps: int, targets: dict[str, Tensor], lr: float | None = None
) -> tuple[Tensor, dict[str, list[float]]]:
    """GD on L(w) = ||X w - y||^2 / 2 from w0; relative distance to each target after every step.

    Default step size 1 / sigma_max(X)^2, inside the stable range (0, 2 / sigma_max^2).
    """
    if lr is None:
        lr = 1.0 / torch.linalg.matrix_norm(X, 2).item() ** 2
    w = w0.clone()  # (d,)
    hist: dict[str, list[float]] = {k: [] for k in targets}
    for _ in range(steps + 1):
        for k, t in targets.items():
            hist[k].append(((w - t).norm() / t.norm()).item())
        w = w - lr * X.T @ (X @ w - y)  # grad = X^T (X w - y)
    return w, hist


def least_squares(n: int, d: int, steps: int, seed: int) -> tuple[list[dict[str, object]], dict]:
    """GD from 0 and from a random w0 on an underdetermined system; rows for the table + histories."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, d, generator=g, dtype=DTYPE)  # (n, d), d > n
    y = torch.randn(n, generator=g, dtype=DTYPE)  # (n,)
    w0 = torch.randn(d, generator=g, dtype=DTYPE)
    X_pinv = torch.linalg.pinv(X)  # (d, n)
    targets = {
        "min-norm X^+ y": X_pinv @ y,
        "nearest w0: w0 + X^+(y - X w0)": w0 + X_pinv @ (y - X @ w0),
    }
    sigma_max = torch.linalg.matrix_norm(X, 2).item()
    rows, hists = [], {}
    for start, w_init in (("0", torch.zeros(d, dtype=DTYPE)), ("w0", w0)):
        w, hist = gd_least_squares(X, y, w_init, steps, targets)
        hists[start] = hist
        rows.append(
            {
                "start": start,
                "n": n,
                "d": d,
                "steps": steps,
                "lr * sigma_max^2": 1.0,
                "rel dist to min-norm": hist["min-norm X^+ y"][-1],
                "rel dist to nearest-w0": hist["nearest w0: w0 + X^+(y - X w0)"][-1],
                "residual ||Xw - y||": (X @ w - y).norm().item(),
                "||w - w_start||": (w - w_init).norm().item(),
                "||w||": w.norm().item(),
            }
        )
    return rows, {"hists": hists, "sigma_max": sigma_max}


def plot_least_squares(hists: dict[str, dict[str, list[float]]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for start, style in (("0", "-"), ("w0", "--")):
        for target, h in hists[start].items():
            ax.semilogy(h, style, label=f"GD from {start}  vs  {target}")
    ax.set_xlabel("GD step")
    ax.set_ylabel("||w_t - target|| / ||target||")
    ax.set_title("Least squares, d > n: GD converges to the solution nearest its start")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- logistic regression


def separable_data(n: int, d: int, gap: float, seed: int) -> tuple[Tensor, Tensor]:
    """n Gaussian points in R^d labelled by a random plane through 0, none closer than `gap` to it."""
    g = torch.Generator().manual_seed(seed)
    w_true = torch.randn(d, generator=g, dtype=DTYPE)
    X = torch.empty(0, d, dtype=DTYPE)
    while len(X) < n:  # rejection sampling keeps a strictly positive margin
        cand = torch.randn(4 * n, d, generator=g, dtype=DTYPE)
        X = torch.cat([X, cand[(cand @ w_true).abs() / w_true.norm() > gap]])
    X = X[:n]  # (n, d)
    return X, torch.sign(X @ w_true)  # labels in {-1, +1}


def svm_direction(X: Tensor, y: Tensor) -> Tensor:
    """Unit hard-margin SVM normal without intercept: argmax_{||w||=1} min_i y_i <w, x_i>.

    libsvm always fits an intercept; on the mirrored set {(x, y), (-x, -y)} the
    optimal intercept is 0 by symmetry, so its w is the no-intercept solution.
    A huge C makes the soft margin hard.
    """
    from sklearn.svm import SVC  # slow import (scipy); only this part needs it

    Xs = torch.cat([X, -X]).numpy()
    ys = torch.cat([y, -y]).numpy()
    svm = SVC(kernel="linear", C=1e10, tol=1e-10).fit(Xs, ys)
    w = torch.tensor(svm.coef_[0], dtype=DTYPE)
    return w / w.norm()


def log_spaced(steps: int, per_decade: int = 8) -> list[int]:
    """Steps 1..steps, log-spaced, for recording a slowly converging quantity."""
    pts = np.logspace(0, math.log10(steps), per_decade * max(1, round(math.log10(steps))) + 1)
    return sorted({*pts.round().astype(int).tolist(), steps})


def gd_logistic(X: Tensor, y: Tensor, steps: int, w_svm: Tensor) -> list[dict[str, float]]:
    """GD from 0 on L(w) = sum_i log(1 + exp(-y_i <w, x_i>)); record direction vs the SVM's.

    Step size 1 / beta with beta = sigma_max(X)^2 / 4 the smoothness of L,
    inside Soudry et al.'s condition eta < 2 / beta.
    """
    Z = y[:, None] * X  # (n, d): rows y_i x_i
    lr = 4.0 / torch.linalg.matrix_norm(X, 2).item() ** 2
    svm_margin = (Z @ w_svm).min().item()
    record = set(log_spaced(steps))
    w = torch.zeros(X.shape[1], dtype=DTYPE)
    out = []
    for t in range(1, steps + 1):
        w += lr * Z.T @ torch.sigmoid(-(Z @ w))  # -grad L = sum_i y_i x_i sigma(-y_i <w, x_i>)
        if t in record:
            u = w / w.norm()
            out.append(
                {
                    "step": t,
                    "cos(w, w_svm)": (u @ w_svm).item(),
                    "1 - cos": 1.0 - (u @ w_svm).item(),
                    "normalised margin": (Z @ u).min().item(),
                    "svm margin": svm_margin,
                    "||w||": w.norm().item(),
                    "loss": torch.nn.functional.softplus(-(Z @ w)).sum().item(),
                }
            )
    return out


def plot_logistic(hist: list[dict[str, float]], path: Path) -> Path:
    t = [h["step"] for h in hist]
    fig, (a, b, c) = plt.subplots(1, 3, figsize=(14, 4.2))
    a.semilogx(t, [h["cos(w, w_svm)"] for h in hist], "o-", ms=3)
    a.axhline(1.0, color="k", lw=0.8, ls=":")
    a.set(xlabel="GD step t", ylabel="cos(w_t, w_SVM)", title="Direction of w_t vs hard-margin SVM")
    b.loglog(t, [h["1 - cos"] for h in hist], "o-", ms=3)
    b.set(xlabel="GD step t", ylabel="1 - cos", title="Angle gap 1 - cos (log-log)")
    c.semilogx(t, [h["normalised margin"] for h in hist], "o-", ms=3, label="min_i y_i <x_i, w_t>/||w_t||")
    c.axhline(hist[0]["svm margin"], color="k", ls="--", label="SVM margin")
    c.set(xlabel="GD step t", ylabel="margin", title="Normalised margin creeps up to the SVM's")
    c.set_ylim(bottom=max(0.0, min(h["normalised margin"] for h in hist)))
    c.legend(fontsize=8)
    for ax in (a, b, c):
        ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- Legendre double descent


def target_fn(x: np.ndarray) -> np.ndarray:
    return np.sin(np.pi * x) + 0.5 * np.cos(3 * x)


def legendre_double_descent(
    n: int, degrees: Sequence[int], noise: float, trials: int, seed: int
) -> list[dict[str, float]]:
    """Min-norm least squares on Legendre features P_0..P_p of n noisy samples, for each degree p.

    Per degree: median (and quartiles) over `trials` training sets of the test
    MSE on a dense grid of [-1, 1], and the median train MSE.
    """
    rng = np.random.default_rng(seed)
    x_test = np.linspace(-1, 1, 1001)
    f_test = torch.from_numpy(target_fn(x_test))
    test = np.empty((trials, len(degrees)))
    train = np.empty((trials, len(degrees)))
    for i in range(trials):
        x = rng.uniform(-1, 1, n)
        y = torch.from_numpy(target_fn(x) + noise * rng.standard_normal(n))  # (n,)
        for j, p in enumerate(degrees):
            Phi = torch.from_numpy(legendre.legvander(x, p))  # (n, p + 1)
            w = torch.linalg.pinv(Phi) @ y  # min-norm interpolant once p + 1 >= n
            pred = torch.from_numpy(legendre.legvander(x_test, p)) @ w
            test[i, j] = ((pred - f_test) ** 2).mean().item()
            train[i, j] = ((Phi @ w - y) ** 2).mean().item()
    q25, q50, q75 = np.quantile(test, [0.25, 0.5, 0.75], axis=0)
    return [
        {
            "degree": p,
            "params": p + 1,
            "train mse (median)": float(np.median(train[:, j])),
            "test mse (median)": float(q50[j]),
            "test mse q25": float(q25[j]),
            "test mse q75": float(q75[j]),
        }
        for j, p in enumerate(degrees)
    ]


def plot_legendre(rows: list[dict[str, float]], n: int, path: Path) -> Path:
    p = [r["params"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.loglog(p, [r["test mse (median)"] for r in rows], "o-", ms=3, label="test MSE (median)")
    ax.fill_between(p, [r["test mse q25"] for r in rows], [r["test mse q75"] for r in rows], alpha=0.25)
    train = [max(r["train mse (median)"], 1e-30) for r in rows]  # exact 0 has no log
    ax.loglog(p, train, "s-", ms=3, label="train MSE (median)")
    ax.axvline(n, color="k", ls="--", label=f"interpolation threshold p + 1 = n = {n}")
    bottom = min(r["test mse q25"] for r in rows) / 10
    ax.set_ylim(bottom=bottom)
    ax.annotate("train MSE ~ 0 from here on", (n, bottom), xytext=(6, 6), textcoords="offset points", fontsize=8)
    ax.set(xlabel="parameters (degree + 1)", ylabel="MSE", title="Min-norm Legendre regression: double descent")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- entry point


def run(out: Path, sizes: Sizes, seed: int = 0) -> dict[str, object]:
    """Run all three parts into the run directory `out`; return the summary rows and tables."""
    s = sizes
    ls_rows, ls = least_squares(s.ls_n, s.ls_d, s.ls_steps, seed)
    write_table(ls_rows, out / "least_squares")
    plot_least_squares(ls["hists"], out / "least_squares.png")

    X, y = separable_data(s.logit_n, s.logit_d, s.logit_gap, seed)
    w_svm = svm_direction(X, y)
    logit = gd_logistic(X, y, s.logit_steps, w_svm)
    write_table(logit, out / "logistic")
    plot_logistic(logit, out / "logistic.png")

    poly = legendre_double_descent(s.poly_n, s.poly_degrees, s.poly_noise, s.poly_trials, seed)
    write_table(poly, out / "legendre")
    plot_legendre(poly, s.poly_n, out / "legendre.png")

    peak = max(poly, key=lambda r: r["test mse (median)"])
    under = [r for r in poly if r["params"] < s.poly_n]
    best_under = min(under, key=lambda r: r["test mse (median)"])
    last = poly[-1]
    summary = [
        {
            "experiment": "least squares GD from 0",
            "measured": f"rel dist to X^+ y = {ls_rows[0]['rel dist to min-norm']:.2e}",
            "after": f"{s.ls_steps} steps (n={s.ls_n}, d={s.ls_d})",
        },
        {
            "experiment": "least squares GD from w0",
            "measured": f"rel dist to w0 + X^+(y - X w0) = {ls_rows[1]['rel dist to nearest-w0']:.2e}; "
            f"to X^+ y = {ls_rows[1]['rel dist to min-norm']:.3f}",
            "after": f"{s.ls_steps} steps",
        },
        {
            "experiment": "logistic GD direction",
            "measured": f"cos(w, w_SVM) = {logit[0]['cos(w, w_svm)']:.4f} -> {logit[-1]['cos(w, w_svm)']:.6f}; "
            f"margin {logit[-1]['normalised margin']:.4f} vs SVM {logit[-1]['svm margin']:.4f}",
            "after": f"steps 1 -> {s.logit_steps} (n={s.logit_n}, d={s.logit_d})",
        },
        {
            "experiment": "Legendre min-norm regression",
            "measured": f"test MSE peak {peak['test mse (median)']:.3g} at degree {peak['degree']}; "
            f"best below threshold {best_under['test mse (median)']:.3g} (degree {best_under['degree']}); "
            f"degree {last['degree']}: {last['test mse (median)']:.3g}",
            "after": f"n={s.poly_n}, noise={s.poly_noise}, median of {s.poly_trials} trials",
        },
    ]
    md = write_table(summary, out / "summary")
    return {"summary": md, "least_squares": ls_rows, "logistic": logit, "legendre": poly}


def main(argv: list[str] | None = None) -> int:
    args = base_parser("implicit", __doc__.splitlines()[0]).parse_args(argv)
    out = new_run_dir(args.out, "implicit")
    res = run(out, QUICK if args.quick else Sizes(), args.seed)
    print(res["summary"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
