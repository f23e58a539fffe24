from __future__ import annotations

import json
import subprocess
import sys
import textwrap
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
