"""Sweep workers as real processes: two local workers, a killed and resumed sweep, workers that join one storage
(SQLite in the sweep directory; a real PostgreSQL server on loopback)."""

from __future__ import annotations

import csv
import glob
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from deepnets.config import load_config
from deepnets.sweep import create_sweep, open_storage, open_sweep

from .conftest import ROOT, TINY

QUIET = ["logging.tensorboard=false", "logging.grad_norm_every_n_steps=0", "checkpoint.enabled=false"]
ENV = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


def _args(tmp_path: Path, *overrides: str) -> list[str]:
    return ["--config", "mlp", *TINY, *QUIET, f"output_dir={tmp_path / 'runs'}", *overrides]


def _start(tmp_path: Path, tag: str, *args: str) -> subprocess.Popen[str]:
    """`python train.py ARGS` in the background, its output in files (a full pipe would block it)."""
    out = open(tmp_path / f"{tag}.out", "w")  # noqa: SIM115 - closed with the process
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args], stdout=out, stderr=subprocess.STDOUT, text=True, env=ENV
    )


def _wait(proc: subprocess.Popen[str], tmp_path: Path, tag: str, timeout: float = 300) -> tuple[int, str]:
    try:
        rc = proc.wait(timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
    return rc, (tmp_path / f"{tag}.out").read_text()


def _rows(sweep_dir: Path) -> list[dict[str, str]]:
    with open(sweep_dir / "results.csv", newline="") as f:
        return list(csv.DictReader(f))


def _check_every_run_once(sweep_dir: Path, n: int) -> list:
    """n runs, each with exactly one completed trial and one table row pointing at its run directory."""
    trials = open_sweep(sweep_dir).study.get_trials(deepcopy=False)
    done = sorted(t.user_attrs["index"] for t in trials if t.user_attrs.get("status") == "completed")
    assert done == list(range(n)), [(t.user_attrs, t.state) for t in trials]
    rows = _rows(sweep_dir)
    assert len(rows) == n and {r["status"] for r in rows} == {"completed"}
    for r in rows:
        info = json.loads((sweep_dir / r["run_dir"] / "metrics.json").read_text())
        assert float(r["test/acc"]) == info["metrics"]["test/acc"] and info["status"] == "completed"
    return [t for t in trials if t.user_attrs.get("status") == "completed"]


def _spans(trials: list) -> dict[str, tuple[float, float]]:
    """worker -> (first start, last finish) of the runs it completed."""
    out: dict[str, tuple[float, float]] = {}
    for t in trials:
        w, a, b = t.user_attrs["worker"], t.user_attrs["started"], t.user_attrs["finished"]
        lo, hi = out.get(w, (a, b))
        out[w] = (min(lo, a), max(hi, b))
    return out


# Each run trains long enough (90 epochs, ~1.9 s) that two worker processes started together are busy at the
# same time: one alone would need ~11 s for the six, several times their start-up skew. With 6 epochs (~0.16 s
# a run) a CI box saw one worker run all six before the other had finished importing.
SIX = ["sweep.params={model.width: [4, 8, 16]}", "sweep.seeds=[0, 1]", "trainer.max_epochs=90"]


def test_two_local_workers_run_every_point_once_and_overlap(tmp_path: Path) -> None:
    proc = _start(tmp_path, "sweep", *_args(tmp_path, *SIX, "sweep.workers=2"))
    rc, out = _wait(proc, tmp_path, "sweep")
    assert rc == 0, out
    sweep_dir = tmp_path / "runs" / "tiny" / "sweep_0"
    trials = _check_every_run_once(sweep_dir, 6)
    spans = _spans(trials)
    assert len(spans) == 2 and f"{socket.gethostname()}:{proc.pid}" not in spans, spans  # two worker processes
    (a0, a1), (b0, b1) = spans.values()
    assert a0 < b1 and b0 < a1, spans  # busy at the same time
    assert [p.name for p in sweep_dir.glob("*/version_*")] == ["version_0"] * 6
    threads = max(1, len(os.sched_getaffinity(0)) // 2)  # cores // workers, recorded in each run's config
    for cfg_path in sweep_dir.glob("*/version_0/config.yaml"):
        assert load_config(str(cfg_path)).trainer.threads == threads
    assert (sweep_dir / "sweep.png").stat().st_size > 1000 and "sweep: 6/6 runs ok" in out


@pytest.mark.parametrize(("sig", "workers"), [(signal.SIGKILL, 1), (signal.SIGTERM, 2)])
def test_killed_sweep_resumes_without_redoing_its_first_point(
    tmp_path: Path, sig: signal.Signals, workers: int
) -> None:
    args = _args(tmp_path, "sweep.params={model.width: [4, 8, 16]}", "trainer.max_epochs=8", f"sweep.workers={workers}")
    if sig == signal.SIGTERM:
        args.append("checkpoint.enabled=true")  # an interrupted run continues from its last.ckpt
    proc = _start(tmp_path, "sweep", *args)
    sweep_dir = tmp_path / "runs" / "tiny" / "sweep_0"
    deadline = time.monotonic() + 300
    # until the first point is in the table (with 2 workers, another one may be too)
    while not ((sweep_dir / "results.csv").is_file() and any(r["width"] == "4" for r in _rows(sweep_dir))):
        assert proc.poll() is None and time.monotonic() < deadline, (tmp_path / "sweep.out").read_text()
        time.sleep(0.05)
    proc.send_signal(sig)
    rc, out = _wait(proc, tmp_path, "sweep")
    assert rc == (-signal.SIGKILL if sig == signal.SIGKILL else 128 + signal.SIGTERM), out
    if sig == signal.SIGTERM:  # every local worker stopped; the table keeps what was done
        assert f"error: sweep stopped by SIGTERM; continue it with: deepnets --resume {sweep_dir}" in out
        assert 1 <= len(_rows(sweep_dir)) <= 3
    first = sweep_dir / "width=4,seed=0"
    before = (first / "version_0" / "metrics.json").read_text()
    stopped = [
        d
        for d in sweep_dir.glob("*/version_*")
        if (d / "checkpoints" / "last.ckpt").is_file()
        and json.loads((d / "metrics.json").read_text())["status"] == "interrupted"
    ]
    assert sig == signal.SIGTERM or not stopped

    rc, out = _wait(_start(tmp_path, "resume", "--resume", str(sweep_dir)), tmp_path, "resume")
    assert rc == 0, out
    assert "sweep: 3/3 runs ok" in out, out
    _check_every_run_once(sweep_dir, 3)
    assert [p.name for p in first.iterdir()] == ["version_0"]  # never redone
    assert (first / "version_0" / "metrics.json").read_text() == before
    rows = _rows(sweep_dir)
    assert rows[0]["run_dir"] == "width=4,seed=0/version_0"
    for r in rows:  # the table points at each run's newest directory: the one that completed
        versions = sorted(p.name for p in (sweep_dir / r["run_dir"]).parent.iterdir())
        assert r["run_dir"].endswith(versions[-1])
    for d in stopped:  # interrupted with a checkpoint: continued in its own directory, not started again
        info = json.loads((d / "metrics.json").read_text())
        assert info["status"] == "completed" and info["resumed_from"] == "checkpoints/last.ckpt"  # relative to the run
        assert str(d.relative_to(sweep_dir)) in [r["run_dir"] for r in rows]


# ---------------------------------------------------------------- workers joining one storage


def _pg_bin() -> Path | None:
    for d in sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True):
        if (Path(d) / "initdb").is_file() and (Path(d) / "postgres").is_file():
            return Path(d)
    found = shutil.which("pg_ctl")
    return Path(found).parent if found and (Path(found).parent / "initdb").is_file() else None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[str]:
    """A libpq URI of a PostgreSQL server: $DEEPNETS_TEST_POSTGRES (CI starts one), else a private cluster."""
    if os.environ.get("DEEPNETS_TEST_POSTGRES"):
        yield os.environ["DEEPNETS_TEST_POSTGRES"]
        return
    pg = _pg_bin()
    if pg is None:
        if os.environ.get("CI") == "true":
            pytest.fail("CI: no PostgreSQL server binary (initdb, postgres); .ci/run installs postgresql")
        pytest.skip("no PostgreSQL server binary (initdb, postgres) on this machine: apt-get install postgresql")
    base = Path(tempfile.mkdtemp(prefix="deepnets-pg-"))
    as_postgres: list[str] = []
    if os.geteuid() == 0:  # the server refuses to run as root
        shutil.chown(base, "postgres")
        as_postgres = ["runuser", "-u", "postgres", "--"]
    port = _free_port()
    data = base / "data"
    opts = f"-c listen_addresses=127.0.0.1 -p {port} -k {base} -c fsync=off -c max_connections=50"
    try:
        subprocess.run(
            [*as_postgres, str(pg / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "-E", "UTF8",
             "--no-sync"],
            check=True, capture_output=True, timeout=120,
        )  # fmt: skip
        subprocess.run(
            [*as_postgres, str(pg / "pg_ctl"), "-D", str(data), "-l", str(base / "log"), "-w", "-t", "120",
             "-o", opts, "start"],
            check=True, capture_output=True, timeout=180,
        )  # fmt: skip
    except subprocess.CalledProcessError as e:
        log = (base / "log").read_text() if (base / "log").is_file() else ""
        shutil.rmtree(base, ignore_errors=True)
        raise RuntimeError(f"could not start PostgreSQL: {e.stderr!r} {log}") from None
    try:
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        subprocess.run(
            [*as_postgres, str(pg / "pg_ctl"), "-D", str(data), "-m", "immediate", "stop"],
            capture_output=True, timeout=60,
        )  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def postgres_db(postgres_server: str) -> Iterator[str]:
    """A database of its own on the server (an SQLAlchemy URL), dropped afterwards."""
    import psycopg
    from sqlalchemy.engine import make_url

    name = f"deepnets_test_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(postgres_server, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    url = make_url(postgres_server).set(drivername="postgresql+psycopg", database=name)
    try:
        yield url.render_as_string(hide_password=False)
    finally:
        with psycopg.connect(postgres_server, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            left = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchall()
        assert not left


@pytest.mark.parametrize("where", ["sweep_dir", "postgresql"])
def test_workers_started_separately_share_one_storage(tmp_path: Path, where: str, request) -> None:
    """The multi-machine case on one machine: a sweep created, then two workers that join it on their own."""
    extra = []
    if where == "postgresql":
        url = request.getfixturevalue("postgres_db")
        extra = [f"sweep.storage={url}"]
    cfg = load_config("mlp", [*_args(tmp_path, *SIX, "sweep.workers=0", *extra)[2:]])
    sweep_dir, study, total = create_sweep(cfg, verbose=False)
    assert total == 6
    join = ["--sweep-worker", str(sweep_dir)] if where == "sweep_dir" else ["--sweep-worker", url, "--study", study]
    procs = [_start(tmp_path, f"w{i}", *join) for i in range(2)]
    results = [_wait(p, tmp_path, f"w{i}") for i, p in enumerate(procs)]
    assert [rc for rc, _ in results] == [0, 0], results
    trials = _check_every_run_once(sweep_dir, 6)
    workers = {f"{socket.gethostname()}:{p.pid}" for p in procs}
    assert set(_spans(trials)) == workers, _spans(trials)  # both took a share
    if where == "postgresql":
        assert not (sweep_dir / "study.db").exists()
        assert json.loads((sweep_dir / "study.json").read_text())["study"] == study
    assert (sweep_dir / "sweep.png").stat().st_size > 1000  # the last worker to finish draws it


_CLAIMER = """
import json, sys, time
from pathlib import Path
import optuna
from deepnets.sweep import claim, open_storage
optuna.logging.set_verbosity(optuna.logging.ERROR)
storage, sweep_dir, start = sys.argv[1] or None, Path(sys.argv[2]), float(sys.argv[3])
study = optuna.load_study(storage=open_storage(storage, sweep_dir), study_name="race")
while time.time() < start:  # every claimer starts at once
    pass
print(json.dumps([t._trial_id for t in iter(lambda: claim(study), None)]))
"""


@pytest.mark.parametrize("where", ["sqlite", "journal", "postgresql"])
def test_concurrent_claims_take_each_queued_trial_once(tmp_path: Path, where: str, request) -> None:
    """Four processes emptying one queue at the same instant: every trial is claimed by exactly one of them
    (on SQLite, Optuna's read-then-set-RUNNING was not atomic across processes until open_storage made every
    transaction BEGIN IMMEDIATE: 68 claims of 60 trials)."""
    import optuna

    storage = {"sqlite": "", "journal": str(tmp_path / "race.journal")}.get(where)
    if where == "postgresql":
        storage = request.getfixturevalue("postgres_db")
    study = optuna.create_study(storage=open_storage(storage or None, tmp_path), study_name="race")
    for i in range(60):
        study.enqueue_trial({"i": i}, skip_if_exists=False)
    start = time.time() + 8  # after the four imports
    args = [sys.executable, "-c", _CLAIMER, storage or "", str(tmp_path), str(start)]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True, "env": ENV, "cwd": ROOT}
    procs = [subprocess.Popen(args, **pipes) for _ in range(4)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0] * 4, outs
    claimed = [i for out, _ in outs for i in json.loads(out)]
    assert sorted(claimed) == sorted(t._trial_id for t in study.get_trials(deepcopy=False)), claimed
