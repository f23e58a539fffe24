"""SIGTERM and SIGINT at every phase of a run, with real subprocesses and real signals.

A driver runs the CLI with one extra callback that, on reaching the phase under test, writes a marker
file and then waits (polling, up to 60 s) until the run's signal handler has recorded a signal. The
test waits for the marker and sends the signal: the signal lands inside that phase every time, with
no sleep as synchronisation.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from deepnets.checkpoint import load_checkpoint
from deepnets.config import CONFIGS_DIR
from tests.conftest import ROOT, TINY, run_cli

DRIVER = """
import functools, os, sys, time
from pathlib import Path
import lightning as L
import deepnets.run as run
from deepnets.cli import main

phase, marker = sys.argv[1], Path(sys.argv[2])
caught = []

class Stop(run.StopSignals):  # the run's own handler; remembered so the probe can see it fire
    def __init__(self):
        super().__init__()
        caught.append(self)

run.StopSignals = Stop

def hold():
    marker.write_text(str(os.getpid()))
    deadline = time.monotonic() + 60
    while caught[-1].signum is None and time.monotonic() < deadline:
        time.sleep(0.002)

class Probe(L.Callback):
    def setup(self, trainer, pl_module, stage):
        if phase == "before_fit" and stage == "fit":
            hold()
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if phase == "train" and trainer.global_step == 2:
            hold()
    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        last = trainer.current_epoch == trainer.max_epochs - 1
        if (phase == "validation" and trainer.current_epoch == 0) or (phase == "final_validation" and last):
            hold()
    def on_test_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        if phase == "test":
            hold()

if phase == "data":
    from deepnets.data import InMemoryDataModule
    setup = InMemoryDataModule.setup
    def slow_setup(self, stage=None):
        hold()
        setup(self, stage)
    InMemoryDataModule.setup = slow_setup

run.train = functools.partial(run.train, callbacks=[Probe()])
sys.exit(main(sys.argv[3:]))
"""

STEPS_PER_EPOCH = 6  # TINY: 185 training samples, batches of 32


def _args(tmp_path: Path) -> list[str]:
    return ["--config", str(CONFIGS_DIR / "mlp.yaml"), *TINY, f"output_dir={tmp_path / 'runs'}"]


def _interrupt(tmp_path: Path, phase: str, sig: signal.Signals) -> tuple[subprocess.CompletedProcess[str], Path]:
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(DRIVER))
    marker = tmp_path / "marker"
    proc = subprocess.Popen(
        [sys.executable, str(driver), phase, str(marker), *_args(tmp_path)],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.monotonic() + 240
    while not marker.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited before {phase} ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{phase} never reached")
        time.sleep(0.01)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=120)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err), tmp_path / "runs" / "tiny" / "version_0"


def _check(r: subprocess.CompletedProcess[str], run: Path, sig: signal.Signals) -> dict:
    assert r.returncode == 128 + sig, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert errors == [errors[0]] and errors[0].startswith(f"error: run interrupted: {sig.name} received")
    assert "Traceback" not in r.stderr, r.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted" and metrics["segments"][-1]["status"] == "interrupted"
    assert not list(run.rglob("*.tmp")) and not (run / ".lock").exists()
    return metrics


# phase -> (steps in last.ckpt, None: no last.ckpt; whether test metrics exist)
PHASES = {
    "before_fit": None,
    "train": 3,  # the step in flight (the third) finishes and is saved
    "validation": STEPS_PER_EPOCH,  # validation finishes, the epoch-end checkpoint is written
    "final_validation": 2 * STEPS_PER_EPOCH,
    "test": 2 * STEPS_PER_EPOCH,
}
# one signal per phase in the default suite, alternating; the other one as a slow case
FAST = {"before_fit": signal.SIGTERM, "train": signal.SIGINT, "validation": signal.SIGTERM,
        "final_validation": signal.SIGINT, "test": signal.SIGTERM}  # fmt: skip
CASES = [
    pytest.param(phase, sig, marks=[] if FAST[phase] == sig else [pytest.mark.slow], id=f"{phase}-{sig.name}")
    for phase in PHASES
    for sig in (signal.SIGTERM, signal.SIGINT)
]


@pytest.mark.parametrize(("phase", "sig"), CASES)
def test_signal_in_phase(tmp_path: Path, phase: str, sig: signal.Signals) -> None:
    r, run = _interrupt(tmp_path, phase, sig)
    metrics = _check(r, run, sig)
    last = run / "checkpoints" / "last.ckpt"
    steps = PHASES[phase]
    if steps is None:
        assert not last.exists() and metrics["steps"] == 0  # training had not started: nothing to resume
        return
    assert load_checkpoint(last)["global_step"] == steps == metrics["steps"]
    assert not any(k.startswith("test/") for k in metrics["metrics"])
    if phase != "train":
        assert "val/acc" in metrics["metrics"]  # the validation in flight finished: its numbers are whole
    if phase in ("final_validation", "train"):  # resumable: the run completes, test included
        resumed = run_cli(*_args(tmp_path), "--resume", "last")
        assert resumed.returncode == 0, resumed.stderr[-3000:]
        done = json.loads((run / "metrics.json").read_text())
        assert done["status"] == "completed" and "test/acc" in done["metrics"]
        assert [s["status"] for s in done["segments"]] == ["interrupted", "completed"]
        assert done["steps"] == 2 * STEPS_PER_EPOCH
        first, second = done["segments"]
        assert first["wall_seconds"] == metrics["wall_seconds"] and first["end_step"] == steps  # kept as it was
        assert second["start_step"] == steps and second["end_step"] == 2 * STEPS_PER_EPOCH
        assert second["resumed_from"] == "checkpoints/last.ckpt"
        assert abs(done["wall_seconds"] - first["wall_seconds"] - second["wall_seconds"]) < 0.002  # the total
        if metrics["best_checkpoint"] is not None:  # the best before the interrupt, or a better one since
            assert not Path(done["best_checkpoint"]).is_absolute() and (run / done["best_checkpoint"]).is_file()
        if phase == "final_validation":  # epoch 1 ended before the signal: its checkpoint was the best
            assert metrics["best_checkpoint"] is not None, metrics


@pytest.mark.parametrize("sig", [signal.SIGINT, pytest.param(signal.SIGTERM, marks=pytest.mark.slow)])
def test_signal_while_reading_data_leaves_nothing(tmp_path: Path, sig: signal.Signals) -> None:
    r, _ = _interrupt(tmp_path, "data", sig)
    assert r.returncode == 128 + sig, r.stderr[-3000:]
    assert r.stderr.strip().splitlines()[-1] == f"error: run interrupted: {sig.name} received; before training started"
    assert "Traceback" not in r.stderr
    assert not (tmp_path / "runs").exists()  # no run directory was made yet
