"""`deepnets compare RUN_DIR... [--out DIR]`: several runs in one figure and one table.

Reads each run the way TensorBoard does (its event files, through TensorBoard's
EventAccumulator) plus its `config.yaml` and `metrics.json`; nothing the run keeps privately.
A directory that is not itself a run (a sweep, a logdir, an experiment's version directory)
stands for every run below it.

The figure overlays the runs: gradient norm vs depth at the first (non-zero) and the last
logged step, the first/last-layer ratio over steps, and the learning curves. The table
(`compare.md`, `compare.csv`) holds their final metrics. Both go into a fresh
`<out>/version_<n>/` (default `runs/compare`), so no earlier comparison is overwritten.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from deepnets.errors import UserError
from deepnets.monitor import describe_model, first_nonzero_row
from deepnets.tables import write_table

__all__ = ["RunRecord", "figure", "find_runs", "load_run", "main", "summary_rows", "write_comparison", "write_table"]

_LAYER_TAG = re.compile(r"^grad_norm/(\d+)_(.+)$")
CURVES = ("train/loss_step", "val/loss", "val/acc")  # the learning curves drawn, by tag


@dataclass
class RunRecord:
    """One run as its files record it.

    Attributes:
        path: the run directory.
        label: how the figure and table name it (default: `<name>/version_<n>`).
        model: the `model:` section of its config.yaml ({} when there is none).
        metrics: metrics.json's `metrics` ({} when there is none).
        status: metrics.json's `status` (or the `final/status` scalar; "unknown" without either).
        layer_names: depth-ordered layer names from the `grad_norm/<i>_<name>` tags.
        steps: steps of the gradient-norm log events.
        grad_norm: (len(steps), len(layer_names)) per-layer gradient norms (float32 as logged).
        scalars: tag -> (steps, values) of every other scalar.
    """

    path: Path
    label: str
    model: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    status: str = "unknown"
    layer_names: list[str] = field(default_factory=list)
    steps: list[int] = field(default_factory=list)
    grad_norm: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    scalars: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)

    @property
    def architecture(self) -> str:
        return describe_model(self.model)

    def ratio(self) -> np.ndarray:
        """(len(steps),) first-layer / last-layer gradient norm (nan where the last is 0)."""
        g = self.grad_norm
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(g[:, -1] > 0, g[:, 0] / g[:, -1], np.nan) if g.size else np.zeros(0)

    def final(self, key: str) -> float | None:
        """A final metric: metrics.json's, else the `final/<key>` scalar the run wrote at its end."""
        v = self.metrics.get(key)
        if isinstance(v, int | float):
            return float(v)
        series = self.scalars.get(f"final/{key}")
        return series[1][-1] if series else None


def _is_run(d: Path) -> bool:
    return any(d.glob("events.out.tfevents.*"))


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Each path that is a run directory (it holds TensorBoard event files), or every run below it."""
    found: list[Path] = []
    for p in map(Path, paths):
        if not p.is_dir():
            raise UserError(f"compare: {p}: no such directory")
        runs = [p] if _is_run(p) else sorted({e.parent for e in p.rglob("events.out.tfevents.*")})
        if not runs:
            raise UserError(f"compare: {p}: no run directory (with TensorBoard event files) in it")
        found += [r for r in runs if r.resolve() not in {f.resolve() for f in found}]
    return found


def load_run(path: str | Path, label: str | None = None) -> RunRecord:
    """Read one run directory: its event files (all scalars), config.yaml and metrics.json."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    path = Path(path)
    rec = RunRecord(path=path, label=label or f"{path.parent.name}/{path.name}")
    for name, target in (("config.yaml", "config"), ("metrics.json", "metrics")):
        f = path / name
        if not f.is_file():
            continue
        try:
            data = yaml.safe_load(f.read_text()) if name.endswith(".yaml") else json.loads(f.read_text())
        except (OSError, ValueError, yaml.YAMLError) as e:
            raise UserError(f"compare: {f}: unreadable ({type(e).__name__}: {str(e).splitlines()[0]})") from None
        if not isinstance(data, dict):
            raise UserError(f"compare: {f}: expected a mapping at the top level")
        if target == "config":
            rec.model = data.get("model") if isinstance(data.get("model"), dict) else {}
        else:
            rec.metrics = data.get("metrics") if isinstance(data.get("metrics"), dict) else {}
            rec.status = str(data.get("status", rec.status))
    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "images": 1, "tensors": 1, "histograms": 1})
    try:
        acc.Reload()
    except Exception as e:  # a truncated or foreign event file: name it, do not crash
        raise UserError(f"compare: {path}: cannot read its event files ({type(e).__name__}: {e})") from None
    layers: dict[int, tuple[str, dict[int, float]]] = {}
    for tag in acc.Tags().get("scalars", []):
        by_step = {e.step: e.value for e in acc.Scalars(tag)}  # a resumed run repeats steps: the last wins
        m = _LAYER_TAG.match(tag)
        if m:
            layers[int(m.group(1))] = (m.group(2), by_step)
        else:
            steps = sorted(by_step)
            rec.scalars[tag] = (steps, [by_step[s] for s in steps])
    if layers:
        order = sorted(layers)
        rec.layer_names = [layers[i][0] for i in order]
        rec.steps = sorted(set().union(*(layers[i][1].keys() for i in order)))
        rec.grad_norm = np.array(
            [[layers[i][1].get(s, math.nan) for i in order] for s in rec.steps], dtype=np.float64
        )  # (T, L)
    if rec.status == "unknown" and "final/status" in rec.scalars:
        from deepnets.hparams import STATUS_CODES

        code = int(rec.scalars["final/status"][1][-1])
        rec.status = {v: k for k, v in STATUS_CODES.items()}.get(code, "unknown")
    return rec


