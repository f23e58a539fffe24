from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from deepnets.checkpoint import load_checkpoint
from deepnets.config import CONFIGS_DIR, load_config
from deepnets.errors import UserError
from deepnets.run import make_run_dir, train
from tests.conftest import ROOT, TINY, run_cli, wait_for_file


def scalars(run_dir: Path) -> set[str]:
    acc = EventAccumulator(str(run_dir))
    acc.Reload()
    return set(acc.Tags()["scalars"])


def test_end_to_end_run_directory(tiny) -> None:
    result = train(tiny())
    run = result.run_dir
    assert result.status == "completed" and run is not None
    assert run.name == "version_0" and run.parent.name == "tiny"
    assert load_config(str(run / "config.yaml")) == tiny()  # the resolved config, loadable as is
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2
    assert metrics["steps"] == 2 * 6  # 256 samples - 51 test - 20 val = 185 train: 6 batches of 32
    assert metrics["wall_seconds"] > 0
    for key in ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc"):
        assert 0 <= metrics["metrics"][key] < 10, key
    assert metrics["metrics"]["test/acc"] > 0.6  # well-separated synthetic clusters
    best = run / metrics["best_checkpoint"]  # relative to the run directory
    assert not Path(metrics["best_checkpoint"]).is_absolute()
    assert best.parent == run / "checkpoints" and best.is_file()
    assert (run / "checkpoints" / "last.ckpt").is_file()
    assert {"train/loss_step", "train/loss_epoch", "train/acc", "val/loss", "val/acc", "test/acc"} <= scalars(run)
    # a second run never reuses the directory
    assert train(tiny()).run_dir == run.parent / "version_1"


def test_step_scalars_are_each_logging_steps_loss(tiny, monkeypatch) -> None:
    """train/loss_step (written to the loggers directly, not through self.log) lands at the steps
    Lightning logs (every log_every_n_steps-th optimizer step), holding that step's training loss."""
    import lightning as L

    import deepnets.run as run

    seen: dict[int, float] = {}

    class Losses(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen[trainer.global_step - 1] = float(outputs["loss"])  # global_step already counts this step

    original = run._callbacks
    monkeypatch.setattr(run, "_callbacks", lambda *a: (lambda r: ([*r[0], Losses()], r[1], r[2]))(original(*a)))
    result = train(tiny("trainer.log_every_n_steps=3", "trainer.max_epochs=3"))
    acc = EventAccumulator(str(result.run_dir))
    acc.Reload()
    logged = {e.step: e.value for e in acc.Scalars("train/loss_step")}
    assert sorted(logged) == [s for s in sorted(seen) if (s + 1) % 3 == 0]
    assert all(logged[s] == pytest.approx(seen[s], rel=1e-6) for s in logged)
    assert set(logged) <= {e.step for e in acc.Scalars("epoch")}  # as Lightning adds to every step log


def test_test_metrics_come_from_the_best_checkpoint(tiny) -> None:
    result = train(tiny("trainer.max_epochs=3"))
    best = json.loads((result.run_dir / "metrics.json").read_text())["best_checkpoint"]
    ckpt = load_checkpoint(result.run_dir / best)
    assert ckpt["callbacks"]  # callback state travels with the checkpoint
    model_state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    from deepnets.data import load_splits
    from deepnets.models import build_model

    cfg = tiny("trainer.max_epochs=3")
    model = build_model(cfg.model, (8,), 3)
    model.load_state_dict(model_state)
    s = load_splits(cfg.data, cfg.seed)
    acc = (model(s.x_test).argmax(1) == s.y_test).float().mean().item()
    assert acc == pytest.approx(result.metrics["test/acc"], abs=1e-6)


def test_same_seed_gives_bitwise_identical_weights(tiny) -> None:
    cfg = tiny("trainer.deterministic=true", "model.dropout=0.2")
    runs = [train(cfg) for _ in range(2)]
    a, b = (load_checkpoint(r.run_dir / "checkpoints" / "last.ckpt")["state_dict"] for r in runs)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert runs[0].metrics == pytest.approx(runs[1].metrics)
    c = load_checkpoint(train(tiny("seed=1")).run_dir / "checkpoints" / "last.ckpt")["state_dict"]
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_concurrent_runs_get_distinct_versions(tmp_path: Path) -> None:
    with ThreadPoolExecutor(8) as pool:
        dirs = list(pool.map(lambda _: make_run_dir(tmp_path, "x"), range(16)))
    assert len(set(dirs)) == 16 and all(d.is_dir() for d in dirs)


def test_unwritable_output_dir_fails_before_training(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    r = run_cli("--config", "mlp", f"output_dir={blocker}/runs")
    assert r.returncode == 2, r.stderr
    assert r.stderr.strip().splitlines()[-1].startswith(f"error: output_dir {blocker}/runs is not writable")
    assert "Epoch" not in r.stderr


def test_divergence_stops_within_one_step(tiny) -> None:
    # lr=1e6 with no momentum explodes the loss on the second step
    result = train(tiny("optim.lr=1e6", "optim.momentum=0", "trainer.max_epochs=5"))
    assert result.status == "diverged" and "non-finite at step" in result.error
    metrics = json.loads((result.run_dir / "metrics.json").read_text())
    assert metrics["status"] == "diverged" and metrics["steps"] <= 3
    for path in (result.run_dir / "checkpoints").glob("*.ckpt"):  # whatever was saved is finite
        assert all(torch.isfinite(v).all() for v in load_checkpoint(path)["state_dict"].values())


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS_DIR.glob("*.yaml")))
def test_every_shipped_config_runs_fast_dev_run(name: str, tmp_path: Path) -> None:
    quick = [
        f"output_dir={tmp_path}",
        "trainer.fast_dev_run=true",
        "trainer.accelerator=cpu",
        "trainer.progress_bar=false",
    ]
    cfg = load_config(name, quick)
    if cfg.data.name != "digits":  # real datasets are not here: same architecture on synthetic data
        shape = {"cifar10": "[3, 32, 32]"}.get(cfg.data.name, "[1, 28, 28]")
        cfg = load_config(
            name,
            [
                *quick,
                "data.name=synthetic",
                f"data.input_shape={shape}",
                "data.num_samples=64",
                "trainer.precision=32",
                "trainer.compile=false",
            ],
        )
    result = train(cfg)
    assert result.status == "completed" and result.run_dir is None
    assert not any(tmp_path.iterdir())  # fast_dev_run writes nothing
    assert 0 <= result.metrics["test/acc"] <= 1


