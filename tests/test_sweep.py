"""Sweeps: the grid, its run directories, the results table and plot; errors named before anything runs."""

from __future__ import annotations

import csv
import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from deepnets.cli import main as cli_main
from deepnets.config import load_config
from deepnets.errors import UserError
from deepnets.experiments import double_descent
from deepnets.experiments.__main__ import main as experiments_main
from deepnets.sweep import claim, create_sweep, grid, open_sweep, resume, run_sweep, series, sweep

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


# ---------------------------------------------------------------- Optuna: search, storage, resume, pruning


def _trials(sweep_dir: Path):
    return open_sweep(sweep_dir).study.get_trials(deepcopy=False)


def test_sweep_table_numbers_are_the_runs_metrics_json(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 8]}", "sweep.seeds=[0, 1]")
    res = sweep(cfg, verbose=False)
    rows = _csv(res.sweep_dir / "results.csv")
    assert len(rows) == 4 and len(res.rows) == 4
    for row, mem in zip(rows, res.rows, strict=True):
        info = json.loads((res.sweep_dir / row["run_dir"] / "metrics.json").read_text())
        assert info["metrics"], row
        for k, v in info["metrics"].items():
            assert mem[k] == v and float(row[k]) == pytest.approx(v, rel=1e-12), k  # csv: full precision
        assert mem["test/error"] == pytest.approx(1 - info["metrics"]["test/acc"])
        assert (int(row["epochs"]), int(row["steps"])) == (info["epochs"], info["steps"])
    # the study holds one COMPLETE trial per run, told the metric of its row
    trials = _trials(res.sweep_dir)
    assert [t.state.name for t in trials] == ["COMPLETE"] * 4
    assert [t.value for t in trials] == [r["test/acc"] for r in res.rows]
    assert (res.sweep_dir / "study.db").is_file() and json.loads((res.sweep_dir / "study.json").read_text()) == {
        "storage": None,
        "study": f"tiny/{res.sweep_dir.name}",
    }


def _sampled(tmp_path: Path, search: str, seed: int, *extra: str) -> list[tuple]:
    cfg = _cfg(
        tmp_path,
        f"sweep.search={search}",
        "sweep.params={optim.lr: {low: 0.001, high: 0.5, log: true}, model.depth: {low: 1, high: 3},"
        " model.activation: [relu, tanh]}",
        "sweep.trials=3",
        f"sweep.sampler_seed={seed}",
        "sweep.metric=test/loss",
        *extra,
    )
    res = sweep(cfg, verbose=False)
    assert res.ok and (res.sweep_dir / "sweep.png").is_file()
    return [(r["point"], r["lr"], r["depth"], r["activation"], r["seed"]) for r in res.rows]


@pytest.mark.parametrize("search", ["random", "tpe"])
def test_sweep_sampler_seed_gives_the_same_trial_list(tmp_path: Path, search: str) -> None:
    first = _sampled(tmp_path, search, 7, "sweep.seeds=[0, 1]")
    assert first == _sampled(tmp_path, search, 7, "sweep.seeds=[0, 1]")
    assert [p[0] for p in first] == [0, 0, 1, 1, 2, 2] and [p[4] for p in first] == [0, 1] * 3
    for a, b in zip(first[::2], first[1::2], strict=True):  # every seed of a point runs the point's values
        assert a[1:4] == b[1:4]
    lrs = [p[1] for p in first[::2]]
    assert len(set(lrs)) == 3 and all(0.001 <= lr <= 0.5 for lr in lrs)
    assert all(isinstance(p[2], int) and 1 <= p[2] <= 3 for p in first)  # an int range stays int
    assert first != _sampled(tmp_path, search, 8, "sweep.seeds=[0, 1]")


