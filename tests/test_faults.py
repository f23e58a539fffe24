"""Run lifecycle under faults: divergence, exact resume from every checkpoint, the run-directory lock,
other runs' checkpoints, leftovers, a full disk, and metrics.json across failures and resumes."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import shutil
import signal
import socket
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import Checkpoint

import deepnets.module
import deepnets.run
from deepnets.checkpoint import load_checkpoint
from deepnets.config import CONFIGS_DIR, load_config
from deepnets.errors import UserError
from deepnets.run import loader_states, nonfinite_weights, train
from deepnets.rundir import RunLock
from tests.conftest import ROOT, TINY, run_cli, wait_for_file


def _finite(path: Path) -> bool:
    return all(torch.isfinite(v).all() for v in load_checkpoint(path)["state_dict"].values() if v.is_floating_point())


def _metrics(run: Path) -> dict:
    return json.loads((run / "metrics.json").read_text())


# ---------------------------------------------------------------- divergence


def test_nonfinite_weights_sees_parameters_and_buffers() -> None:
    net = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.BatchNorm1d(3))
    assert not nonfinite_weights(net)
    with torch.no_grad():
        net[0].weight[0, 0] = 3e38  # finite but huge: a 2-norm would overflow, the max-abs does not
    assert not nonfinite_weights(net)
    net[1].running_var[1] = float("nan")
    assert nonfinite_weights(net)


def test_divergence_never_checkpoints_nonfinite_weights(tiny) -> None:
    """lr=1e6 with BatchNorm: BN keeps the loss finite while the updates make the weights inf, so a guard on
    the loss alone let the run checkpoint them (and end `completed`). Every checkpoint kept is finite, and
    resuming starts from it."""
    cfg = tiny("optim.lr=1e6", "model.batch_norm=true", "checkpoint.every_n_steps=1", "trainer.max_epochs=5")
    result = train(cfg)
    assert result.status == "diverged" and "weights became non-finite at step" in result.error, result
    assert nonfinite_weights(result.model)  # the weights in memory are gone ...
    ckpts = list((result.run_dir / "checkpoints").glob("*.ckpt"))
    assert ckpts and all(_finite(p) for p in ckpts)  # ... the saved ones are not
    assert _metrics(result.run_dir)["status"] == "diverged"
    seen: list[bool] = []

    class FirstWeights(L.Callback):
        def on_train_start(self, trainer, pl_module) -> None:
            seen.append(nonfinite_weights(pl_module))

    again = train(cfg, resume="last", callbacks=[FirstWeights()])
    assert seen == [False]  # the resumed run starts from finite weights (and diverges again at this lr)
    assert again.run_dir == result.run_dir and again.status == "diverged"
    assert all(_finite(p) for p in (result.run_dir / "checkpoints").glob("*.ckpt"))


# ---------------------------------------------------------------- exact resume


class Snapshots(Checkpoint):
    """Copies last.ckpt aside every time the run rewrites it (a Checkpoint, so Lightning runs it after
    the run's LastCheckpoint)."""

    def __init__(self, last: Path, out: Path) -> None:
        self.last, self.out, self.seen = last, out, None

    def _copy(self, trainer: L.Trainer, epoch_end: bool) -> None:
        if not self.last.exists():
            return
        st = self.last.stat()
        if (st.st_mtime_ns, st.st_size, st.st_ino) != self.seen:
            self.seen = (st.st_mtime_ns, st.st_size, st.st_ino)
            kind = "end" if epoch_end else "mid"
            shutil.copyfile(self.last, self.out / f"{trainer.global_step:03d}-{kind}.ckpt")

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self._copy(trainer, False)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self._copy(trainer, True)


EXACT = [
    "trainer.deterministic=true",
    "model.dropout=0.3",
    "checkpoint.every_n_steps=4",
    "scheduler.name=cosine",
    "trainer.max_epochs=3",
    "logging.grad_norm_every_n_steps=0",
]


def test_resume_from_every_checkpoint_is_bitwise_exact(tiny, tmp_path: Path) -> None:
    """Every last.ckpt the run writes, epoch-end ones included (the default with no every_n_steps), resumes to
    the uninterrupted run's final weights bit for bit. (The epoch-end case used to replay epoch 0's order.)"""
    snaps = tmp_path / "snaps"
    snaps.mkdir()
    ref = train(tiny(*EXACT), callbacks=[Snapshots(tmp_path / "runs/tiny/version_0/checkpoints/last.ckpt", snaps)])
    assert ref.status == "completed"
    final = load_checkpoint(ref.run_dir / "checkpoints" / "last.ckpt")
    names = sorted(p.name for p in snaps.iterdir())
    # 6 steps an epoch: mid-epoch saves at 4, 8, 16; epoch ends at 6, 12, 18 (step 12's periodic save is the end's)
    assert names == ["004-mid.ckpt", "006-end.ckpt", "008-mid.ckpt", "012-end.ckpt", "016-mid.ckpt", "018-end.ckpt"]
    states = loader_states(load_checkpoint(snaps / "006-end.ckpt"))  # Lightning's layout, read by ResumeLoaderState
    assert states == [{"epoch": 0, "consumed": 6}]
    for name in names[:-1]:
        out = tmp_path / name
        resumed = train(tiny(*EXACT, f"output_dir={out}"), resume=str(snaps / name))
        assert resumed.status == "completed", name
        got = load_checkpoint(resumed.run_dir / "checkpoints" / "last.ckpt")
        assert got["global_step"] == final["global_step"]
        differ = [k for k in final["state_dict"] if not torch.equal(final["state_dict"][k], got["state_dict"][k])]
        assert not differ, f"resumed from {name}: {differ}"


# ---------------------------------------------------------------- one run per directory


def _long_args(tmp_path: Path, *extra: str) -> list[str]:
    return [
        "--config",
        str(CONFIGS_DIR / "mlp.yaml"),
        *TINY,
        f"output_dir={tmp_path / 'runs'}",
        "data.num_samples=6000",
        "data.batch_size=8",
        "trainer.max_epochs=50",
        "checkpoint.every_n_steps=20",
        *extra,
    ]


def _long_run(tmp_path: Path, *extra: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *_long_args(tmp_path, *extra)],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_second_writer_is_refused_and_a_dead_holders_lock_is_taken_over(tmp_path: Path) -> None:
    run = tmp_path / "runs" / "tiny" / "version_0"
    first = _long_run(tmp_path)
    args = _long_args(tmp_path)
    resume_cfg = load_config(args[1], args[2:])  # the first run's config, for in-process resumes
    try:
        wait_for_file(run / "checkpoints" / "last.ckpt", first)
        with pytest.raises(UserError) as e:  # a second `--resume last` while the first run writes
            train(resume_cfg, resume="last")
        assert str(e.value).startswith(f"{run} is in use by another run (pid {first.pid} on ")
        assert first.poll() is None  # the first run goes on
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait(30)
    assert (run / ".lock").exists()  # left by the killed process, its flock gone with it
    (run / "checkpoints" / ".last.ckpt.stale.tmp").write_bytes(b"x" * 1000)  # as a kill mid-save leaves
    (run / ".metrics.json.tmp").write_text("")
    step = load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"]
    third = train(
        dataclasses.replace(resume_cfg, trainer=dataclasses.replace(resume_cfg.trainer, max_steps=step + 3)),
        resume="last",
    )
    assert third.status == "completed" and third.run_dir == run
    assert not list(run.rglob("*.tmp")) and not (run / ".lock").exists()
    segments = _metrics(run)["segments"]
    assert [s["status"] for s in segments] == ["killed", "completed"]
    assert segments[0]["end_step"] == step and segments[1]["start_step"] == step


def test_cli_names_the_holder_in_one_line(tiny, tmp_path: Path) -> None:
    run = train(tiny()).run_dir
    with RunLock(run):
        r = run_cli("--config", str(run / "config.yaml"), "--resume", "last")
    assert r.returncode == 2 and r.stderr.strip() == (
        f"error: {run} is in use by another run (pid {os.getpid()} on {socket.gethostname()}); "
        "wait for it to end, or start a new run (without --resume)"
    )


def test_resume_of_another_runs_checkpoint_starts_a_new_run(tiny, tmp_path: Path) -> None:
    other = train(tiny("name=other")).run_dir
    before = {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()}
    ckpt = other / "checkpoints" / "last.ckpt"
    mine = train(tiny("trainer.max_epochs=3"), resume=str(ckpt))
    assert mine.status == "completed" and mine.run_dir == tmp_path / "runs" / "tiny" / "version_0"
    assert {p.name: p.read_bytes() for p in other.iterdir() if p.is_file()} == before  # untouched
    m = _metrics(mine.run_dir)
    assert m["resumed_from"] == os.path.relpath(ckpt, mine.run_dir) and m["steps"] == 18
    assert m["segments"][0]["start_step"] == 12
    # this run's own checkpoint, by path: continues in place
    again = train(tiny("trainer.max_epochs=4"), resume=str(mine.run_dir / "checkpoints" / "last.ckpt"))
    assert again.run_dir == mine.run_dir and len(_metrics(mine.run_dir)["segments"]) == 2


# ---------------------------------------------------------------- leftovers and full disks


def test_failures_before_training_leave_no_run_directory(tmp_path: Path) -> None:
    r = run_cli("--config", "mlp", f"output_dir={tmp_path / 'runs'}", "data.name=mnist", f"data.root={tmp_path}")
    assert r.returncode == 2 and r.stderr.startswith("error: mnist files not found"), r.stderr
    assert not (tmp_path / "runs").exists()


def _limited(limit: int) -> None:
    resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))  # writes past `limit` bytes fail with EFBIG