# ---------------------------------------------------------------- faults: subprocess tests


def _tiny_args(tmp_path: Path, *extra: str) -> list[str]:
    return ["--config", str(CONFIGS_DIR / "mlp.yaml"), *TINY, f"output_dir={tmp_path / 'runs'}", *extra]


def _spawn(args: list[str]) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.Popen(
        [sys.executable, str(ROOT / "train.py"), *args],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


LONG = [
    "data.num_samples=1500",
    "data.batch_size=16",
    "trainer.max_epochs=3",
    "trainer.deterministic=true",
    "model.dropout=0.3",
    "checkpoint.every_n_steps=7",
    "scheduler.name=cosine",
]


def test_sigkill_then_resume_is_bitwise_identical(tmp_path: Path) -> None:
    # the reference runs in a subprocess too: same thread count, same floating-point reduction order
    assert run_cli(*_tiny_args(tmp_path / "ref", *LONG)).returncode == 0
    ref = load_checkpoint(tmp_path / "ref" / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt")
    proc = _spawn(_tiny_args(tmp_path, *LONG))
    last = tmp_path / "runs" / "tiny" / "version_0" / "checkpoints" / "last.ckpt"
    wait_for_file(last, proc)
    time.sleep(0.1)  # let it run past the checkpoint a little before the kill
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    killed_at = load_checkpoint(last)["global_step"]
    assert 0 < killed_at < ref["global_step"], "the kill must land mid-run"
    r = run_cli(*_tiny_args(tmp_path, *LONG), "--resume", "last")
    assert r.returncode == 0, r.stderr[-3000:]
    resumed = load_checkpoint(last)
    assert resumed["global_step"] == ref["global_step"]
    assert all(torch.equal(ref["state_dict"][k], resumed["state_dict"][k]) for k in ref["state_dict"])
    metrics = json.loads((last.parent.parent / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["resumed_from"] == "checkpoints/last.ckpt"


def test_sigterm_checkpoints_and_is_resumable(tmp_path: Path) -> None:
    proc = _spawn(_tiny_args(tmp_path, *LONG))
    run = tmp_path / "runs" / "tiny" / "version_0"
    wait_for_file(run / "checkpoints" / "last.ckpt", proc)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "error: run interrupted: SIGTERM received" in err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "interrupted"
    assert load_checkpoint(run / "checkpoints" / "last.ckpt")["global_step"] == metrics["steps"]
    assert scalars(run)  # TensorBoard was flushed
    r = run_cli(*_tiny_args(tmp_path, *LONG), "--resume", str(run / "checkpoints" / "last.ckpt"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"


def test_malicious_checkpoint_is_refused_and_never_runs(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):  # unpickling this would run `touch marker`
            return (os.system, (f"touch {marker}",))

    evil = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(UserError, match=f"checkpoint {evil} refused"):
        load_checkpoint(evil)
    r = run_cli(*_tiny_args(tmp_path), "--resume", str(evil))
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith(f"error: checkpoint {evil} refused")
    assert not marker.exists()


def test_truncated_checkpoint_is_named(tmp_path: Path, tiny) -> None:
    good = train(tiny()).run_dir / "checkpoints" / "last.ckpt"
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:5000])
    r = run_cli(*_tiny_args(tmp_path), "--resume", str(bad))
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: checkpoint {bad} is corrupt or truncated: ")
    assert sorted(p.name for p in (tmp_path / "runs" / "tiny").iterdir()) == ["version_0"]  # nothing was started


def test_resume_with_another_architecture_names_the_key(tmp_path: Path, tiny) -> None:
    last = train(tiny()).run_dir / "checkpoints" / "last.ckpt"
    with pytest.raises(UserError, match=r"the checkpoint has model.width=16, the config model.width=32"):
        train(tiny("model.width=32"), resume=str(last))
