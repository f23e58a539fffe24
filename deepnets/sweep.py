"""Grid sweeps: the `sweep:` section of a config runs every combination of values, seeds included.

    sweep:
      params: {model.width: [8, 32, 128], optim.lr: [0.01, 0.1]}   # dotted key -> values
      seeds: [0, 1, 2]                                            # every grid point runs each seed
      metric: test/error                                          # plotted on the y axis
      x_key: model.width                                          # or `params` (parameter count)

The grid is the product of the value lists times the seeds, in the order
given (seeds innermost). Each point is the base config with its dotted
overrides applied and validated like the file itself, `seed` set and
`sweep` cleared; the points run one after another with `deepnets.run.train`.
Every point is validated (and its model built, to count parameters) before
the first one runs, so a bad key or value fails in seconds, naming
`sweep.params.<key>`.

Layout, for `name: dd` and `output_dir: runs`:

    runs/dd/sweep_<n>/                      one per sweep, never reused
        sweep.yaml                          the resolved base config, sweep section included
        results.csv, results.md             one row per run (written after every run)
        sweep.png                           metric vs x_key: mean over seeds, min-max band
        width=8,seed=0/version_0/           an ordinary run directory (config.yaml, metrics.json, ...)
        width=8,seed=1/version_0/
        ...

A run is labelled by the last component of each swept key (the full dotted
key where two would clash) and its seed. Rows hold the swept values, seed,
status, parameter count, the run's final metrics (`*_step` values dropped;
every `<split>/acc` also gives `<split>/error` = 1 - acc, so `metric` can be
an error rate), epochs, steps, seconds and the run directory relative to the
sweep directory.
"""

from __future__ import annotations

import contextlib
import copy
import itertools
import json
import logging
import math
import re
import sys
import traceback
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepnets.config import Config, from_dict, to_yaml
from deepnets.errors import UserError
from deepnets.rundir import next_dir

PARAMS_X = "params"  # sweep.x_key value that plots against the parameter count
RESERVED = ("seed", "name", "output_dir")  # set by the sweep itself


@dataclass
class Point:
    """One run of the grid: its swept values (dotted key -> value), seed and full config."""

    values: dict[str, Any]
    seed: int
    cfg: Config
    label: str
    params: int | None = None


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = True


# ---------------------------------------------------------------- the grid


def _set(raw: dict[str, Any], key: str, value: Any) -> None:
    """Set dotted `key` in the nested dict `raw`; unknown sections/keys are left to `from_dict` to name."""
    node = raw
    parts = key.split(".")
    for i, part in enumerate(parts[:-1]):
        child = node.get(part)
        if not isinstance(child, dict):
            what = "unknown section" if child is None else "not a section"
            raise UserError(f"sweep.params.{key}: {'.'.join(parts[: i + 1])} is {what}")
        node = child
    if isinstance(node.get(parts[-1]), dict):
        raise UserError(f"sweep.params.{key}: is a whole section; sweep its keys (e.g. {key}.<key>)")
    node[parts[-1]] = copy.deepcopy(value)


