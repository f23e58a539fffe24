"""Sweeps on Optuna: grid, random and TPE search; local and remote workers; resume; median pruning.

    sweep:
      search: grid                                              # grid | random | tpe
      params: {model.width: [8, 32, 128], optim.lr: [0.01, 0.1]}   # dotted key -> values (grid / choices)
      # random / tpe also take ranges:  optim.lr: {low: 1.0e-4, high: 0.1, log: true}  (int or float)
      trials: 20                                                # random / tpe: points sampled
      seeds: [0, 1, 2]                                          # every point runs each seed
      sampler_seed: 0                                           # random / tpe: reproducible trial list
      workers: 2                                                # local worker processes at once
      storage: null                                             # SQLite in the sweep dir, a URL, or a journal file
      prune: none                                               # none | median (Optuna's MedianPruner)
      metric: test/error                                        # plotted on the y axis; what tpe optimises
      x_key: model.width                                        # or `params` (parameter count)

One Optuna trial is one run (a point with one seed). The study's storage is
where workers meet: every run to do is an Optuna trial in the WAITING state,
and a worker claims one by moving it to RUNNING, which the storage does
atomically (Optuna's own trial queue), so two workers, on one machine or many,
never run the same trial. The grid is enqueued in today's order (seeds
innermost); random search draws its points with Optuna's RandomSampler (seeded
by `sampler_seed`) when the sweep is created and enqueues them the same way;
TPE enqueues `trials` empty trials whose parameters TPESampler fills in when a
worker claims them (so it learns from the runs finished by then), and the other
seeds of that point are enqueued with the same parameters.
Optuna's GridSampler is not used: in a distributed study it may run a grid
point twice (Optuna documents it), and a sweep runs every point exactly once.

Every point is validated (values one key at a time, like the config file; for
the grid, every point's model built to count its parameters) before the
first one runs, so a bad key or value fails in seconds, naming
`sweep.params.<key>`.

Layout, for `name: dd` and `output_dir: runs`:

    runs/dd/sweep_<n>/                      one per sweep, never reused
        sweep.yaml                          the resolved base config, sweep section included
        study.json                          where the study lives: storage (null: study.db here) and its name
        study.db                            the Optuna study (SQLite) when sweep.storage is null
        results.csv, results.md             one row per point and seed, from its run's metrics.json
        sweep.png                           metric vs x_key: mean over seeds, min-max band
        width=8,seed=0/version_0/           an ordinary run directory (config.yaml, metrics.json, ...)
        ...

A grid run is labelled by the last component of each swept key (the full
dotted key where two would clash) and its seed; a sampled run by
`point=<k>`, its values (4 significant digits) and its seed. Rows hold the
swept values, seed, status, parameter count, the run's final metrics from its
metrics.json (`*_step` values dropped; every `<split>/acc` also gives
`<split>/error` = 1 - acc), epochs, steps, seconds and the run directory
relative to the sweep directory.
"""

from __future__ import annotations

import contextlib
import copy
import ctypes
import difflib
import itertools
import json
import logging
import math
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections import defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deepnets.config import Config, from_dict, load_config, to_yaml
from deepnets.errors import UserError
from deepnets.tasks import sweep_metrics

PARAMS_X = "params"  # sweep.x_key value that plots against the parameter count
RESERVED = ("seed", "name", "output_dir")  # set by the sweep itself
RANGE_KEYS = ("low", "high", "log")
FINAL = ("completed", "early_stopped", "diverged", "pruned")  # a point with one of these is never run again
OK = ("completed", "early_stopped", "pruned")
SLOT_ENV = "DEEPNETS_SWEEP_SLOT"  # "<i>/<n>": a local worker's slot, set by the process that started it
HEARTBEAT_S = 30  # RDB storages: a RUNNING trial whose worker stopped beating for 4x this is retried once


@dataclass
class Point:
    """One run of a sweep: its swept values (dotted key -> value), seed and full config (a plain Config)."""

    values: dict[str, Any]
    seed: int
    cfg: Config
    label: str
    params: int | None = None
    index: int = 0  # position in the sweep's order (grid: point-major, seeds innermost)


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict[str, Any]] = field(default_factory=list)
    ok: bool = True
    signum: int | None = None  # the signal that stopped the sweep
    missing: int = 0  # runs of the sweep without a row yet (running elsewhere, or their worker died)


@dataclass
class Range:
    """`{low, high, log}`: an int range when both ends are ints, else a float range."""

    low: float
    high: float
    log: bool
    is_int: bool


# ---------------------------------------------------------------- validation (no Lightning)