def test_sweep_prune_median_stops_hopeless_points(tmp_path: Path) -> None:
    # 5 good runs first (MedianPruner's startup), then 5 with a learning rate that learns nothing
    cfg = _cfg(
        tmp_path,
        "trainer.max_steps=-1",
        "trainer.max_epochs=4",
        "data.num_samples=400",
        "sweep.params={optim.lr: [0.5, 1.0e-7]}",
        "sweep.seeds=[0, 1, 2, 3, 4]",
        "sweep.metric=test/error",
        "sweep.prune=median",
    )
    res = sweep(cfg, verbose=False)
    good, bad = res.rows[:5], res.rows[5:]
    assert {r["status"] for r in good} == {"completed"}
    pruned = [r for r in bad if r["status"] == "pruned"]
    assert pruned, bad
    trials = _trials(res.sweep_dir)
    for r in pruned:
        info = json.loads((res.sweep_dir / r["run_dir"] / "metrics.json").read_text())
        assert r["pruned_at_epoch"] == info["epochs"] == r["epochs"] < 4  # stopped early, at that epoch
        t = trials[int(res.rows.index(r))]
        assert t.state.name == "PRUNED" and max(t.intermediate_values) == r["pruned_at_epoch"] - 1
        # what was reported is the run's own val error (1 - val/acc) at its last epoch
        assert t.intermediate_values[r["pruned_at_epoch"] - 1] == pytest.approx(r["val/error"])
    assert res.ok  # pruning is a decision, not a failure


def test_sweep_journal_storage(tmp_path: Path) -> None:
    journal = tmp_path / "shared" / "dd.journal"
    journal.parent.mkdir()
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 8]}", f"sweep.storage={journal}")
    res = sweep(cfg, verbose=False)
    assert res.ok and len(res.rows) == 2 and journal.stat().st_size > 0
    assert not (res.sweep_dir / "study.db").exists()
    assert json.loads((res.sweep_dir / "study.json").read_text())["storage"] == str(journal.resolve())


def test_claim_pops_the_queue_in_order_and_never_creates_a_trial(tmp_path: Path) -> None:
    # `claim` leans on optuna.Study._pop_waiting_trial_id (private): this fails when it moves or changes
    import optuna

    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 's.db'}")
    for i in range(3):
        study.enqueue_trial({}, user_attrs={"index": i})
    got = [claim(study) for _ in range(4)]
    assert [t.user_attrs["index"] for t in got[:3]] == [0, 1, 2] and got[3] is None
    assert [t.state.name for t in study.get_trials()] == ["RUNNING"] * 3  # nothing new was created


def test_heartbeat_of_a_claimed_trial_reaches_the_storage(tmp_path: Path) -> None:
    # `_Heartbeat` leans on optuna.storages._heartbeat (private) and Study._storage / Trial._trial_id
    import sqlite3

    from optuna.storages._heartbeat import BaseHeartbeat, is_heartbeat_enabled

    from deepnets.sweep import _Heartbeat, _optuna, open_storage

    optuna = _optuna()
    optuna.create_study(study_name="s", storage=open_storage(None, tmp_path)).enqueue_trial({})
    study = optuna.load_study(study_name="s", storage=open_storage(None, tmp_path))
    assert isinstance(study._storage, BaseHeartbeat) and is_heartbeat_enabled(study._storage)
    trial = claim(study)
    _Heartbeat(study._storage, trial._trial_id).stop()
    beats = sqlite3.connect(tmp_path / "study.db").execute("SELECT trial_id FROM trial_heartbeats").fetchall()
    assert beats == [(trial._trial_id,)]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def test_resume_runs_what_is_left_and_an_interrupted_run_again(tmp_path: Path, capsys) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 8, 16]}", "sweep.workers=0")
    sweep_dir, _, total = create_sweep(cfg, verbose=False)
    assert total == 3 and not (sweep_dir / "results.csv").exists()  # workers: 0 only creates it
    sw = open_sweep(sweep_dir)
    # a worker on this machine claimed the first run and died (its process is gone)
    t = claim(sw.study)
    t.set_user_attr("worker", f"{socket.gethostname()}:{_dead_pid()}")
    res = resume(sweep_dir, verbose=False)
    assert res.ok and [r["width"] for r in res.rows] == [4, 8, 16]
    trials = _trials(sweep_dir)
    # (workers other than 1 claim a grid's runs largest first: width 16, 8, 4; the interrupted one runs again last)
    assert [(x.user_attrs["index"], x.user_attrs.get("status")) for x in trials] == [
        (2, "interrupted"),
        (1, "completed"),
        (0, "completed"),
        (2, "completed"),
    ]
    # resuming a finished sweep runs nothing and keeps its table
    before = {p.name for p in sweep_dir.glob("*/version_*")}
    res2 = resume(sweep_dir, verbose=False)
    assert res2.rows == res.rows and {p.name for p in sweep_dir.glob("*/version_*")} == before
    assert len(_trials(sweep_dir)) == 4