def _short_names(keys: Sequence[str]) -> dict[str, str]:
    """Last dotted component of each key, or the full key where two last components clash."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last, strict=True)}


def _value_text(v: Any) -> str:
    text = "-".join(map(str, v)) if isinstance(v, list) else str(v)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _label(values: dict[str, Any], seed: int, short: dict[str, str]) -> str:
    return ",".join([*(f"{short[k]}={_value_text(v)}" for k, v in values.items()), f"seed={seed}"])


def grid(cfg: Config) -> list[Point]:
    """Every run of `cfg.sweep`, validated; raises a UserError naming `sweep.params.<key>` on a bad key or value."""
    s = cfg.sweep
    if not s.params:
        raise UserError("sweep.params: empty; give at least one dotted key with a list of values")
    if not s.seeds:
        raise UserError("sweep.seeds: empty; give at least one seed")
    keys = list(s.params)
    for key in keys:
        if key in RESERVED or key.split(".")[0] == "sweep":
            hint = "list seeds in sweep.seeds" if key == "seed" else "the sweep sets it"
            raise UserError(f"sweep.params.{key}: cannot be swept ({hint})")
        if not s.params[key]:
            raise UserError(f"sweep.params.{key}: empty list of values")
    if s.x_key is not None and s.x_key not in (*keys, PARAMS_X):
        raise UserError(f"sweep.x_key: {s.x_key!r} is not swept; choose one of {', '.join([*keys, PARAMS_X])}")

    base = cfg.to_dict()
    base["sweep"] = {}
    # One key at a time first, so an error names the key that caused it.
    for key in keys:
        for value in s.params[key]:
            raw = copy.deepcopy(base)
            _set(raw, key, value)
            try:
                from_dict(raw)
            except UserError as e:
                raise UserError(f"sweep.params.{key}: {e}") from None

    short = _short_names(keys)
    points = []
    for combo in itertools.product(*(s.params[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        for seed in s.seeds:
            raw = copy.deepcopy(base)
            for k, v in values.items():
                _set(raw, k, v)
            raw["seed"] = seed
            label = _label(values, seed, short)
            try:
                point_cfg = from_dict(raw)
            except UserError as e:
                raise UserError(f"sweep point {label}: {e}") from None
            points.append(Point(values, seed, point_cfg, label))
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        dup = next(lb for lb in labels if labels.count(lb) > 1)
        raise UserError(f"sweep.params: two grid points share the label {dup!r} (repeated values?)")
    return points


def count_params(cfg: Config) -> int:
    """Parameters of the model `cfg` builds for its dataset (no data is read)."""
    from deepnets.data import InMemoryDataModule
    from deepnets.models import build_model

    data = InMemoryDataModule(cfg.data, cfg.seed)
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    return sum(p.numel() for p in model.parameters())


# ---------------------------------------------------------------- running


def _new_sweep_dir(output_dir: str, name: str) -> Path:
    return next_dir(Path(output_dir) / name, "sweep", "output_dir")


def _row(
    point: Point,
    short: dict[str, str],
    sweep_dir: Path,
    run_dir: Path | None,
    status: str,
    metrics: dict[str, Any],
    error: str | None,
) -> dict[str, Any]:
    row: dict[str, Any] = {short[k]: (_value_text(v) if isinstance(v, list) else v) for k, v in point.values.items()}
    row |= {"seed": point.seed, "status": status, "params": point.params}
    for k, v in sorted(metrics.items()):
        if k.endswith("_step"):
            continue
        row[k] = v
        if k.endswith("/acc") and isinstance(v, float):
            row[k.removesuffix("acc") + "error"] = 1.0 - v
    info = {}
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        info = json.loads((run_dir / "metrics.json").read_text())
    row |= {"epochs": info.get("epochs"), "steps": info.get("steps"), "seconds": info.get("wall_seconds")}
    row["run_dir"] = str(run_dir.relative_to(sweep_dir)) if run_dir is not None else ""
    if error:
        row["error"] = error
    return row


def _latest_version(root: Path) -> Path | None:
    versions = [p for p in root.glob("version_*") if p.name[8:].isdigit()]
    return max(versions, key=lambda p: int(p.name[8:]), default=None)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """Lightning's per-Trainer banner (GPU available, tips, `fit stopped`) once per run is noise in a sweep."""
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def sweep(cfg: Config, *, verbose: bool = True) -> SweepResult:
    """Run the grid of `cfg.sweep` sequentially; write results.{csv,md} and sweep.png into a fresh sweep dir."""
    points = grid(cfg)
    for p in points:  # builds every model once: a bad model config fails before anything runs
        try:
            p.params = count_params(p.cfg)
        except UserError as e:
            raise UserError(f"sweep point {p.label}: {e}") from None
    from deepnets.run import train  # Lightning: imported once the grid is known to be valid

    short = _short_names(list(cfg.sweep.params))
    sweep_dir = _new_sweep_dir(cfg.output_dir, cfg.name)
    (sweep_dir / "sweep.yaml").write_text(to_yaml(cfg))
    # each run: <output_dir>/<name>/sweep_<n>/<label>/version_0/
    run_prefix = f"{cfg.name}/{sweep_dir.name}"
    result = SweepResult(sweep_dir)
    if verbose:
        print(f"sweep: {len(points)} runs -> {sweep_dir}", flush=True)
    try:
        for i, p in enumerate(points):
            p.cfg.name = f"{run_prefix}/{p.label}"
            if verbose:
                print(f"[{i + 1}/{len(points)}] {p.label} ({p.params:,} parameters)", flush=True)
            try:
                with _quiet_lightning():
                    r = train(p.cfg)
            except UserError as e:
                raise UserError(f"sweep run {p.label}: {e}") from None
            except Exception as e:  # a crash in one run must not lose the others
                traceback.print_exc(file=sys.stderr)
                run_dir = _latest_version(sweep_dir / p.label)
                result.rows.append(_row(p, short, sweep_dir, run_dir, "failed", {}, f"{type(e).__name__}: {e}"))
                result.ok = False
                continue
            result.rows.append(_row(p, short, sweep_dir, r.run_dir, r.status, r.metrics, r.error))
            result.ok &= r.ok
            if verbose:
                value = result.rows[-1].get(cfg.sweep.metric)
                shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
                print(f"    {r.status}: {cfg.sweep.metric} = {shown}", flush=True)
            _write_results(result.rows, sweep_dir)  # after every run: a stopped sweep keeps its table
            if r.status == "interrupted":  # Ctrl+C / SIGTERM: stop the sweep, not just this run
                result.ok = False
                break
    finally:
        if result.rows:
            _write_results(result.rows, sweep_dir)
            plot_sweep(result.rows, cfg, sweep_dir / "sweep.png")
    return result