def _is_num(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _parse_range(key: str, spec: dict[Any, Any]) -> Range:
    where = f"sweep.params.{key}"
    for k in spec:
        if k not in RANGE_KEYS:
            raise UserError(f"{where}.{k}: unknown key; a range takes low, high and log")
    for k in ("low", "high"):
        if k not in spec:
            raise UserError(f"{where}: a range needs low and high (and optionally log: true)")
        if not _is_num(spec[k]) or not math.isfinite(spec[k]):
            raise UserError(f"{where}.{k}: expected a number, got {spec[k]!r}")
    log = spec.get("log", False)
    if not isinstance(log, bool):
        raise UserError(f"{where}.log: expected true or false, got {log!r}")
    low, high = spec["low"], spec["high"]
    if not low < high:
        raise UserError(f"{where}: low ({low!r}) must be below high ({high!r})")
    if log and low <= 0:
        raise UserError(f"{where}: log: true needs low > 0, got {low!r}")
    return Range(low, high, log, isinstance(low, int) and isinstance(high, int))


def check_sweep(cfg: Config) -> dict[str, list[Any] | Range]:
    """Validate the whole `sweep:` section (every value through the config schema); return the search space.

    Pure config work: nothing is imported from Lightning and nothing is written.
    """
    s = cfg.sweep
    if not s.params:
        raise UserError("sweep.params: empty; give at least one dotted key with a list of values")
    space: dict[str, list[Any] | Range] = {}
    for key, spec in s.params.items():
        if not isinstance(key, str):
            raise UserError(f"sweep.params: key {key!r} is not a string; keys are dotted config keys (model.width)")
        if key in RESERVED or key.split(".")[0] == "sweep":
            hint = "list seeds in sweep.seeds" if key == "seed" else "the sweep sets it"
            raise UserError(f"sweep.params.{key}: cannot be swept ({hint})")
        if isinstance(spec, dict):
            if s.search == "grid":
                raise UserError(f"sweep.params.{key}: a range needs sweep.search random or tpe; the grid takes a list")
            space[key] = _parse_range(key, spec)
        else:
            if not spec:
                raise UserError(f"sweep.params.{key}: empty list of values")
            space[key] = list(spec)
    if not s.seeds:
        raise UserError("sweep.seeds: empty; give at least one seed")
    if len(set(s.seeds)) != len(s.seeds):
        raise UserError(f"sweep.seeds: repeated seeds in {s.seeds}")
    if s.search == "grid":
        if s.trials is not None:
            raise UserError("sweep.trials: only for sweep.search random or tpe (the grid runs every combination)")
        if s.sampler_seed is not None:
            raise UserError("sweep.sampler_seed: only for sweep.search random or tpe (the grid is not sampled)")
    elif s.trials is None:
        raise UserError(f"sweep.trials: required with sweep.search {s.search} (how many points to sample)")
    keys = list(space)
    if s.x_key is not None and s.x_key not in (*keys, PARAMS_X):
        raise UserError(f"sweep.x_key: {s.x_key!r} is not swept; choose one of {', '.join([*keys, PARAMS_X])}")
    metrics = sweep_metrics(cfg.task)
    if s.metric not in metrics:
        near = difflib.get_close_matches(s.metric, metrics, n=1, cutoff=0.5)
        hint = f"did you mean {near[0]}? " if near else ""
        raise UserError(
            f"sweep.metric: {s.metric!r} is not a metric of task {cfg.task} ({hint}allowed: {', '.join(metrics)})"
        )
    if s.prune == "median" and (cfg.data.val_fraction <= 0 or cfg.trainer.limit_val_batches == 0):
        raise UserError(
            "sweep.prune: median compares the validation metric every epoch; "
            "set data.val_fraction > 0 and trainer.limit_val_batches > 0"
        )
    if s.workers > 1 and cfg.trainer.devices not in ("auto", 1):
        raise UserError(
            f"sweep.workers: {s.workers} local workers take one device each; "
            f"set trainer.devices to 1 or auto (got {cfg.trainer.devices!r})"
        )
    if cfg.trainer.fast_dev_run:
        raise UserError("trainer.fast_dev_run: writes no run directory; a sweep records every run's directory")
    parse_storage(s.storage)
    if s.vectorize:  # refused now, one line naming the key, before anything is written (imports Lightning)
        from deepnets.stacked import check_vectorize

        check_vectorize(cfg)

    base = cfg.to_dict()
    base["sweep"] = {}
    # One key at a time, so an error names the key that caused it.
    for key, spec in space.items():
        tried = [spec.low, spec.high] if isinstance(spec, Range) else spec
        for value in tried:
            raw = copy.deepcopy(base)
            _set(raw, key, value)
            try:
                from_dict(raw)
            except UserError as e:
                raise UserError(f"sweep.params.{key}: {e}") from None
    return space


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


def _value_text(v: Any, digits: int | None = None) -> str:
    if digits is not None and isinstance(v, float):
        v = f"{v:.{digits}g}"
    text = "-".join(map(str, v)) if isinstance(v, list) else str(v)
    return re.sub(r"[^A-Za-z0-9._+-]", "_", text)


def _label(values: dict[str, Any], seed: int, short: dict[str, str], point: int | None = None) -> str:
    head = [] if point is None else [f"point={point}"]
    digits = None if point is None else 4
    parts = [*head, *(f"{short[k]}={_value_text(v, digits)}" for k, v in values.items()), f"seed={seed}"]
    return ",".join(parts)


def make_point(cfg: Config, values: dict[str, Any], seed: int, label: str, index: int = 0) -> Point:
    """The base config `cfg` with `values` (dotted key -> value) applied, `seed` set and `sweep` cleared."""
    raw = cfg.to_dict()
    raw["sweep"] = {}
    for k, v in values.items():
        _set(raw, k, v)
    raw["seed"] = seed
    try:
        point_cfg = from_dict(raw)
    except UserError as e:
        raise UserError(f"sweep point {label}: {e}") from None
    return Point(values, seed, point_cfg, label, index=index)


def grid(cfg: Config) -> list[Point]:
    """Every run of a grid sweep in order (seeds innermost), validated; a bad value names `sweep.params.<key>`."""
    if cfg.sweep.search != "grid":
        raise UserError(f"sweep.search: {cfg.sweep.search} samples its points as it runs; there is no grid")
    space = check_sweep(cfg)
    keys = list(space)
    short = _short_names(keys)
    points = []
    for combo in itertools.product(*(space[k] for k in keys)):
        values = dict(zip(keys, combo, strict=True))
        for seed in cfg.sweep.seeds:
            points.append(make_point(cfg, values, seed, _label(values, seed, short), index=len(points)))
    labels = [p.label for p in points]
    if len(set(labels)) != len(labels):
        dup = next(lb for lb in labels if labels.count(lb) > 1)
        raise UserError(f"sweep.params: two grid points share the label {dup!r} (repeated values?)")
    return points


def count_params(cfg: Config) -> int:
    """Parameters of the model `cfg` builds for its dataset (no data is read)."""
    from deepnets.data import InMemoryDataModule
    from deepnets.models import build_model

    data = InMemoryDataModule(cfg.data, cfg.seed, task=cfg.task)
    model = build_model(cfg.model, data.input_shape, data.num_outputs)
    return sum(p.numel() for p in model.parameters())


def metric_direction(metric: str, task: str = "classification") -> str:
    """The mode of `metric` in the task's table (deepnets.tasks): accuracy and R2 up, losses and errors down."""
    return "maximize" if sweep_metrics(task).get(metric) == "max" else "minimize"


# ---------------------------------------------------------------- storage


def parse_storage(storage: str | None) -> tuple[str, str | None]:
    """("sqlite", None) for null, ("rdb", url) for an SQLAlchemy URL, ("journal", path) for a file path."""
    if storage is None:
        return "sqlite", None
    if "://" in storage:
        from sqlalchemy.engine import make_url
        from sqlalchemy.exc import ArgumentError, NoSuchModuleError

        try:
            url = make_url(storage)
            dialect = url.get_dialect()
        except (ArgumentError, NoSuchModuleError, ValueError) as e:
            raise UserError(f"sweep.storage: {storage!r} is not an SQLAlchemy URL I can use: {e}") from None
        try:
            dialect.import_dbapi()
        except ImportError as e:
            hint = " (pip install 'psycopg[binary]')" if url.get_backend_name() == "postgresql" else ""
            raise UserError(f"sweep.storage: the {url.drivername} driver is not installed: {e}{hint}") from None
        return "rdb", storage
    path = Path(storage).expanduser()
    if not path.parent.is_dir():
        raise UserError(f"sweep.storage: journal file {storage}: directory {path.parent} does not exist")
    return "journal", str(path.resolve())


def _hide_password(url: str) -> str:
    from sqlalchemy.engine import make_url

    return make_url(url).render_as_string(hide_password=True)


def open_storage(storage: str | None, sweep_dir: Path | None) -> Any:
    """An Optuna storage: SQLite in `sweep_dir` for null, an RDB URL, or a journal file."""
    import optuna

    kind, where = parse_storage(storage)
    if kind == "journal":
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        try:
            return JournalStorage(JournalFileBackend(where))
        except OSError as e:
            raise UserError(f"sweep.storage: cannot open journal file {where}: {e.strerror or e}") from None
    if kind == "sqlite":
        assert sweep_dir is not None
        where = f"sqlite:///{(sweep_dir / 'study.db').resolve()}"
    kwargs: dict[str, Any] = {"connect_args": {"timeout": 60}} if where.startswith("sqlite") else {}
    try:
        storage = optuna.storages.RDBStorage(
            where,
            engine_kwargs=kwargs,
            # A worker that dies (SIGKILL, a lost node) leaves its trial RUNNING; its heartbeat stops,
            # and the next worker to look fails it and enqueues it once more.
            heartbeat_interval=HEARTBEAT_S,
            grace_period=4 * HEARTBEAT_S,
            heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1),
        )
    except Exception as e:  # sqlalchemy OperationalError & co: one line naming the storage
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"sweep.storage: cannot open {_hide_password(where)}: {first}") from None
    if storage.engine.dialect.name == "sqlite":
        _serialize_sqlite(storage.engine)
    return storage


