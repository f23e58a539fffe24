"""Double descent over model width: test error peaks where the net first interpolates, then falls again.

A 2-layer ReLU net (`configs/double_descent.yaml`: 1,000 digits, 20% of the
training labels flipped, Adam without weight decay or early stopping, the
final weights tested) is trained at every width of the config's sweep, for
several seeds. Small nets cannot fit the noisy labels and underfit; as the
width grows the training error reaches zero, and the first nets that manage
it must bend around every flipped label, so their test error peaks there
(the interpolation threshold). Wider nets interpolate too, but gradient
descent finds smoother interpolants among their many, and the test error
falls again (Belkin et al. 2019, "Reconciling modern machine-learning
practice and the classical bias-variance trade-off"; Nakkiran et al. 2020,
"Deep Double Descent"). With `--ridge` the same sweep runs again with tuned
weight decay (`configs/double_descent_ridge.yaml`) and the peak flattens
(Nakkiran et al. 2021, "Optimal Regularization Can Mitigate Double Descent").

    python -m deepnets.experiments double_descent [--ridge] [--quick] [--seeds 0,1,2]

Every sweep runs with `sweep.vectorize: true` (its points trained together as one stacked model, exactly as
one by one; pass `sweep.vectorize=false` to run them one by one).

The threshold is marked where it is measured: the smallest width whose mean
training error is at most `--interp-tol` (1%). The rule of thumb
parameters = n x classes is exact for random features with a trained linear
head (k features x K outputs interpolate n samples at k = n); when both
layers train, as here, the net interpolates with fewer parameters, so that
line is drawn dotted for reference only.

Writes into `<out>/double_descent/version_<n>/`: each sweep's directory
(`<config name>/sweep_0/`, with one run directory per width and seed,
results.{csv,md} and sweep.png), `double_descent.png` and
`double_descent.{csv,md}` (one row per width: mean train/test error, test
min-max over seeds); prints the table.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from deepnets.config import Config, load_config
from deepnets.errors import UserError
from deepnets.experiments.common import base_parser, new_run_dir, plt, save_figure, write_table
from deepnets.sweep import sweep

WIDTH_KEY = "model.width"

# --quick: seconds, not minutes; only checks that everything runs and is written
QUICK = [
    "data.train_size=100",
    "trainer.max_epochs=2",
    "sweep.params={model.width: [4, 64]}",
    "sweep.seeds=[0]",
]


@dataclass
class Curve:
    """One sweep summarised per width: parameters, mean train/test error and the test spread over seeds."""

    label: str
    width: list[int]
    params: list[int]
    train: list[float]
    test: list[float]
    test_min: list[float]
    test_max: list[float]
    failed: int  # runs that did not end ok

    def threshold(self, tol: float) -> int | None:
        """Index of the smallest width whose mean training error is <= tol (None: never interpolates)."""
        return next((i for i, e in enumerate(self.train) if e <= tol), None)

    def peak(self, tol: float) -> int:
        """Index of the highest test error past the under-parameterised sweet spot.

        The sweet spot is the lowest test error up to the threshold (the whole
        curve if it never interpolates); the tiniest nets' underfitting error
        left of it is the classical U's left arm, not the double-descent peak.
        """
        t = self.threshold(tol)
        end = len(self.test) if t is None else t + 1
        sweet = min(range(end), key=lambda i: self.test[i])
        return max(range(sweet, len(self.test)), key=lambda i: self.test[i])


def summarise(rows: Sequence[dict[str, Any]], label: str) -> Curve:
    """Mean over seeds per width of the sweep's rows (`width`, `params`, `train/error`, `test/error`)."""
    by_width: dict[int, list[dict[str, Any]]] = defaultdict(list)
    failed = 0
    for r in rows:
        if r.get("status") in ("completed", "early_stopped") and isinstance(r.get("test/error"), float):
            by_width[int(r["width"])].append(r)
        else:
            failed += 1
    c = Curve(label, [], [], [], [], [], [], failed)
    for w in sorted(by_width):
        rs = by_width[w]
        tests = [r["test/error"] for r in rs]
        trains = [r.get("train/error", math.nan) for r in rs]
        c.width.append(w)
        c.params.append(int(rs[0]["params"]))
        c.train.append(sum(trains) / len(trains))
        c.test.append(sum(tests) / len(tests))
        c.test_min.append(min(tests))
        c.test_max.append(max(tests))
    return c


def run_config(
    config: str, overrides: Sequence[str], out: Path, seeds: list[int] | None
) -> tuple[Config, list[dict[str, Any]], bool]:
    # stacked: the 12 widths x 3 seeds train as one stacked model (deepnets/stacked.py; bench/stacked.py
    # measures it against one run per point); `sweep.vectorize=false` on the command line runs them one by one
    cfg = load_config(config, ["sweep.vectorize=true", *overrides, f"output_dir={out}"])
    if list(cfg.sweep.params) != [WIDTH_KEY]:
        raise UserError(f"{config}: sweep.params must sweep {WIDTH_KEY} alone, got {list(cfg.sweep.params)}")
    if seeds is not None:
        cfg.sweep.seeds = seeds
    widths, wd = cfg.sweep.params[WIDTH_KEY], cfg.optim.weight_decay
    print(f"\n== {cfg.name}: widths {widths}, seeds {cfg.sweep.seeds}, weight_decay {wd}")
    res = sweep(cfg)
    return cfg, res.rows, res.ok