def _run_limited(tmp_path: Path, limit: int) -> subprocess.CompletedProcess[str]:
    # TensorBoard and the gradient-flow PNG off: their writers fail on a full disk too, on their own schedule
    args = [*TINY, f"output_dir={tmp_path / 'runs'}", "logging.tensorboard=false", "logging.grad_norm_every_n_steps=0"]
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(CONFIGS_DIR / "mlp.yaml"), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=lambda: _limited(limit),
    )


def test_full_disk_is_one_error_line_and_a_consistent_record(tmp_path: Path) -> None:
    r = _run_limited(tmp_path, 8_000)  # metrics.json (~1 KB) fits, a checkpoint (~20 KB) does not
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("error: cannot write checkpoint ") and "File too large" in lines[0]
    run = tmp_path / "runs" / "tiny" / "version_0"
    m = _metrics(run)
    assert m["status"] == "failed" and m["best_checkpoint"] is None and m["error"] == lines[0].removeprefix("error: ")
    assert not list(run.rglob("*.tmp")) and not list(run.rglob("*.ckpt"))


def test_full_disk_at_metrics_json_leaves_none(tmp_path: Path) -> None:
    r = _run_limited(tmp_path, 300)  # config.yaml (~2 KB) is cut short too: the first write that fails names itself
    lines = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert lines[0].startswith("error: cannot write ") and "File too large" in lines[0]
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert not (run / "metrics.json").exists() and not list(run.rglob("*.tmp"))