def _serialize_sqlite(engine: Any) -> None:
    """Every transaction on an SQLite storage starts with BEGIN IMMEDIATE (the write lock), so that a
    read-then-write is atomic across processes.

    Optuna claims a queued trial by reading its state and setting RUNNING if it was WAITING, in one
    transaction `SELECT ... FOR UPDATE`, which SQLite ignores; and Python's sqlite3 begins a transaction
    only at the first write, so the read ran outside it. Two workers then both read WAITING and both ran the
    trial (tests/test_sweep_workers.py: 68 claims of 60 trials by 4 processes). This is SQLAlchemy's
    documented pysqlite recipe (its dialect docs, "Serializable isolation / Savepoints / Transactional DDL").
    PostgreSQL honours FOR UPDATE and the journal storage serialises through its lock file: neither needs it.
    """
    from sqlalchemy import event

    @event.listens_for(engine, "connect")
    def _no_implicit_begin(dbapi_connection: Any, record: Any) -> None:
        dbapi_connection.isolation_level = None  # sqlite3 emits no BEGIN of its own; the listener below does

    @event.listens_for(engine, "begin")
    def _begin_immediate(connection: Any) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections pooled while Optuna set up the schema predate the listeners


def _optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # deepnets prints one line per run itself
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    return optuna


# ---------------------------------------------------------------- creating a sweep


def _choices(values: list[Any]) -> list[Any]:
    """Optuna categoricals hold None/bool/int/float/str; other values (lists) travel as JSON text."""
    if all(v is None or isinstance(v, bool | int | float | str) for v in values):
        return values
    return [json.dumps(v) for v in values]


def _decode(spec: list[Any] | Range, value: Any) -> Any:
    if isinstance(spec, list) and _choices(spec) is not spec:
        return json.loads(value)
    return value


def suggest(trial: Any, space: dict[str, list[Any] | Range]) -> dict[str, Any]:
    """The point's values: fixed ones (enqueued) come back as they are, the rest from the study's sampler."""
    values = {}
    for key, spec in space.items():
        if isinstance(spec, Range):
            if spec.is_int:
                v = trial.suggest_int(key, int(spec.low), int(spec.high), log=spec.log)
            else:
                v = trial.suggest_float(key, float(spec.low), float(spec.high), log=spec.log)
        else:
            v = trial.suggest_categorical(key, _choices(spec))
        values[key] = _decode(spec, v)
    return values


def _sampled_params(cfg: Config, space: dict[str, list[Any] | Range]) -> list[dict[str, Any]]:
    """Random search: `trials` points drawn up front by Optuna's RandomSampler, in Optuna's own encoding."""
    optuna = _optuna()
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=cfg.sweep.sampler_seed))
    out = []
    for _ in range(cfg.sweep.trials or 0):
        trial = study.ask()
        suggest(trial, space)
        out.append(dict(trial.params))
        study.tell(trial, 0.0)
    return out


def _work(p: Point) -> int:
    """A run's cost, up to a constant: parameters x epochs (steps where epochs are unlimited). Only the
    order of these numbers is used."""
    t = p.cfg.trainer
    return (p.params or 0) * (t.max_epochs if t.max_epochs > 0 else max(1, t.max_steps))


def run_order(points: list[Point], workers: int) -> list[Point]:
    """The order workers claim a grid's runs in: the grid's own with one local worker (results come in as
    the table reads); longest first otherwise (LPT, Graham 1969). In grid order the costliest runs come
    last, so with several workers the sweep ends with one of them running a big net while the others wait
    (bench/sweep_workers.py prints that idle tail, and both orders simulated from a 1-worker run). The
    sort is stable: a point's seeds stay together, in order. The table's order is the grid's either way."""
    return points if workers == 1 else sorted(points, key=_work, reverse=True)