def table(curves: Sequence[Curve], tol: float) -> list[dict[str, Any]]:
    """One row per width: parameters, then each curve's train error, test error (mean, min, max)."""
    rows = []
    base = curves[0]
    for i, w in enumerate(base.width):
        row: dict[str, Any] = {"width": w, "params": base.params[i]}
        for c in curves:
            if w not in c.width:
                continue
            j = c.width.index(w)
            tag = "" if c is base else f" ({c.label})"
            row[f"train error{tag}"] = c.train[j]
            row[f"test error{tag}"] = c.test[j]
            row[f"test min{tag}"] = c.test_min[j]
            row[f"test max{tag}"] = c.test_max[j]
        marks = []
        if i == base.threshold(tol):
            marks.append("interpolation threshold")
        if i == base.peak(tol):
            marks.append("test peak")
        row["note"] = ", ".join(marks)
        rows.append(row)
    return rows


def plot(curves: Sequence[Curve], tol: float, n_times_k: int, n_seeds: int, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 5))
    colors = ["tab:red", "tab:blue", "tab:green"]
    for c, color in zip(curves, colors, strict=False):
        ax.plot(c.params, c.test, "o-", color=color, ms=4, label=f"test error ({c.label})")
        if n_seeds > 1:
            ax.fill_between(c.params, c.test_min, c.test_max, color=color, alpha=0.15)
        ax.plot(c.params, c.train, "s--", color=color, ms=3, alpha=0.8, label=f"train error ({c.label})")
    base = curves[0]
    t = base.threshold(tol)
    if t is not None:
        ax.axvline(base.params[t], color="black", lw=1.2)
        ax.annotate(
            f"interpolation threshold\n(train error <= {tol:.0%}: {base.params[t]:,} params)",
            xy=(base.params[t], 0.97),
            xycoords=("data", "axes fraction"),
            xytext=(4, 0),
            textcoords="offset points",
            va="top",
            fontsize=8,
        )
    ax.axvline(n_times_k, color="gray", ls=":", lw=1.2)
    ax.annotate(
        f"n x classes = {n_times_k:,}\n(random-features threshold)",
        xy=(n_times_k, 0.80),
        xycoords=("data", "axes fraction"),
        xytext=(4, 0),
        textcoords="offset points",
        va="top",
        fontsize=8,
        color="dimgray",
    )
    ax.set_xscale("log")
    ax.set_xlabel("parameters (2-layer ReLU net, width k: 75k + 10)")
    ax.set_ylabel("error")
    spread = f"; band: test min-max over {n_seeds} seeds" if n_seeds > 1 else ""
    ax.set_title(f"Double descent over width (mean{spread})", fontsize=10)
    ax.set_ylim(bottom=0)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper right", bbox_to_anchor=(1.0, 0.72))
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    p = base_parser("double_descent", __doc__.splitlines()[0])
    p.add_argument("--config", default="double_descent", help="the width sweep (default configs/double_descent.yaml)")
    p.add_argument("--ridge", action="store_true", help="also run the weight-decay sweep and overlay it")
    p.add_argument("--ridge-config", default="double_descent_ridge", help="(default configs/double_descent_ridge)")
    p.add_argument("--seeds", default=None, help="comma-separated seeds (default: the config's sweep.seeds)")
    p.add_argument("--interp-tol", type=float, default=0.01, help="train error counted as interpolation (0.01)")
    p.add_argument(
        "--threads", default="auto", help="trainer.threads of every run (default auto: 1 per net, 2 for the stacked 36)"
    )
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="applied to every config")
    args = p.parse_args(argv)
    overrides = [*(QUICK if args.quick else []), f"trainer.threads={args.threads}", *args.overrides]
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else None

    for name in [args.config, *([args.ridge_config] if args.ridge else [])]:  # bad input: one line, nothing written
        load_config(name, ["sweep.vectorize=true", *overrides])
    out = new_run_dir(args.out, "double_descent")
    print(f"double descent: run directory {out}")
    cfg, rows, ok = run_config(args.config, overrides, out, seeds)
    curves = [summarise(rows, "no weight decay")]
    if args.ridge:
        rcfg, rrows, rok = run_config(args.ridge_config, overrides, out, seeds)
        curves.append(summarise(rrows, f"weight decay {rcfg.optim.weight_decay:g}"))
        ok &= rok

    base = curves[0]
    if not base.width:
        print("no run finished; nothing to plot")
        return 1
    from deepnets.data import InMemoryDataModule, load_splits

    n = len(load_splits(cfg.data, cfg.seed).y_train)
    n_times_k = n * InMemoryDataModule(cfg.data, cfg.seed).num_classes
    md = write_table(table(curves, args.interp_tol), out / "double_descent")
    fig = plot(curves, args.interp_tol, n_times_k, len(cfg.sweep.seeds), out / "double_descent.png")
    print()
    print(md)
    t, pk = base.threshold(args.interp_tol), base.peak(args.interp_tol)
    where = f"width {base.width[t]} ({base.params[t]:,} params)" if t is not None else "not reached"
    print(f"n = {n} training samples, {cfg.data.label_noise:.0%} labels flipped; n x classes = {n_times_k:,}")
    print(f"interpolation threshold (mean train error <= {args.interp_tol:.0%}): {where}")
    print(f"test error peak: {base.test[pk]:.3f} at width {base.width[pk]} ({base.params[pk]:,} params)")
    drop = base.test[pk] - base.test[-1]
    print(f"largest width {base.width[-1]}: test error {base.test[-1]:.3f} ({drop:.3f} below the peak)")
    for c in curves[1:]:
        at_peak = c.test[c.width.index(base.width[pk])] if base.width[pk] in c.width else math.nan
        print(f"{c.label}: test error {at_peak:.3f} at the plain peak's width, {c.test[-1]:.3f} at the largest")
    print(f"figure: {fig}")
    if not ok:
        print("some runs did not end ok: see the sweeps' results.md")
    return 0 if ok else 1