# ---------------------------------------------------------------- metrics.json


def test_metrics_json_records_a_failure_before_fit(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """Failures after the run directory exists but before training (the LR probe, the Trainer's constructor)
    leave metrics.json `failed` with the error, not `running` (which a later resume reads as killed)."""
    with pytest.raises(UserError, match="every rate diverged"):  # a real one: rates far too large for SGD
        train(tiny("trainer.lr_probe=[1.0e+6, 1.0e+7]", "trainer.lr_probe_steps=5"))
    m = _metrics(Path(tiny().output_dir) / "tiny" / "version_0")
    assert m["status"] == "failed" and m["error"].startswith("trainer.lr_probe: every rate diverged"), m
    assert [s["status"] for s in m["segments"]] == ["failed"]

    def broken(*args, **kwargs):
        raise RuntimeError("trainer broke")

    monkeypatch.setattr(deepnets.run, "build_trainer", broken)
    with pytest.raises(RuntimeError, match="trainer broke"):
        train(tiny())
    m = _metrics(Path(tiny().output_dir) / "tiny" / "version_1")
    assert m["status"] == "failed" and m["error"] == "RuntimeError: trainer broke", m


def test_metrics_json_survives_a_failing_test(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(self, batch, batch_idx):
        raise RuntimeError("test step broke")

    monkeypatch.setattr(deepnets.module.TaskModule, "test_step", broken)
    with pytest.raises(RuntimeError, match="test step broke"):
        train(tiny())
    m = _metrics(Path(tiny().output_dir) / "tiny" / "version_0")
    assert m["status"] == "failed" and "test step broke" in m["error"]
    assert {"train/loss", "val/loss", "val/acc"} <= set(m["metrics"]) and m["steps"] == 12


def test_resume_of_a_finished_run_keeps_the_whole_record(tiny) -> None:
    first = train(tiny())
    m1 = _metrics(first.run_dir)
    second = train(tiny(), resume="last")  # nothing left to train: tests again
    assert second.status == "completed"
    m2 = _metrics(first.run_dir)
    assert (
        m2["metrics"]["val/loss"] == m1["metrics"]["val/loss"]
        and m2["metrics"]["train/loss"] == m1["metrics"]["train/loss"]
    )
    assert m2["metrics"]["test/acc"] == m1["metrics"]["test/acc"]  # same best weights
    assert m2["best_checkpoint"] == m1["best_checkpoint"] and (first.run_dir / m2["best_checkpoint"]).is_file()
    assert [s["status"] for s in m2["segments"]] == ["completed", "completed"]
    assert [(s["start_step"], s["end_step"]) for s in m2["segments"]] == [(0, 12), (12, 12)]
    assert m2["segments"][1]["resumed_from"] == "checkpoints/last.ckpt"
    assert m2["wall_seconds"] == pytest.approx(sum(s["wall_seconds"] for s in m2["segments"]), abs=2e-3)
    assert m2["wall_seconds"] > m1["wall_seconds"]
