"""Optimisers: momentum on ill-conditioned quadratics, per-coordinate steps, Adam's failure, input whitening.

Four measurements, all with `torch.optim`'s own optimisers:

(a) f(x) = x^T A x / 2 with A's eigenvalues log-spaced in [mu, L] = [1, kappa].
    Iterations until ||x_t - x*|| <= tol ||x_0 - x*|| with the step sizes theory
    prescribes: gradient descent (alpha = 2 / (L + mu)) needs ~kappa ln(1/tol) / 2;
    Polyak's heavy ball (alpha = 4 / (sqrt L + sqrt mu)^2, beta = ((sqrt kappa - 1) /
    (sqrt kappa + 1))^2) and Nesterov (alpha = 1 / L, beta = (sqrt kappa - 1) / (sqrt
    kappa + 1)) need ~sqrt(kappa) ln(1/tol). The slopes of log(iterations) vs
    log(kappa) are fitted: ~1 and ~1/2.
(b) Least squares with badly scaled features (feature j multiplied by s_j, s log-
    spaced over `--scale-decades` decades): plain SGD (full batch) against AdaGrad,
    RMSprop and Adam, each at its best learning rate from one grid: steps until
    the excess loss is below a fraction of where it started. Plain GD's step is
    capped by the largest scale and crawls along the smallest; the per-coordinate
    methods divide each coordinate's step by its own gradient scale.
(c) Reddi, Kale & Kumar (2018, "On the convergence of Adam and beyond", Thm. 1):
    online f_t(x) = C x when t mod 3 = 1, -x otherwise, x in [-1, 1], C = 3; the
    best fixed point is x = -1. Adam (beta1 = 0, beta2 = 1 / (1 + C^2), step
    alpha / sqrt(t), projected onto [-1, 1] after each step) drifts to x = +1, the
    worst point, because the rare large gradient C is forgotten by the fast
    second-moment average; AMSGrad (`amsgrad=True`, the same betas) keeps the
    maximum of the second moments and goes to -1.
(d) Digits through the framework's own pipeline (`deepnets.data.load_splits` with
    `data.standardize` / `data.whiten`): SGD steps until the training loss of a
    zoo MLP reaches a fixed value, with raw pixels, standardised pixels and ZCA-
    whitened pixels, each at its best learning rate from one grid.

    python -m deepnets.experiments optimizers [--quick]

Writes into `<out>/optimizers/version_<n>/`: `quadratic.png` + `quadratic.{csv,md}`,
`scaling.png` + `scaling.{csv,md}`, `adam_failure.png` + `adam_failure.{csv,md}`,
`preprocessing.png` + `preprocessing.{csv,md}`, `summary.{csv,md}` (one row per
claim, with whether it agrees with the lecture); prints the summary.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from deepnets.config import DataConfig
from deepnets.data import load_splits
from deepnets.errors import UserError
from deepnets.experiments.common import base_parser, new_run_dir, plt, save_figure, torch_threads, verdict, write_table
from deepnets.models import build_model

DTYPE = torch.float64


@dataclass
class Sizes:
    """Problem sizes of one run (`--quick` shrinks them)."""

    kappas: tuple[float, ...] = (10, 30, 100, 300, 1000, 3000, 10000)
    quad_dim: int = 50
    quad_tol: float = 1e-6
    scale_n: int = 500
    scale_d: int = 20
    scale_decades: float = 3.0
    scale_steps: int = 3000
    scale_target: float = 1e-3  # excess loss relative to the start
    scale_lrs: tuple[float, ...] = tuple(float(v) for v in np.logspace(-4, 2, 13))
    reddi_steps: int = 30000
    prep_max_steps: int = 3000
    prep_target: float = 0.1  # training cross-entropy
    prep_lrs: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
    prep_every: int = 10


QUICK = Sizes(
    kappas=(10, 100, 1000),
    quad_dim=20,
    scale_n=200,
    scale_d=10,
    scale_decades=2.0,
    scale_steps=600,
    scale_target=1e-2,
    scale_lrs=(1e-3, 1e-2, 1e-1, 1.0),
    reddi_steps=3000,
    prep_max_steps=400,
    prep_target=0.3,
    prep_lrs=(0.03, 0.3),
)


# ---------------------------------------------------------------- (a) momentum on a quadratic


def quadratic_methods(kappa: float) -> dict[str, dict[str, Any]]:
    """torch.optim.SGD settings for each method at the theory's step sizes (mu = 1, L = kappa).

    torch's momentum buffer v <- beta v + g, x <- x - alpha v is Polyak's heavy
    ball x+ = x - alpha g + beta (x - x-); with nesterov=True it is Nesterov's
    method in Sutskever et al.'s (2013) form.
    """
    mu, L = 1.0, float(kappa)
    q = (math.sqrt(kappa) - 1) / (math.sqrt(kappa) + 1)
    return {
        "gradient descent": {"lr": 2 / (L + mu)},
        "heavy ball": {"lr": 4 / (math.sqrt(L) + math.sqrt(mu)) ** 2, "momentum": q**2},
        "nesterov": {"lr": 1 / L, "momentum": q, "nesterov": True},
    }


def iterations_to_tol(kappa: float, dim: int, tol: float, settings: dict[str, Any], cap: int) -> int | None:
    """Steps of torch.optim.SGD(**settings) on diag(lambda) until ||x|| <= tol ||x_0|| (None: not within cap)."""
    lam = torch.logspace(0, math.log10(kappa), dim, dtype=DTYPE)  # (d,): mu = 1 ... L = kappa
    x = torch.ones(dim, dtype=DTYPE, requires_grad=True)  # x* = 0
    opt = torch.optim.SGD([x], **settings)
    x0 = float(x.detach().norm())
    for t in range(1, cap + 1):
        opt.zero_grad()
        (0.5 * (lam * x * x).sum()).backward()
        opt.step()
        if float(x.detach().norm()) <= tol * x0:
            return t
    return None


def quadratic(kappas: tuple[float, ...], dim: int, tol: float) -> tuple[list[dict[str, Any]], dict[str, float]]:
    rows = []
    for kappa in kappas:
        cap = int(10 * kappa * math.log(1 / tol)) + 100  # 20x what GD's rate bound needs
        for method, settings in quadratic_methods(kappa).items():
            it = iterations_to_tol(kappa, dim, tol, settings, cap)
            rows.append(
                {
                    "kappa": kappa,
                    "method": method,
                    "lr": settings["lr"],
                    "momentum": settings.get("momentum", 0.0),
                    "iterations": it if it is not None else f"> {cap}",
                    "iterations / sqrt(kappa)": it / math.sqrt(kappa) if it else "",
                    "iterations / kappa": it / kappa if it else "",
                }
            )
    slopes = {}
    for method in ("gradient descent", "heavy ball", "nesterov"):
        pts = [
            (r["kappa"], r["iterations"]) for r in rows if r["method"] == method and isinstance(r["iterations"], int)
        ]
        if len(pts) >= 2:
            k, it = np.log(np.array(pts, dtype=float)).T
            slopes[method] = float(np.polyfit(k, it, 1)[0])
    return rows, slopes


def plot_quadratic(rows: list[dict[str, Any]], slopes: dict[str, float], tol: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for method, marker in (("gradient descent", "o-"), ("heavy ball", "s-"), ("nesterov", "^-")):
        pts = [r for r in rows if r["method"] == method and isinstance(r["iterations"], int)]
        ax.loglog(
            [r["kappa"] for r in pts],
            [r["iterations"] for r in pts],
            marker,
            label=f"{method}: slope {slopes.get(method, math.nan):.2f}",
        )
    ks = np.array(sorted({r["kappa"] for r in rows}), dtype=float)
    ax.loglog(ks, ks * math.log(1 / tol) / 2, "k:", lw=1, label="kappa ln(1/tol) / 2")
    ax.loglog(ks, np.sqrt(ks) * math.log(1 / tol), "k--", lw=1, label="sqrt(kappa) ln(1/tol)")
    ax.set(
        xlabel="condition number kappa = L / mu",
        ylabel=f"iterations to ||x - x*|| <= {tol:g} ||x0 - x*||",
        title="Ill-conditioned quadratic: GD ~ kappa, momentum ~ sqrt(kappa)",
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- (b) badly scaled features

OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "sgd (full batch)": torch.optim.SGD,
    "adagrad": torch.optim.Adagrad,
    "rmsprop": torch.optim.RMSprop,
    "adam": torch.optim.Adam,
}


def scaled_problem(n: int, d: int, decades: float, seed: int) -> tuple[Tensor, Tensor, float, Tensor]:
    """X (n, d) with column j scaled by s_j = 10^(-decades ... 0), y (n,), the least-squares optimum and s."""
    g = torch.Generator().manual_seed(seed)
    s = torch.logspace(-decades, 0, d, dtype=DTYPE)  # (d,)
    X = torch.randn(n, d, generator=g, dtype=DTYPE) * s
    w_true = torch.randn(d, generator=g, dtype=DTYPE) / s  # every feature matters equally
    y = X @ w_true + 0.1 * torch.randn(n, generator=g, dtype=DTYPE)
    w_opt = torch.linalg.lstsq(X, y[:, None]).solution[:, 0]
    loss_opt = float(0.5 * ((X @ w_opt - y) ** 2).mean())
    return X, y, loss_opt, s


def steps_to_excess(
    make: Callable[..., torch.optim.Optimizer],
    lr: float,
    X: Tensor,
    y: Tensor,
    loss_opt: float,
    target: float,
    steps: int,
) -> tuple[int | None, list[float]]:
    """Full-batch steps until (loss - loss*) <= target (loss_0 - loss*); the excess-loss curve."""
    w = torch.zeros(X.shape[1], dtype=DTYPE, requires_grad=True)
    opt = make([w], lr=lr)
    curve = []
    first: int | None = None
    excess0 = None
    for t in range(steps + 1):
        opt.zero_grad()
        loss = 0.5 * ((X @ w - y) ** 2).mean()
        excess = float(loss.detach()) - loss_opt
        if not math.isfinite(excess):
            curve.append(math.inf)
            break
        excess0 = excess if excess0 is None else excess0
        curve.append(excess)
        if first is None and excess <= target * excess0:
            first = t
        if t < steps:
            loss.backward()
            opt.step()
    return first, curve


def scaling(s: Sizes, seed: int) -> tuple[list[dict[str, Any]], dict[str, list[float]], float]:
    X, y, loss_opt, _ = scaled_problem(s.scale_n, s.scale_d, s.scale_decades, seed)
    H = X.T @ X / len(X)  # (d, d) Hessian of the loss
    ev = torch.linalg.eigvalsh(H)
    kappa = float(ev[-1] / ev[0])
    rows, best_curves = [], {}
    for name, make in OPTIMIZERS.items():
        results = []
        for lr in s.scale_lrs:
            first, curve = steps_to_excess(make, lr, X, y, loss_opt, s.scale_target, s.scale_steps)
            results.append((first if first is not None else math.inf, curve[-1], lr, curve))
        # best lr: fewest steps to the target; among those that never reach it, the lowest final excess
        first, final, lr, curve = min(results, key=lambda r: (r[0], r[1] if math.isfinite(r[1]) else math.inf))
        best_curves[name] = curve
        rows.append(
            {
                "optimizer": name,
                "best lr (grid)": lr,
                f"steps to excess <= {s.scale_target:g} x start": first
                if math.isfinite(first)
                else f"> {s.scale_steps}",
                f"excess loss after {s.scale_steps} steps (relative)": final / curve[0],
            }
        )
    return rows, best_curves, kappa


def plot_scaling(curves: dict[str, list[float]], kappa: float, target: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.8))
    for name, c in curves.items():
        c0 = c[0]
        ax.semilogy(range(len(c)), [max(v / c0, 1e-16) for v in c], label=name)
    ax.axhline(target, color="gray", ls=":", lw=1)
    ax.set(
        xlabel="full-batch step",
        ylabel="(loss - loss*) / (loss_0 - loss*)",
        title=f"Badly scaled least squares (Hessian kappa = {kappa:.2g}); best lr of each",
    )
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- (c) Adam's failure (Reddi et al. 2018)


def reddi(steps: int, C: float = 3.0, alpha: float = 0.1) -> tuple[list[dict[str, Any]], dict[str, list[float]]]:
    """Adam vs AMSGrad on f_t(x) = C x (t mod 3 = 1) or -x, projected onto [-1, 1]; x_t and average regret."""
    rows, traj = [], {}
    for name, amsgrad in (("adam", False), ("amsgrad", True)):
        x = torch.zeros(1, dtype=DTYPE, requires_grad=True)
        opt = torch.optim.Adam([x], lr=alpha, betas=(0.0, 1 / (1 + C**2)), amsgrad=amsgrad)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: 1 / math.sqrt(t + 1))  # alpha / sqrt(t), t from 1
        xs, regret = [], 0.0
        for t in range(1, steps + 1):
            opt.zero_grad()
            c = C if t % 3 == 1 else -1.0
            f = c * x.sum()
            regret += float(f.detach()) - c * -1.0  # against the best fixed point x* = -1
            f.backward()
            opt.step()
            sched.step()
            with torch.no_grad():
                x.clamp_(-1.0, 1.0)  # projection onto the feasible set
            xs.append(float(x.detach()))
        traj[name] = xs
        rows.append(
            {
                "optimizer": name,
                "betas": f"(0, {1 / (1 + C**2):.3g})",
                "C": C,
                "steps": steps,
                "final x": xs[-1],
                "min x": min(xs),
                "max x": max(xs),
                "mean x, last third": float(np.mean(xs[-steps // 3 :])),
                "average regret R_T / T": regret / steps,
            }
        )
    return rows, traj


def plot_reddi(traj: dict[str, list[float]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, xs in traj.items():
        ax.semilogx(range(1, len(xs) + 1), xs, label=name)
    ax.axhline(-1, color="gray", ls=":", lw=1)
    ax.set(
        xlabel="step t",
        ylabel="x_t",
        ylim=(-1.1, 1.1),
        title="Reddi et al. (2018): f_t = 3x every third step, -x otherwise; optimum x = -1",
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- (d) standardisation and whitening


PREPROCESSING: dict[str, dict[str, Any]] = {
    "none": {"standardize": False, "whiten": "none"},
    "standardize": {"standardize": True, "whiten": "none"},
    "zca": {"standardize": False, "whiten": "zca"},
}


def steps_to_loss(
    x: Tensor, y: Tensor, lr: float, target: float, max_steps: int, every: int, seed: int
) -> tuple[int | None, list[tuple[int, float]]]:
    """SGD (batch 64) on a zoo MLP (1 hidden layer of 64); steps until the full training loss <= target."""
    torch.manual_seed(seed)
    model = build_model({"arch": "mlp", "depth": 1, "width": 64}, tuple(x.shape[1:]), 10)
    opt = torch.optim.SGD(model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)  # the same batches for every preprocessing
    curve = []
    for t in range(max_steps + 1):
        if t % every == 0:
            with torch.no_grad():
                loss = float(F.cross_entropy(model(x), y))
            curve.append((t, loss))
            if not math.isfinite(loss):
                return None, curve
            if loss <= target:
                return t, curve
        if t == max_steps:
            break
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    return None, curve


def preprocessing(s: Sizes, seed: int) -> tuple[list[dict[str, Any]], dict[str, list[tuple[int, float]]]]:
    rows, curves = [], {}
    for name, keys in PREPROCESSING.items():
        sp = load_splits(DataConfig(name="digits", **keys), seed=0)
        results = []
        for lr in s.prep_lrs:
            first, curve = steps_to_loss(
                sp.x_train, sp.y_train, lr, s.prep_target, s.prep_max_steps, s.prep_every, seed
            )
            results.append((first if first is not None else math.inf, curve[-1][1], lr, curve))
        first, last, lr, curve = min(results, key=lambda r: (r[0], r[1] if math.isfinite(r[1]) else math.inf))
        curves[name] = curve
        rows.append(
            {
                "inputs": name,
                "data config": ", ".join(f"{k}={v}" for k, v in keys.items()),
                "best lr (grid)": lr,
                f"steps to train loss <= {s.prep_target:g}": first if math.isfinite(first) else f"> {s.prep_max_steps}",
                "train loss when stopped": last,
            }
        )
    return rows, curves


def plot_preprocessing(curves: dict[str, list[tuple[int, float]]], target: float, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for name, c in curves.items():
        ax.semilogy([t for t, _ in c], [v for _, v in c], label=name)
    ax.axhline(target, color="gray", ls=":", lw=1)
    ax.set(
        xlabel="SGD step (batch 64)",
        ylabel="training loss (whole split)",
        title="Digits, 1-hidden-layer MLP: raw vs standardised vs ZCA-whitened inputs (best lr of each)",
    )
    ax.legend()
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- entry point


def _log_steps(n: int, points: int = 200) -> list[int]:
    """About `points` steps 1..n, log-spaced (the trajectory file stays small), always ending at n."""
    return sorted({int(v) for v in np.logspace(0, math.log10(n), points)} | {n})


def _steps(v: Any) -> float:
    return float(v) if isinstance(v, int) else math.inf


def run(out: Path, sizes: Sizes, seed: int = 0) -> dict[str, Any]:
    s = sizes
    quad, slopes = quadratic(s.kappas, s.quad_dim, s.quad_tol)
    write_table(quad, out / "quadratic")
    plot_quadratic(quad, slopes, s.quad_tol, out / "quadratic.png")

    scale_rows, scale_curves, scale_kappa = scaling(s, seed)
    write_table(scale_rows, out / "scaling")
    plot_scaling(scale_curves, scale_kappa, s.scale_target, out / "scaling.png")

    adam_rows, traj = reddi(s.reddi_steps)
    write_table(adam_rows, out / "adam_failure")
    write_table(
        [{"step": t, "optimizer": k, "x": xs[t - 1]} for k, xs in traj.items() for t in _log_steps(len(xs))],
        out / "adam_failure_trajectory",
    )
    plot_reddi(traj, out / "adam_failure.png")

    prep_rows, prep_curves = preprocessing(s, seed)
    write_table(prep_rows, out / "preprocessing")
    plot_preprocessing(prep_curves, s.prep_target, out / "preprocessing.png")

    gd, hb, nag = (slopes.get(m, math.nan) for m in ("gradient descent", "heavy ball", "nesterov"))
    scale_key = next(k for k in scale_rows[0] if k.startswith("steps to"))
    sgd_steps = _steps(scale_rows[0][scale_key])
    adaptive = {r["optimizer"]: _steps(r[scale_key]) for r in scale_rows[1:]}
    adam, ams = adam_rows[0]["final x"], adam_rows[1]["final x"]
    prep_key = next(k for k in prep_rows[0] if k.startswith("steps to"))
    prep = {r["inputs"]: _steps(r[prep_key]) for r in prep_rows}

    def show(v: float) -> str:
        return f"{v:.0f}" if math.isfinite(v) else "not reached"

    summary = [
        {
            "claim": "GD needs ~kappa iterations, momentum ~sqrt(kappa)",
            "measured": f"fitted slopes of log(iterations) vs log(kappa): GD {gd:.2f}, heavy ball {hb:.2f}, "
            f"Nesterov {nag:.2f} (kappa {s.kappas[0]:g} .. {s.kappas[-1]:g})",
            "agrees with the lecture?": verdict(
                abs(gd - 1) < 0.15 and abs(hb - 0.5) < 0.15 and abs(nag - 0.5) < 0.15,
                "slopes near 1 for GD and near 1/2 for both momentum methods",
            ),
        },
        {
            "claim": "per-coordinate steps (AdaGrad, RMSprop, Adam) beat plain SGD on badly scaled features",
            "measured": f"steps to the target: sgd {show(sgd_steps)}, "
            + ", ".join(f"{k} {show(v)}" for k, v in adaptive.items())
            + f" (Hessian kappa {scale_kappa:.2g})",
            "agrees with the lecture?": verdict(
                all(v < sgd_steps for v in adaptive.values()),
                "every per-coordinate method reached the target in fewer steps than SGD at its best lr"
                if all(v < sgd_steps for v in adaptive.values())
                else "not every per-coordinate method beat SGD here",
            ),
        },
        {
            "claim": "Adam converges to the worst point x = +1 (Reddi et al. 2018), AMSGrad to the optimum x = -1",
            "measured": f"after {s.reddi_steps} steps: Adam x = {adam:+.4f}, AMSGrad x = {ams:+.4f}; average regret "
            f"{adam_rows[0]['average regret R_T / T']:.3f} vs {adam_rows[1]['average regret R_T / T']:.4f}",
            "agrees with the lecture?": verdict(adam > 0.9 and ams < -0.9, "Adam ends near +1, AMSGrad near -1"),
        },
        {
            "claim": "standardised / whitened inputs train faster",
            "measured": "SGD steps to the target training loss: "
            + ", ".join(f"{k} {show(v)}" for k, v in prep.items()),
            "agrees with the lecture?": verdict(
                max(prep["zca"], prep["standardize"]) < prep["none"],
                f"both preprocessings reach it in fewer steps than raw pixels; fastest: {min(prep, key=prep.get)}"
                if max(prep["zca"], prep["standardize"]) < prep["none"]
                else "not both preprocessings beat raw pixels here",
            ),
        },
    ]
    return {
        "summary": write_table(summary, out / "summary"),
        "summary_rows": summary,
        "quadratic": quad,
        "slopes": slopes,
        "scaling": scale_rows,
        "adam": adam_rows,
        "preprocessing": prep_rows,
    }


def main(argv: list[str] | None = None) -> int:
    p = base_parser("optimizers", __doc__.splitlines()[0])
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these problems are tiny)")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise UserError(f"--threads: must be >= 1, got {args.threads}")
    out = new_run_dir(args.out, "optimizers")
    print(f"optimizers: run directory {out}")
    with torch_threads(args.threads):
        res = run(out, QUICK if args.quick else Sizes(), args.seed)
    for stem in ("quadratic", "scaling", "adam_failure", "preprocessing"):
        print(f"\n{stem}:\n{(out / f'{stem}.md').read_text()}")
    print(res["summary"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
