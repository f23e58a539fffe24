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
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deepnets.export import evaluate, load_exported
from deepnets.run import train
from tests.conftest import ROOT, TINY, run_cli


def test_export_then_evaluate_without_pickle(tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    result = train(tiny())
    r = run_cli("--export", str(result.run_dir))
    assert r.returncode == 0, r.stderr
    out = result.run_dir / "export"
    assert (out / "model.safetensors").is_file() and (out / "config.yaml").is_file()

    def no_pickle(*args, **kwargs):
        raise AssertionError("pickle-based torch.load used")

    monkeypatch.setattr(torch, "load", no_pickle)
    model, cfg = load_exported(out)
    assert cfg == tiny() and not model.training
    metrics = evaluate(out)
    assert metrics["test/acc"] == pytest.approx(result.metrics["test/acc"], abs=1e-6)  # same weights as the tested best


def test_export_errors_name_the_path(tmp_path: Path) -> None:
    r = run_cli("--evaluate", str(tmp_path))
    assert (
        r.returncode == 2
        and r.stderr.strip() == f"error: {tmp_path} has no model.safetensors; make one with `deepnets --export RUN_DIR`"
    )
    r = run_cli("--export", str(tmp_path))
    assert r.returncode == 2 and r.stderr.strip() == f"error: {tmp_path} is not a run directory (no config.yaml)"


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
from deepnets.config import load_config
from deepnets.run import train
cfg = load_config(None, {overrides!r})
result = train(cfg)
torch.save(result.model.state_dict(), os.path.join({out!r}, f"rank{{os.environ.get('LOCAL_RANK', '0')}}.pt"))
"""


def test_ddp_two_cpu_processes_share_one_run(tmp_path: Path) -> None:
    overrides = [
        *TINY,
        f"output_dir={tmp_path / 'runs'}",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=2",
        "logging.grad_norm_every_n_steps=2",
    ]
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), overrides=overrides, out=str(tmp_path))))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients were all-reduced
    runs = list((tmp_path / "runs" / "tiny").iterdir())
    assert [p.name for p in runs] == ["version_0"]  # one run directory for both ranks
    run = runs[0]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed"
    assert metrics["steps"] == 2 * 3  # 185 samples / 2 ranks = 92 each: 3 batches of 32 per epoch
    assert len(list(run.glob("events.out.tfevents.*"))) == 2  # fit + test, from rank 0 only
    acc = EventAccumulator(str(run))
    acc.Reload()
    assert "train/loss_step" in acc.Tags()["scalars"]


# ---------------------------------------------------------------- DDP faults: a rank killed, a signal


def _ddp_run(tmp_path: Path) -> subprocess.Popen[str]:
    args = [
        "--config",
        str(ROOT / "configs" / "mlp.yaml"),
        *TINY,
        f"output_dir={tmp_path / 'runs'}",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "data.num_samples=20000",
        "trainer.max_epochs=50",
        "checkpoint.every_n_steps=5",
    ]
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _training(proc: subprocess.Popen[str], run: Path) -> int:
    """Wait until both ranks train (the first periodic last.ckpt is written), return rank 1's pid."""
    deadline = time.monotonic() + 300
    while not (run / "checkpoints" / "last.ckpt").exists():
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"no checkpoint ({proc.returncode}): {proc.stderr.read()[-3000:]}")
        time.sleep(0.02)
    children = Path(f"/proc/{proc.pid}/task/{proc.pid}/children").read_text().split()
    assert len(children) == 1, children  # Lightning's launcher started rank 1 as rank 0's child
    return int(children[0])


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except FileNotFoundError:
        return False


def test_ddp_killed_rank_ends_every_rank_with_one_error(tmp_path: Path) -> None:
    """SIGKILL of rank 1: rank 0 ends within seconds, either with our one line (gloo's broken connection
    reached the run first: exit 1, metrics.json `failed`) or, when Lightning's child-process observer
    (it polls every 5 s) is first, with its line naming the dead child and a SIGKILL of rank 0."""
    run = tmp_path / "runs" / "tiny" / "version_0"
    proc = _ddp_run(tmp_path)
    rank1 = _training(proc, run)
    os.kill(rank1, signal.SIGKILL)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise AssertionError("rank 0 hangs after rank 1 was killed") from None
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    if proc.returncode == -signal.SIGKILL:
        assert f"Child process with PID {rank1} terminated with code -9" in err, err[-3000:]
        assert not errors
        return
    assert proc.returncode == 1, err[-3000:]
    assert len(errors) == 1 and errors[0].startswith("error: run failed: DDP: another rank failed"), err[-3000:]
    assert "Traceback" not in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "failed" and metrics["error"].startswith("DDP: another rank failed")


@pytest.mark.slow
def test_ddp_killed_rank_zero_ends_rank_one(tmp_path: Path) -> None:
    proc = _ddp_run(tmp_path)
    rank1 = _training(proc, tmp_path / "runs" / "tiny" / "version_0")
    proc.kill()
    proc.wait(30)
    deadline = time.monotonic() + 60
    while _alive(rank1) and time.monotonic() < deadline:
        time.sleep(0.1)
    alive = _alive(rank1)
    if alive:
        os.kill(rank1, signal.SIGKILL)
    assert not alive, "rank 1 hangs after rank 0 was killed"


@pytest.mark.slow
def test_ddp_sigterm_to_rank_zero_stops_both_at_one_step(tmp_path: Path) -> None:
    """The ranks agree on a signal (an all-reduce each step), so both save/stop at the same step
    instead of rank 0 waiting in the checkpoint barrier while rank 1 waits in the next all-reduce."""
    run = tmp_path / "runs" / "tiny" / "version_0"
    proc = _ddp_run(tmp_path)
    _training(proc, run)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    from deepnets.checkpoint import load_checkpoint

    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == metrics["steps"]


@pytest.mark.slow
def test_ddp_missing_node_fails_within_the_timeout(tmp_path: Path) -> None:
    r = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", str(ROOT / "configs" / "mlp.yaml"), *TINY,
         f"output_dir={tmp_path / 'runs'}", "trainer.strategy=ddp", "trainer.num_nodes=2"],
        cwd=ROOT,
        env={**os.environ, "PYTHONWARNINGS": "ignore", "DEEPNETS_DDP_TIMEOUT_S": "10"},
        capture_output=True,
        text=True,
        timeout=240,
    )  # fmt: skip
    assert r.returncode == 1, r.stderr[-3000:]
    errors = [line for line in r.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and errors[0].startswith("error: run failed: DDP rendezvous failed within 10 s"), errors
    assert "trainer.num_nodes=2" in errors[0] and "Traceback" not in r.stderr
