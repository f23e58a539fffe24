from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from deepnets.config import Config, load_config

ROOT = Path(__file__).resolve().parent.parent

# Small and fast: a 2-layer MLP on 256 synthetic 1-D samples, no progress bar, no monitor.
TINY = [
    "name=tiny",
    "model.arch=mlp",
    "model.depth=2",
    "model.width=16",
    "data.name=synthetic",
    "data.input_shape=[8]",
    "data.num_classes=3",
    "data.num_samples=256",
    "data.batch_size=32",
    "optim.name=sgd",
    "optim.lr=0.1",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.progress_bar=false",
    "trainer.log_every_n_steps=2",
]


def tiny_config(tmp_path: Path, *overrides: str) -> Config:
    return load_config(None, [*TINY, f"output_dir={tmp_path / 'runs'}", *overrides])


@pytest.fixture
def tiny(tmp_path: Path):
    return lambda *overrides: tiny_config(tmp_path, *overrides)


def run_cli(*args: str, cwd: Path | None = None, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `python train.py ARGS` in a subprocess (the way a user does)."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=cwd or ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
    )


def wait_for_file(path: Path, proc: subprocess.Popen[str], timeout: float = 120) -> None:
    """Poll until `path` exists; fail with the process's stderr if it exits first, kill it on timeout."""
    deadline = time.monotonic() + timeout
    while not path.exists():
        if proc.poll() is not None:
            raise AssertionError(f"exited early ({proc.returncode}): {proc.stderr.read()[-2000:]}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"{path} never appeared")
        time.sleep(0.005)