def summary_rows(runs: Sequence[RunRecord]) -> list[dict[str, Any]]:
    """One row per run: identity, final metrics, and how its gradients flowed."""
    rows = []
    for r in runs:
        ratio = r.ratio()
        first = first_nonzero_row(r.grad_norm) if r.grad_norm.size else 0
        tail = ratio[-max(1, len(ratio) // 4) :]
        params = r.final("parameters")
        rows.append(
            {
                "run": r.label,
                "architecture": r.architecture,
                "status": r.status,
                "parameters": int(params) if params is not None else "",
                "test/acc": _cell(r.final("test/acc")),
                "test/loss": _cell(r.final("test/loss")),
                "val/acc": _cell(r.final("val/acc")),
                "val/loss": _cell(r.final("val/loss")),
                "weight layers": len(r.layer_names),
                "first/last @ first step": _cell(ratio[0] if ratio.size else None),
                "first non-zero step": r.steps[first] if r.steps else "",
                "first/last @ first non-zero step": _cell(ratio[first] if ratio.size else None),
                "first/last, last quarter (median)": _cell(float(np.nanmedian(tail)) if tail.size else None),
                "first/last @ last step": _cell(ratio[-1] if ratio.size else None),
                "last step": r.steps[-1] if r.steps else "",
            }
        )
    return rows


def _cell(v: float | None) -> float | str:
    return "" if v is None else float(v)


def figure(runs: Sequence[RunRecord]) -> Any:
    """The comparison: 3 x 2 panels, one colour per run in all of them, one legend at the bottom."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 12.5), dpi=110, layout="constrained")
    axes = fig.subplots(3, 2)
    (a_first, a_last), (a_ratio, a_loss), (a_vloss, a_vacc) = axes
    colours = [f"C{i % 10}" for i in range(len(runs))]
    for r, c in zip(runs, colours, strict=True):
        label = f"{r.label} ({r.architecture})" if r.architecture and r.architecture not in r.label else r.label
        if r.grad_norm.size:
            g = r.grad_norm
            first = first_nonzero_row(g)
            for ax, row in ((a_first, first), (a_last, len(g) - 1)):
                y = g[row].copy()
                y[~(np.isfinite(y) & (y > 0))] = np.nan  # exact zeros cannot sit on a log axis
                ax.semilogy(np.arange(len(y)), y, "o-", ms=3, color=c, label=f"{label}, step {r.steps[row]}")
            ratio = r.ratio()
            ratio[~(ratio > 0)] = np.nan
            a_ratio.semilogy(r.steps, ratio, "-", color=c, label=label)
        for ax, tag in zip((a_loss, a_vloss, a_vacc), CURVES, strict=True):
            if tag in r.scalars:
                steps, values = r.scalars[tag]
                ax.plot(steps, values, "-" if len(steps) > 1 else "o", color=c, label=label)
    titles = (
        "gradient norm vs depth, first logged step without exact zeros",
        "gradient norm vs depth, last logged step",
        "first-layer / last-layer gradient norm (<< 1: vanishing)",
        "train/loss (logged steps)",
        "val/loss",
        "val/acc",
    )
    for ax, title in zip(axes.flat, titles, strict=True):
        ax.set_title(title, fontsize=11)
        ax.grid(True, which="both", alpha=0.3)
    for ax in (a_first, a_last):
        ax.set_xlabel("weight layer (0 = input ... last = head)")
        ax.set_ylabel("||dL/dW|| (log)")
    a_ratio.set_ylabel("first / last (log)")
    for ax in (a_ratio, a_loss, a_vloss, a_vacc):
        ax.set_xlabel("optimizer step")
    handles, labels = a_ratio.get_legend_handles_labels()
    if not handles:
        handles, labels = a_vacc.get_legend_handles_labels()
    if handles:
        fig.legend(handles, labels, loc="outside lower center", ncols=min(3, len(labels)), fontsize=9)
    return fig


def write_comparison(runs: Sequence[RunRecord], out: Path) -> str:
    """`out/compare.png` and `out/compare.{md,csv}` for `runs`; returns the markdown table."""
    import matplotlib.image

    from deepnets.monitor import render

    out.mkdir(parents=True, exist_ok=True)
    matplotlib.image.imsave(out / "compare.png", render(figure(runs)), format="png")
    return write_table(summary_rows(runs), out / "compare")


def main(argv: list[str] | None = None) -> int:
    from deepnets.rundir import next_dir

    p = argparse.ArgumentParser(
        prog="deepnets compare",
        description="Overlay several runs (gradient flow, learning curves) in one figure and tabulate their "
        "final metrics. A directory that is not a run stands for every run below it (a sweep, a logdir).",
    )
    p.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run directories, or directories holding runs")
    p.add_argument(
        "--out", default="runs/compare", help="results go to a fresh OUT/version_<n>/ (default runs/compare)"
    )
    args = p.parse_args(argv)
    runs = [load_run(d) for d in find_runs(args.runs)]  # a bad path or file fails before anything is written
    out = next_dir(Path(args.out), "version", "--out")
    table = write_comparison(runs, out)
    print(table, end="")
    print(f"figure: {out / 'compare.png'}; table: {out / 'compare.md'}, {out / 'compare.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