def test_a_run_claimed_by_a_worker_that_died_before_recording_itself_runs_again(tmp_path: Path, capsys) -> None:
    # killed between Optuna's claim (RUNNING) and setting its `worker` attr: gone, not "running elsewhere"
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 8]}", "sweep.workers=0")
    sweep_dir, _, _ = create_sweep(cfg, verbose=False)
    assert claim(open_sweep(sweep_dir).study) is not None  # no worker attr set
    res = resume(sweep_dir, verbose=False)
    assert res.ok and not res.missing and [r["width"] for r in res.rows] == [4, 8]


def test_a_sweep_with_a_run_still_running_elsewhere_is_not_ok(tmp_path: Path, capsys) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 8]}", "sweep.workers=0")
    sweep_dir, _, _ = create_sweep(cfg, verbose=False)
    sw = open_sweep(sweep_dir)
    t = claim(sw.study)
    t.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")  # alive: this very process
    res = resume(sweep_dir, verbose=False)
    assert not res.ok and res.missing == 1 and len(res.rows) == 1


def test_cli_resume_a_missing_sweep_dir_is_an_error(tmp_path: Path, capsys) -> None:
    args = ["--config", "mlp", *TINY, *FAST, f"output_dir={tmp_path}", "sweep.params={model.width: [4]}"]
    assert cli_main([*args, "--resume", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "nope" in err and len(err.strip().splitlines()) == 1
    assert cli_main([*args, "--resume", "last"]) == 2
    assert "--resume last: no sweep directory" in capsys.readouterr().err
    assert not any(tmp_path.glob("**/sweep_*"))


def test_cli_resume_with_a_different_config_is_an_error(tmp_path: Path, capsys) -> None:
    args = ["--config", "mlp", *TINY, *FAST, f"output_dir={tmp_path / 'runs'}", "sweep.params={model.width: [4]}"]
    sweep_dir, _, _ = create_sweep(load_config("mlp", [*args[2:], "sweep.workers=0"]), verbose=False)
    assert cli_main([*args, "optim.lr=0.3", "--resume", str(sweep_dir)]) == 2
    assert "differs from its sweep.yaml at optim.lr" in capsys.readouterr().err
    # the same config (sweep.workers may differ: it was 0, create only) continues the newest sweep
    assert cli_main([*args, "--resume", "last"]) == 0
    out = capsys.readouterr().out
    assert f"sweep: resuming {sweep_dir}: 0 runs done, 0 to run again" in out and "sweep: 1/1 runs ok" in out
    assert _csv(sweep_dir / "results.csv")[0]["status"] == "completed"


@pytest.mark.parametrize(
    ("overrides", "culprit"),
    [
        (["sweep.params={1: [2, 3]}"], "sweep.params: key 1 is not a string"),
        (["sweep.params={optim.lr: {low: 0.01, high: 0.1}}"], "sweep.params.optim.lr: a range needs sweep.search"),
        (
            ["sweep.search=random", "sweep.trials=2", "sweep.params={optim.lr: {low: 0.1, high: 0.01}}"],
            "sweep.params.optim.lr: low",
        ),
        (
            ["sweep.search=tpe", "sweep.trials=2", "sweep.params={optim.lr: {low: 0.01, hi: 0.1}}"],
            "sweep.params.optim.lr.hi: unknown key",
        ),
        (
            ["sweep.search=tpe", "sweep.trials=2", "sweep.params={optim.lr: {low: 0.0, high: 0.1, log: true}}"],
            "sweep.params.optim.lr: log: true needs low > 0",
        ),
        (
            ["sweep.search=tpe", "sweep.trials=2", "sweep.params={optim.lr: {low: x, high: 0.1}}"],
            "sweep.params.optim.lr.low: expected a number",
        ),
        (
            ["sweep.search=random", "sweep.trials=2", "sweep.params={optim.lr: {low: -1.0, high: 0.1}}"],
            "sweep.params.optim.lr: optim.lr: -1.0 is out of range",
        ),
        (
            ["sweep.search=random", "sweep.trials=2", "sweep.params={model.width: {low: 2.5, high: 8.0}}"],
            "sweep.params.model.width: model.width: expected",
        ),
        (["sweep.search=random", "sweep.params={model.width: [4]}"], "sweep.trials: required"),
        (["sweep.trials=3", "sweep.params={model.width: [4]}"], "sweep.trials: only for"),
        (["sweep.sampler_seed=3", "sweep.params={model.width: [4]}"], "sweep.sampler_seed: only for"),
        (["sweep.search=bayes", "sweep.params={model.width: [4]}"], "sweep.search: expected one of grid"),
        (["sweep.seeds=[0, 0]", "sweep.params={model.width: [4]}"], "sweep.seeds: repeated"),
        (["sweep.metric=acc", "sweep.params={model.width: [4]}"], "sweep.metric: 'acc' is not"),
        (["sweep.prune=median", "data.val_fraction=0", "sweep.params={model.width: [4]}"], "sweep.prune: median"),
        (["sweep.workers=2", "trainer.devices=2", "sweep.params={model.width: [4]}"], "sweep.workers: 2 local"),
        (["sweep.workers=-1", "sweep.params={model.width: [4]}"], "sweep.workers: -1 is out of range"),
        (["sweep.storage=nosuchdir/x.journal", "sweep.params={model.width: [4]}"], "sweep.storage: journal file"),
        (["sweep.storage=nosuch://x/y", "sweep.params={model.width: [4]}"], "sweep.storage: 'nosuch://x/y' is not"),
        (
            ["sweep.storage=postgresql://u:secret@127.0.0.1:1/db", "sweep.params={model.width: [4]}"],
            "sweep.storage: cannot open postgresql://u:***@127.0.0.1:1/db",
        ),
        (["sweep.workers=2"], "sweep.params: empty"),  # a sweep section without params is not ignored
    ],
)
def test_cli_bad_sweep_is_one_error_line_and_writes_nothing(
    tmp_path: Path, capsys, overrides: list[str], culprit: str
) -> None:
    argv = ["--config", "mlp", *TINY, *FAST, f"output_dir={tmp_path / 'runs'}", *overrides]
    assert cli_main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {culprit}"), err
    assert len(err.strip().splitlines()) == 1 and "secret" not in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--sweep-worker", "{tmp}/nope"], "{tmp}/nope: no such sweep directory"),
        (["--sweep-worker", "{tmp}"], "{tmp}: not a sweep directory"),
        (["--study", "dd/sweep_0"], "--study NAME needs --sweep-worker STORAGE_URL"),
        (["--sweep-worker", "{tmp}", "model.width=3"], "--sweep-worker takes the sweep's own config"),
        (["--sweep-worker", "sqlite:///{tmp}/s.db", "--study", "dd/sweep_0"], "--study 'dd/sweep_0': not in sqlite"),
    ],
)
def test_cli_bad_sweep_worker_is_one_error_line(tmp_path: Path, capsys, argv: list[str], message: str) -> None:
    assert cli_main([a.format(tmp=tmp_path) for a in argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: " + message.format(tmp=tmp_path)) and len(err.strip().splitlines()) == 1, err


def test_local_workers_share_cores_and_gpus(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from deepnets.sweep import _share_machine

    cores = len(os.sched_getaffinity(0))
    cfg = _cfg(tmp_path, "trainer.accelerator=auto", "trainer.devices=auto")
    _share_machine(cfg, 0, 1)  # one worker: the config as it is
    assert (cfg.trainer.threads, cfg.trainer.devices) == ("auto", "auto")
    # no GPU here: two CUDA devices stand in for a GPU box (the only part of this test that is not real)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    shares = []
    for slot in range(3):
        c = _cfg(tmp_path, "trainer.accelerator=auto", "trainer.devices=auto")
        _share_machine(c, slot, 3)
        shares.append((c.trainer.threads, c.trainer.devices))
    assert shares == [(max(1, cores // 3), [0]), (max(1, cores // 3), [1]), (max(1, cores // 3), [0])]
    c = _cfg(tmp_path, "trainer.accelerator=cpu", "trainer.threads=3")
    _share_machine(c, 1, 2)  # an explicit thread count and the CPU are the user's choice
    assert (c.trainer.threads, c.trainer.devices) == (3, 1)


def test_sampled_point_the_model_rejects_fails_alone(tmp_path: Path) -> None:
    # each choice is a valid config value, but resnet cannot take this 1-D data: those points fail, the rest run
    cfg = _cfg(tmp_path, "sweep.search=random", "sweep.params={model.arch: [mlp, resnet]}", "sweep.trials=4",
               "sweep.sampler_seed=1")  # fmt: skip
    res = sweep(cfg, verbose=False)
    by_status = {r["status"] for r in res.rows}
    assert len(res.rows) == 4 and by_status == {"completed", "failed"}, res.rows
    for r in res.rows:
        failed = r["status"] == "failed"
        assert failed == (r["arch"] == "resnet") == ("resnet needs image inputs" in r.get("error", "")), r
    assert not res.ok


def test_interrupted_run_continues_from_its_checkpoint_on_resume(tmp_path: Path, monkeypatch) -> None:
    import signal

    import lightning as L

    import deepnets.run

    class SigtermAtStep3(L.Callback):  # a real SIGTERM to this process, taken by the run's own handler
        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)

    real_train, resumes = deepnets.run.train, []

    def train(cfg, resume=None, callbacks=()):
        resumes.append(resume)
        extra = [SigtermAtStep3()] if len(resumes) == 1 else []
        return real_train(cfg, resume=resume, callbacks=[*callbacks, *extra])

    monkeypatch.setattr(deepnets.run, "train", train)
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 8]}", "checkpoint.enabled=true", "trainer.max_steps=6")
    first = sweep(cfg, verbose=False)
    assert first.signum == signal.SIGTERM and not first.ok  # the sweep stopped with its run
    assert [r["status"] for r in first.rows] == ["interrupted"]
    run_dir = first.sweep_dir / first.rows[0]["run_dir"]
    # the step in flight when the signal came (the run's last.ckpt callback runs after the others)
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 3

    res = resume(first.sweep_dir, verbose=False)
    assert res.ok and [r["status"] for r in res.rows] == ["completed", "completed"]
    ckpt = str(run_dir / "checkpoints" / "last.ckpt")
    # the run still waiting went first (the queue is FIFO), then the interrupted one went on from its last.ckpt
    assert resumes == [None, None, ckpt]
    info = json.loads((run_dir / "metrics.json").read_text())
    assert (info["status"], info["steps"], info["resumed_from"]) == ("completed", 6, "checkpoints/last.ckpt")
    assert res.rows[0]["run_dir"] == first.rows[0]["run_dir"] and int(res.rows[0]["steps"]) == 6