def _write_results(rows: list[dict[str, Any]], sweep_dir: Path) -> str:
    from deepnets.experiments.common import write_table

    return write_table(rows, sweep_dir / "results")


def run_sweep(cfg: Config) -> bool:
    """The CLI's entry point for a config with `sweep.params`: run, print the table; True if every run ended ok."""
    res = sweep(cfg)
    print()
    print((res.sweep_dir / "results.md").read_text() if res.rows else "(no runs)")
    bad = [r for r in res.rows if r["status"] not in ("completed", "early_stopped")]
    ok = len(res.rows) - len(bad)
    print(f"sweep: {ok}/{len(res.rows)} runs ok; table: {res.sweep_dir}/results.md, plot: {res.sweep_dir}/sweep.png")
    return res.ok


# ---------------------------------------------------------------- plotting


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)


def series(
    rows: Sequence[dict[str, Any]], x_col: str, y_col: str, group_cols: Sequence[str]
) -> dict[tuple[Any, ...], list[tuple[Any, list[float]]]]:
    """group values -> [(x, [y over seeds]), ...] in first-seen x order; rows without a numeric y are skipped."""
    out: dict[tuple[Any, ...], dict[Any, list[float]]] = defaultdict(dict)
    for r in rows:
        y = r.get(y_col)
        if not _is_number(y):
            continue
        group = tuple(r.get(c) for c in group_cols)
        out[group].setdefault(r.get(x_col), []).append(float(y))
    return {g: list(xs.items()) for g, xs in out.items()}


def plot_sweep(rows: Sequence[dict[str, Any]], cfg: Config, path: Path) -> Path | None:
    """`sweep.metric` against `sweep.x_key`: mean over seeds, min-max band, one line per other-key combination."""
    from deepnets.experiments.common import plt, save_figure

    keys = list(cfg.sweep.params)
    short = _short_names(keys)
    x_key = cfg.sweep.x_key or keys[0]
    x_col = PARAMS_X if x_key == PARAMS_X else short[x_key]
    group_cols = [short[k] for k in keys if k != x_key]
    metric = cfg.sweep.metric
    data = series(rows, x_col, metric, group_cols)
    if not data:
        print(f"sweep: no run reported {metric!r}; sweep.png not drawn", file=sys.stderr)
        return None
    xs_all = [x for pts in data.values() for x, _ in pts]
    numeric = all(_is_number(x) for x in xs_all)
    if not numeric:  # categorical axis in first-seen order
        cats = list(dict.fromkeys(map(str, xs_all)))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for group, pts in data.items():
        if numeric:
            pts = sorted(pts, key=lambda t: t[0])
        x = [t[0] if numeric else cats.index(str(t[0])) for t in pts]
        ys = [t[1] for t in pts]
        mean = [sum(v) / len(v) for v in ys]
        label = ", ".join(f"{c}={g}" for c, g in zip(group_cols, group, strict=True)) or None
        (line,) = ax.plot(x, mean, "o-", ms=4, label=label)
        if any(len(v) > 1 for v in ys):
            ax.fill_between(x, [min(v) for v in ys], [max(v) for v in ys], color=line.get_color(), alpha=0.2)
    if numeric:
        lo, hi = min(xs_all), max(xs_all)
        if lo > 0 and hi / lo > 10:  # values span more than a decade
            ax.set_xscale("log")
    else:
        ax.set_xticks(range(len(cats)), cats, rotation=30 if max(map(len, cats)) > 6 else 0)
    n_seeds = len(cfg.sweep.seeds)
    spread = f"mean and min-max over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    ax.set_title(f"{cfg.name}: {metric} ({spread})", fontsize=10)
    ax.set_xlabel("parameters" if x_col == PARAMS_X else x_key)
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    if group_cols:
        ax.legend(fontsize=8)
    return save_figure(fig, path)