def _enqueue_all(study: Any, cfg: Config, points: list[Point] | None, space: dict[str, list[Any] | Range]) -> int:
    seeds = cfg.sweep.seeds
    if points is not None:  # the grid: each run keeps its grid index (the table's order)
        for p in run_order(points, cfg.sweep.workers):
            study.enqueue_trial({}, user_attrs={"index": p.index, "point": p.index // len(seeds), "seed": p.seed})
        return len(points)
    n = cfg.sweep.trials or 0
    if cfg.sweep.search == "random":
        for k, params in enumerate(_sampled_params(cfg, space)):
            for j, seed in enumerate(seeds):
                study.enqueue_trial(params, user_attrs={"index": k * len(seeds) + j, "point": k, "seed": seed})
        return n * len(seeds)
    for k in range(n):  # tpe: the sampler fills these in when they run; the other seeds follow then
        study.enqueue_trial({}, user_attrs={"index": k * len(seeds), "point": k, "seed": seeds[0]})
    return n * len(seeds)


def _write_study_json(sweep_dir: Path, storage: str | None, study_name: str) -> None:
    _kind, where = parse_storage(storage)
    text = json.dumps({"storage": where, "study": study_name}, indent=2) + "\n"
    (sweep_dir / "study.json").write_text(text)


def create_sweep(cfg: Config, *, verbose: bool = True) -> tuple[Path, str, int]:
    """Validate, make the sweep directory and its study with every run enqueued; (sweep dir, study name, runs)."""
    optuna = _optuna()
    space = check_sweep(cfg)
    points = None
    if cfg.sweep.search == "grid":
        points = grid(cfg)
        for p in points:  # builds every model once: a bad model config fails before anything runs
            try:
                p.params = count_params(p.cfg)
            except UserError as e:
                raise UserError(f"sweep point {p.label}: {e}") from None
    kind, _ = parse_storage(cfg.sweep.storage)
    shared = open_storage(cfg.sweep.storage, None) if kind != "sqlite" else None  # fail before any directory
    root = Path(cfg.output_dir) / cfg.name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"output_dir {cfg.output_dir} is not writable: {e.strerror or e}") from None
    taken = [int(p.name[6:]) for p in root.glob("sweep_*") if p.name[6:].isdigit()]
    for n in itertools.count(max(taken, default=-1) + 1):
        sweep_dir = root / f"sweep_{n}"
        try:
            sweep_dir.mkdir()  # mkdir is the lock: two sweeps started at once get different n
        except FileExistsError:
            continue
        except OSError as e:
            raise UserError(f"output_dir {cfg.output_dir} is not writable: {e.strerror or e}") from None
        name = f"{cfg.name}/{sweep_dir.name}"
        storage = shared if shared is not None else open_storage(None, sweep_dir)
        try:
            study = optuna.create_study(
                study_name=name,
                storage=storage,
                direction=metric_direction(cfg.sweep.metric, cfg.task),
            )
            break
        except optuna.exceptions.DuplicatedStudyError:  # a shared storage already holds this name
            sweep_dir.rmdir()
    study.set_user_attr("config", cfg.to_dict())
    study.set_user_attr("params", {p.index: p.params for p in points} if points else {})
    total = _enqueue_all(study, cfg, points, space)
    (sweep_dir / "sweep.yaml").write_text(to_yaml(cfg))
    _write_study_json(sweep_dir, cfg.sweep.storage, name)
    if verbose:
        where = "study.db" if kind == "sqlite" else _where(cfg.sweep.storage)
        print(f"sweep: {total} runs ({cfg.sweep.search}) -> {sweep_dir}  [study {name!r} in {where}]", flush=True)
    return sweep_dir, name, total


def _where(storage: str | None) -> str:
    kind, where = parse_storage(storage)
    return _hide_password(where) if kind == "rdb" else str(where)


# ---------------------------------------------------------------- opening a sweep


@dataclass
class Sweep:
    """An open sweep: its base config, directory, Optuna study and search space."""

    cfg: Config
    sweep_dir: Path
    study: Any
    space: dict[str, list[Any] | Range]
    grid_points: list[Point] | None
    grid_params: dict[int, int | None]

    @property
    def storage(self) -> Any:
        return self.study._storage


def is_sweep_dir(path: str | Path) -> bool:
    return (Path(path) / "sweep.yaml").is_file() and (Path(path) / "study.json").is_file()


def _sampler(cfg: Config, offset: int) -> Any:
    optuna = _optuna()
    seed = cfg.sweep.sampler_seed
    if cfg.sweep.search != "tpe":
        return optuna.samplers.RandomSampler(seed=seed)  # never asked: every trial's params are fixed
    # Two workers with one seed would propose the same points: each worker offsets it (one worker: the seed).
    return optuna.samplers.TPESampler(seed=None if seed is None else seed + offset, constant_liar=True)


def _pruner(cfg: Config) -> Any:
    optuna = _optuna()
    return optuna.pruners.MedianPruner() if cfg.sweep.prune == "median" else optuna.pruners.NopPruner()


def open_sweep(
    sweep_dir: str | Path | None = None, *, storage: str | None = None, study: str | None = None, offset: int = 0
) -> Sweep:
    """Open a sweep from its directory, or from a storage URL / journal file and a study name.

    `offset` shifts a TPE `sampler_seed` for this worker (0: the seed itself).
    """
    optuna = _optuna()
    slot = offset
    if study is None:
        assert sweep_dir is not None
        d = Path(sweep_dir)
        if not d.is_dir():
            raise UserError(f"{d}: no such sweep directory")
        if not is_sweep_dir(d):
            raise UserError(f"{d}: not a sweep directory (no sweep.yaml and study.json)")
        try:
            info = json.loads((d / "study.json").read_text())
            name, where = info["study"], info["storage"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UserError(f"{d / 'study.json'}: unreadable ({e})") from None
        cfg = load_config(str(d / "sweep.yaml"))
        st = open_storage(where, d) if where is not None else open_storage(None, d)
        try:
            s = optuna.load_study(study_name=name, storage=st, sampler=_sampler(cfg, slot), pruner=_pruner(cfg))
        except KeyError:
            raise UserError(f"{d}: study {name!r} not found in its storage") from None
    else:
        if storage is None:
            raise UserError("--study NAME needs --sweep-worker STORAGE_URL (an SQLAlchemy URL or a journal file)")
        st = open_storage(storage, None)
        try:
            names = optuna.get_all_study_names(st)
        except Exception as e:
            raise UserError(f"--sweep-worker {_where(storage)}: {str(e).splitlines()[0]}") from None
        if study not in names:
            raise UserError(f"--study {study!r}: not in {_where(storage)} (studies: {', '.join(names) or 'none'})")
        raw = optuna.load_study(study_name=study, storage=st).user_attrs.get("config")
        if not isinstance(raw, dict):
            raise UserError(f"--study {study!r}: not a deepnets sweep (no config in its user attributes)")
        cfg = from_dict(raw)
        d = Path(cfg.output_dir) / study  # the same layout as on the machine that created it
        if is_sweep_dir(d):
            info = json.loads((d / "study.json").read_text())
            if info.get("study") != study:
                raise UserError(f"{d}: holds study {info.get('study')!r}, not {study!r}")
        else:
            try:
                d.mkdir(parents=True, exist_ok=True)
                (d / "sweep.yaml").write_text(to_yaml(cfg))
                (d / "study.json").write_text(json.dumps({"storage": storage, "study": study}, indent=2) + "\n")
            except OSError as e:
                raise UserError(f"output_dir {cfg.output_dir} is not writable: {e.strerror or e}") from None
        s = optuna.load_study(study_name=study, storage=st, sampler=_sampler(cfg, slot), pruner=_pruner(cfg))
    space = check_sweep(cfg)
    points = grid(cfg) if cfg.sweep.search == "grid" else None
    counts = {int(k): v for k, v in (s.user_attrs.get("params") or {}).items()}
    return Sweep(cfg, d, s, space, points, counts)


# ---------------------------------------------------------------- one worker


def _slot() -> tuple[int, int]:
    """(slot, local workers): set by the sweep that started this process; (0, 1) otherwise."""
    text = os.environ.get(SLOT_ENV, "0/1")
    i, _, n = text.partition("/")
    return int(i), int(n or 1)


def _worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class StopFlag:
    """SIGINT / SIGTERM between runs: finish nothing new. (During a run, deepnets.run's handler stops it.)"""

    def __init__(self) -> None:
        self.signum: int | None = None
        self.forward: list[subprocess.Popen[bytes]] = []

    def __call__(self, signum: int, frame: Any) -> None:
        if self.signum is None:
            self.signum = signum
        for proc in self.forward:  # local workers stop after their run in flight
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signum)

    @contextlib.contextmanager
    def installed(self) -> Iterator[StopFlag]:
        previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(ValueError):  # not the main thread
                previous[sig] = signal.signal(sig, self)
        try:
            yield self
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class _Heartbeat:
    """Beats for a claimed trial on RDB storages (Optuna starts its own only inside Study.optimize,
    which this loop does not use: optimize creates fresh trials once the queue is empty)."""

    def __init__(self, storage: Any, trial_id: int) -> None:
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

        if isinstance(storage, BaseHeartbeat) and is_heartbeat_enabled(storage):
            storage.record_heartbeat(trial_id)

            def beat() -> None:
                while not self._stop.wait(HEARTBEAT_S):
                    with contextlib.suppress(Exception):  # a missed beat is retried; never kill the run
                        storage.record_heartbeat(trial_id)

            self._thread = threading.Thread(target=beat, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()


def claim(study: Any) -> Any | None:
    """Optuna's trial queue: move one WAITING trial to RUNNING (atomic in the storage) or None when none waits.

    `Study.ask` would create a fresh trial when the queue is empty; here an empty queue means the sweep
    is done, so this is `ask` without that fallback (a test pins the private method it calls).
    """
    import optuna

    trial_id = study._pop_waiting_trial_id()
    return None if trial_id is None else optuna.Trial(study, trial_id)


class _Pruner:
    """Reports the validation metric to the trial every epoch and stops the Trainer when Optuna's pruner says so.

    Not optuna-integration's PyTorchLightningPruningCallback: it raises TrialPruned out of `trainer.fit`,
    which `deepnets.run.train` records as a failed run (and re-raises); this stops the Trainer the way
    early stopping does, so the run ends normally with its metrics.json, and the sweep records `pruned`.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> Any:
        from lightning.pytorch.callbacks import Callback

        class PrunerCallback(Callback):
            def __init__(self, trial: Any, metric: str) -> None:
                split_name = metric.split("/", 1)[1]
                # val/error is not logged: it is 1 - val/acc, as in the results table
                self.monitor = "val/acc" if split_name == "error" else f"val/{split_name}"
                self.flip = split_name == "error"
                self.trial = trial
                self.pruned_epoch: int | None = None

            def on_validation_end(self, trainer: Any, pl_module: Any) -> None:
                if trainer.sanity_checking or self.monitor not in trainer.callback_metrics:
                    return
                value = float(trainer.callback_metrics[self.monitor])
                value = 1.0 - value if self.flip else value
                self.trial.report(value, step=trainer.current_epoch)
                if self.trial.should_prune():
                    trainer.should_stop = True
                    self.pruned_epoch = trainer.current_epoch + 1  # epochs run when it stopped

        return PrunerCallback(*args, **kwargs)


def _run_dir_cfg(point: Point, sw: Sweep) -> None:
    """Runs go to <sweep_dir>/<label>/version_<n>/, named <name>/sweep_<n>/<label> as before."""
    name_parts = len(Path(sw.cfg.name).parts)
    root = sw.sweep_dir
    for _ in range(name_parts + 1):
        root = root.parent
    if root / sw.cfg.name / sw.sweep_dir.name == sw.sweep_dir:
        point.cfg.output_dir = str(root)
        point.cfg.name = f"{sw.cfg.name}/{sw.sweep_dir.name}/{point.label}"
    else:  # a renamed directory: keep the runs inside it all the same
        point.cfg.output_dir = str(sw.sweep_dir)
        point.cfg.name = point.label


def _point_of(trial: Any, sw: Sweep) -> Point:
    attrs = trial.user_attrs
    index, seed, k = int(attrs["index"]), int(attrs["seed"]), int(attrs["point"])
    if sw.grid_points is not None:
        p = copy.deepcopy(sw.grid_points[index])
        p.params = sw.grid_params.get(index)
        return p
    values = suggest(trial, sw.space)
    seeds = sw.cfg.sweep.seeds
    if sw.cfg.sweep.search == "tpe" and index % len(seeds) == 0 and not attrs.get("siblings"):
        trial.set_user_attr("siblings", True)
        for j, s in enumerate(seeds[1:], start=1):
            sw.study.enqueue_trial(dict(trial.params), user_attrs={"index": index + j, "point": k, "seed": s})
    p = make_point(sw.cfg, values, seed, _label(values, seed, _short_names(list(sw.space)), k), index)
    p.params = count_params(p.cfg)
    return p


def _row(
    point: Point,
    sw: Sweep,
    run_dir: Path | None,
    status: str,
    error: str | None,
) -> dict[str, Any]:
    """The table row of one run: its values, then everything else read back from the run's metrics.json."""
    short = _short_names(list(sw.space))
    row: dict[str, Any] = {}
    if sw.grid_points is None:
        row["point"] = point.index // len(sw.cfg.sweep.seeds)
    row |= {short[k]: (_value_text(v) if isinstance(v, list) else v) for k, v in point.values.items()}
    row |= {"seed": point.seed, "status": status, "params": point.params}
    info: dict[str, Any] = {}
    if run_dir is not None and (run_dir / "metrics.json").is_file():
        with contextlib.suppress(OSError, ValueError):
            info = json.loads((run_dir / "metrics.json").read_text())
    for k, v in sorted((info.get("metrics") or {}).items()):
        if k.endswith("_step"):
            continue
        row[k] = v
        if k.endswith("/acc") and isinstance(v, float):
            row[k.removesuffix("acc") + "error"] = 1.0 - v
    row |= {"epochs": info.get("epochs"), "steps": info.get("steps"), "seconds": info.get("wall_seconds")}
    row["run_dir"] = str(run_dir.relative_to(sw.sweep_dir)) if run_dir is not None else ""
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


def _interrupted_checkpoint(label_dir: Path) -> str | None:
    """The last.ckpt of the point's newest run if that run was interrupted or killed (no metrics.json) and
    the checkpoint loads: a run that runs again continues there instead of from scratch."""
    from deepnets.checkpoint import load_checkpoint

    run_dir = _latest_version(label_dir)
    if run_dir is None or not (run_dir / "checkpoints" / "last.ckpt").is_file():
        return None
    with contextlib.suppress(OSError, ValueError):
        if json.loads((run_dir / "metrics.json").read_text()).get("status") != "interrupted":
            return None
    try:
        load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    except UserError:  # written half when the process was killed: start afresh
        return None
    return str(run_dir / "checkpoints" / "last.ckpt")


def _finish(sw: Sweep, trial: Any, row: dict[str, Any], value: float | None, state: Any) -> None:
    trial.set_user_attr("row", row)
    trial.set_user_attr("status", row["status"])
    trial.set_user_attr("finished", time.time())
    if value is not None:
        sw.study.tell(trial, value)
    else:
        sw.study.tell(trial, state=state)


def _share_machine(cfg: Config, slot: int, n: int) -> None:
    """Local worker `slot` of `n`: `cores // n` threads (trainer.threads: auto) and one GPU (round robin),
    written into the run's config so its config.yaml records them."""
    if n <= 1:
        return
    if cfg.trainer.threads == "auto":
        cfg.trainer.threads = max(1, len(os.sched_getaffinity(0)) // n)
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda"):
        import torch

        if torch.cuda.is_available() and torch.cuda.device_count() > 0:
            cfg.trainer.devices = [slot % torch.cuda.device_count()]


def run_trial(sw: Sweep, trial: Any, tag: str, flag: StopFlag, slot: tuple[int, int] = (0, 1)) -> dict[str, Any]:
    """Run the claimed trial's point with `deepnets.run.train`; record its row and outcome in the study."""
    from optuna.trial import TrialState

    from deepnets.run import train  # Lightning: imported once the sweep is known to be valid

    trial.set_user_attr("worker", _worker_id())
    trial.set_user_attr("started", time.time())
    heartbeat = _Heartbeat(sw.storage, trial._trial_id)
    try:
        try:
            point = _point_of(trial, sw)
        except UserError as e:  # a sampled combination the config rejects: this point fails, the sweep goes on
            a, short, params = trial.user_attrs, _short_names(list(sw.space)), trial.params
            values = {short[k]: _decode(spec, params[k]) for k, spec in sw.space.items() if k in params}
            row = {"point": a["point"], **values, "seed": a["seed"], "status": "failed", "error": str(e)}
            _finish(sw, trial, row, None, TrialState.FAIL)
            print(f"[{tag}] point {a['point']}, seed {a['seed']}: failed: {e}", file=sys.stderr, flush=True)
            return row
        _share_machine(point.cfg, *slot)
        _run_dir_cfg(point, sw)
        print(f"[{tag}] {point.label} ({point.params:,} parameters)", flush=True)
        pruner = _Pruner(trial, sw.cfg.sweep.metric) if sw.cfg.sweep.prune != "none" else None
        # enqueued again by a resume (retry) or by Optuna's stale-heartbeat callback (failed_trial)
        frozen = sw.storage.get_trial(trial._trial_id)
        again = frozen.user_attrs.get("retry") or "failed_trial" in frozen.system_attrs
        ckpt = _interrupted_checkpoint(Path(point.cfg.output_dir) / point.cfg.name) if again else None
        if ckpt is not None:
            print(f"[{tag}]     continuing from {ckpt}", flush=True)
        try:
            with _quiet_lightning():
                r = train(point.cfg, resume=ckpt, callbacks=[pruner] if pruner else [])
        except UserError as e:
            run_dir = _latest_version(Path(point.cfg.output_dir) / point.cfg.name)
            _finish(sw, trial, _row(point, sw, run_dir, "failed", str(e)), None, TrialState.FAIL)
            raise UserError(f"sweep run {point.label}: {e}") from None
        except Exception as e:  # a crash in one run must not lose the others
            traceback.print_exc(file=sys.stderr)
            run_dir = _latest_version(Path(point.cfg.output_dir) / point.cfg.name)
            row = _row(point, sw, run_dir, "failed", f"{type(e).__name__}: {e}")
            _finish(sw, trial, row, None, TrialState.FAIL)
            return row
        status = r.status
        if pruner is not None and pruner.pruned_epoch is not None and r.ok:
            status = "pruned"
        row = _row(point, sw, r.run_dir, status, r.error)
        if status == "pruned":
            row["pruned_at_epoch"] = pruner.pruned_epoch  # type: ignore[union-attr]
        if r.signum is not None and flag.signum is None:
            flag.signum = r.signum  # the run's own handler took the signal: stop the sweep too
        value = row.get(sw.cfg.sweep.metric)
        if status == "pruned":
            _finish(sw, trial, row, None, TrialState.PRUNED)
        elif r.ok and isinstance(value, float) and math.isfinite(value):
            _finish(sw, trial, row, value, None)
        else:
            _finish(sw, trial, row, None, TrialState.FAIL)
        shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
        print(f"[{tag}]     {status}: {sw.cfg.sweep.metric} = {shown}", flush=True)
        return row
    finally:
        heartbeat.stop()


def work(sw: Sweep, flag: StopFlag, tag: str | None = None, slot: tuple[int, int] = (0, 1)) -> bool:
    """Claim and run trials until none waits or a signal arrives; True if every run here ended ok.

    `slot`: (i, n) for local worker i of n, which share this machine's cores and GPUs.
    """
    from optuna.storages import fail_stale_trials

    tag = tag or _worker_id()
    if sw.cfg.sweep.vectorize:  # the points trained together as stacked models (deepnets/stacked.py)
        from deepnets.stacked import work_stacked

        return work_stacked(sw, flag, tag)
    ok = True
    while flag.signum is None:
        fail_stale_trials(sw.study)  # a dead worker's trial (no heartbeat): failed, enqueued once more
        trial = claim(sw.study)
        if trial is None:
            break
        row = run_trial(sw, trial, tag, flag, slot)
        ok &= row["status"] in OK
        write_report(sw, plot=False)  # after every run: a stopped sweep keeps its table
    return ok


# ---------------------------------------------------------------- the table


def rows_of(study: Any) -> list[dict[str, Any]]:
    """One row per run of the sweep, in its order: the final attempt where there is one, else the latest."""
    best: dict[int, Any] = {}
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if "row" not in a or "index" not in a:
            continue
        i = int(a["index"])
        cur = best.get(i)
        final, cur_final = a.get("status") in FINAL, cur is not None and cur.user_attrs.get("status") in FINAL
        if cur is None or (final and not cur_final) or (final == cur_final and t.number > cur.number):
            best[i] = t
    return [dict(best[i].user_attrs["row"]) for i in sorted(best)]


def _runs_without_row(study: Any) -> int:
    """The sweep's runs (grid indices) that no trial has reported a row for."""
    indices, reported = set(), set()
    for t in study.get_trials(deepcopy=False):
        if "index" in t.user_attrs:
            indices.add(int(t.user_attrs["index"]))
            if "row" in t.user_attrs:
                reported.add(int(t.user_attrs["index"]))
    return len(indices - reported)


def _replace_into(write: Any, target: Path) -> None:
    """Write through a temporary file and rename: several workers may rewrite the same table."""
    tmp = target.with_name(f".{target.stem}.{os.getpid()}{target.suffix}")
    write(tmp)
    if tmp.exists():  # nothing to draw (no run reported the metric yet): nothing written
        os.replace(tmp, target)


def write_report(sw: Sweep, plot: bool = True) -> list[dict[str, Any]]:
    from deepnets.experiments.common import write_table

    rows = rows_of(sw.study)
    if not rows:
        return rows
    stem = sw.sweep_dir / f".results-{os.getpid()}"  # one per worker: ".results.<pid>" lost its pid to with_suffix
    write_table(rows, stem)
    os.replace(stem.with_suffix(".csv"), sw.sweep_dir / "results.csv")
    os.replace(stem.with_suffix(".md"), sw.sweep_dir / "results.md")
    if plot:
        _replace_into(lambda p: plot_sweep(rows, sw.cfg, p), sw.sweep_dir / "sweep.png")
    return rows


# ---------------------------------------------------------------- running: local workers


def _die_with_parent() -> None:
    """In a local worker: SIGTERM when the sweep process dies (even by SIGKILL), so no worker outlives it."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _spawn_workers(sw: Sweep, n: int, flag: StopFlag) -> list[subprocess.Popen[bytes]]:
    """n local workers as processes (`deepnets --sweep-worker SWEEP_DIR`), started together so that they
    import Lightning side by side and share the queue from the first run on."""
    procs = []
    for i in range(n):
        env = {**os.environ, SLOT_ENV: f"{i}/{n}"}
        cmd = [sys.executable, "-m", "deepnets.cli", "--sweep-worker", str(sw.sweep_dir)]
        procs.append(subprocess.Popen(cmd, env=env, preexec_fn=_die_with_parent if os.name == "posix" else None))
        flag.forward.append(procs[-1])
    return procs


def drive(sw: Sweep, workers: int, *, verbose: bool = True) -> SweepResult:
    """Run the sweep's waiting trials with `workers` local workers (1: in this process); write the report."""
    flag = StopFlag()
    codes: list[int] = []
    with flag.installed():
        if workers <= 1:
            work(sw, flag, tag="sweep")
        else:
            if verbose:
                print(f"sweep: {workers} local workers", flush=True)
            codes = [p.wait() for p in _spawn_workers(sw, workers, flag)]
    if flag.signum is None:
        flag.signum = next((c - 128 for c in codes if c > 128), None)
    rows = write_report(sw)
    result = SweepResult(sw.sweep_dir, rows, signum=flag.signum, missing=_runs_without_row(sw.study))
    result.ok = (
        flag.signum is None and all(c == 0 for c in codes) and all(r["status"] in OK for r in rows)
    ) and not result.missing
    if verbose and not rows:
        print(f"sweep: no run reported {sw.cfg.sweep.metric!r}; sweep.png not drawn", file=sys.stderr)
    return result


def sweep(cfg: Config, *, verbose: bool = True) -> SweepResult:
    """Create the sweep of `cfg.sweep` and run it with `sweep.workers` local workers; results in its directory."""
    sweep_dir, _name, _ = create_sweep(cfg, verbose=verbose)
    if cfg.sweep.workers == 0:
        if verbose:
            print(f"sweep: created; join it with: deepnets --sweep-worker {sweep_dir}", flush=True)
        return SweepResult(sweep_dir)
    sw = open_sweep(sweep_dir)
    return drive(sw, cfg.sweep.workers, verbose=verbose)


def _alive_here(t: Any) -> bool:
    """A RUNNING trial of a worker on this machine whose process still exists."""
    host, _, pid = str(t.user_attrs.get("worker", "")).rpartition(":")
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def requeue_unfinished(sw: Sweep) -> int:
    """Before a resume: every run without a final outcome (failed, interrupted, its worker gone) is enqueued once.

    A RUNNING trial counts as gone when its worker was on this machine and its process is dead, or (RDB
    storages) its heartbeat is stale; on a journal file, a RUNNING trial of another machine counts as gone
    (that storage has no heartbeat): resume a journal sweep only when no worker runs elsewhere.
    """
    from optuna.storages import fail_stale_trials
    from optuna.storages._heartbeat import BaseHeartbeat
    from optuna.trial import TrialState

    fail_stale_trials(sw.study)
    heartbeat = isinstance(sw.storage, BaseHeartbeat)
    by_index: dict[int, list[Any]] = defaultdict(list)
    for t in sw.study.get_trials(deepcopy=False):
        if "index" in t.user_attrs:
            by_index[int(t.user_attrs["index"])].append(t)
    n = 0
    for _index, ts in sorted(by_index.items()):
        if any(t.user_attrs.get("status") in FINAL for t in ts) or any(t.state == TrialState.WAITING for t in ts):
            continue
        running = [t for t in ts if t.state == TrialState.RUNNING]
        here = socket.gethostname()
        # a RUNNING trial without a `worker` attr: its claimer died between the claim and recording itself
        # (a live one records it right after the claim), so it is gone, not "running elsewhere"
        if any(
            _alive_here(t)
            or (heartbeat and "worker" in t.user_attrs and not str(t.user_attrs["worker"]).startswith(here + ":"))
            for t in running
        ):
            continue  # still being run by a live worker
        for t in running:  # its worker is gone: record the attempt as interrupted
            with contextlib.suppress(Exception):
                sw.storage.set_trial_user_attr(t._trial_id, "status", "interrupted")
                sw.storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL)
        last = max(ts, key=lambda t: t.number)
        attrs = {k: last.user_attrs[k] for k in ("index", "point", "seed", "siblings") if k in last.user_attrs}
        sw.study.enqueue_trial(dict(last.params), user_attrs={**attrs, "retry": True})
        n += 1
    return n


def resume(sweep_dir: str | Path, cfg: Config | None = None, *, verbose: bool = True) -> SweepResult:
    """`deepnets --resume SWEEP_DIR`: run what is left (failed and interrupted runs once more), then report."""
    sw = open_sweep(sweep_dir)
    workers = sw.cfg.sweep.workers
    if cfg is not None:  # --config given too: it must be the sweep's (only sweep.workers may change)
        mine, theirs = cfg.to_dict(), sw.cfg.to_dict()
        workers = cfg.sweep.workers
        mine["sweep"]["workers"] = theirs["sweep"]["workers"]
        diff = _first_difference(theirs, mine)
        if diff is not None:
            raise UserError(
                f"--resume {sweep_dir}: the config differs from its sweep.yaml at {diff}; resume without --config"
            )
    n = requeue_unfinished(sw)
    done = sum(1 for r in rows_of(sw.study) if r["status"] in FINAL)
    if verbose:
        print(f"sweep: resuming {sw.sweep_dir}: {done} runs done, {n} to run again", flush=True)
    return drive(sw, max(workers, 1), verbose=verbose)


def _first_difference(a: Any, b: Any, prefix: str = "") -> str | None:
    if isinstance(a, dict) and isinstance(b, dict):
        for k in dict.fromkeys([*a, *b]):
            d = _first_difference(a.get(k), b.get(k), f"{prefix}{k}.")
            if d is not None:
                return d
        return None
    return None if a == b else prefix.rstrip(".")


# ---------------------------------------------------------------- CLI entry points


def _print_summary(res: SweepResult) -> None:
    print()
    print((res.sweep_dir / "results.md").read_text() if res.rows else "(no runs)")
    bad = [r for r in res.rows if r["status"] not in OK]
    ok = len(res.rows) - len(bad)
    total = len(res.rows) + res.missing
    print(f"sweep: {ok}/{total} runs ok; table: {res.sweep_dir}/results.md, plot: {res.sweep_dir}/sweep.png")
    if res.missing:
        print(
            f"sweep: {res.missing} run(s) without an outcome (running elsewhere, or their worker died); "
            f"deepnets --resume {res.sweep_dir} runs what is left",
            file=sys.stderr,
        )


def _exit_code(res: SweepResult) -> int:
    if res.signum is not None:
        print(
            f"error: sweep stopped by {signal.Signals(res.signum).name}; continue it with: "
            f"deepnets --resume {res.sweep_dir}",
            file=sys.stderr,
        )
        return 128 + res.signum
    return 0 if res.ok else 1


def run_sweep(cfg: Config) -> bool:
    """A config with a `sweep:` section: run it, print the table; True if every run ended ok."""
    res = sweep(cfg)
    _print_summary(res)
    return res.ok


def sweep_command(cfg: Config) -> int:
    """`deepnets --config X` with a sweep: the exit code (0 ok, 1 a run not ok, 128+signal when stopped)."""
    res = sweep(cfg)
    if cfg.sweep.workers == 0:
        return 0
    _print_summary(res)
    return _exit_code(res)


def resume_command(target: str, cfg: Config | None) -> int:
    """`deepnets --resume SWEEP_DIR` (or `--resume last` with a sweep config)."""
    if target == "last":
        if cfg is None:
            raise UserError("--resume last needs --config (the sweep to continue)")
        root = Path(cfg.output_dir) / cfg.name
        dirs = [p for p in root.glob("sweep_*") if p.name[6:].isdigit() and is_sweep_dir(p)]
        if not dirs:
            raise UserError(f"--resume last: no sweep directory under {root}/sweep_*")
        target = str(max(dirs, key=lambda p: int(p.name[6:])))
    res = resume(target, cfg)
    _print_summary(res)
    return _exit_code(res)


def worker_command(target: str, study: str | None) -> int:
    """`deepnets --sweep-worker SWEEP_DIR` or `--sweep-worker STORAGE_URL --study NAME`: join, work, exit."""
    slot, n = _slot()
    # a local worker: its slot; one joining from elsewhere: any offset unlikely to match another's
    offset = slot if SLOT_ENV in os.environ else 1000 + os.getpid()
    sw = open_sweep(target, offset=offset) if study is None else open_sweep(storage=target, study=study, offset=offset)
    tag = f"worker {slot}" if n > 1 else _worker_id()
    flag = StopFlag()
    with flag.installed():
        ok = work(sw, flag, tag=tag, slot=(slot, n))
    rows = write_report(sw, plot=SLOT_ENV not in os.environ)  # a local worker: the sweep process draws it
    if SLOT_ENV not in os.environ:
        done = sum(1 for r in rows if r["status"] in FINAL)
        print(f"sweep worker {_worker_id()}: done; {done} runs of {sw.sweep_dir} finished so far", flush=True)
    if flag.signum is not None:
        return 128 + flag.signum
    return 0 if ok else 1


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
    """`sweep.metric` against `sweep.x_key`: mean over seeds, min-max band, one line per other-key combination.

    Sampled sweeps (random / tpe) are one scatter: their points share no grid to draw lines along.
    """
    from deepnets.experiments.common import plt, save_figure

    keys = list(cfg.sweep.params)
    short = _short_names(keys)
    x_key = cfg.sweep.x_key or keys[0]
    x_col = PARAMS_X if x_key == PARAMS_X else short[x_key]
    sampled = cfg.sweep.search != "grid"
    group_cols = [] if sampled else [short[k] for k in keys if k != x_key]
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
        if sampled:
            ax.plot([xi for xi, v in zip(x, ys, strict=True) for _ in v], [y for v in ys for y in v], "o", ms=4)
            continue
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
    if sampled:
        spread = f"{cfg.sweep.search}, every run"
    else:
        spread = f"mean and min-max over {n_seeds} seeds" if n_seeds > 1 else "one seed"
    ax.set_title(f"{cfg.name}: {metric} ({spread})", fontsize=10)
    ax.set_xlabel("parameters" if x_col == PARAMS_X else x_key)
    ax.set_ylabel(metric)
    ax.grid(True, which="both", alpha=0.3)
    if group_cols:
        ax.legend(fontsize=8)
    return save_figure(fig, path)


__all__ = [
    "Point",
    "SweepResult",
    "check_sweep",
    "count_params",
    "create_sweep",
    "grid",
    "make_point",
    "open_sweep",
    "plot_sweep",
    "resume",
    "run_sweep",
    "series",
    "sweep",
]
