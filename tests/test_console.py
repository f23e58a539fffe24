"""What a user reads: the FULL stdout + stderr of real CLI runs, checked line by line.

A run prints its header, the progress bar (every redraw within 80 columns), the warnings that matter and
one summary line; nothing else (no Lightning banners, advertisements or deprecation warnings). Lines
are split on "\\n" and each on "\\r" (a bar redraw), so every string the terminal shows is checked.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from deepnets import console
from deepnets.config import load_config
from deepnets.models import build_model
from deepnets.run import resolve_threads

ROOT = Path(__file__).resolve().parent.parent

RUN = [
    "name=console",
    "model.arch=mlp",
    "model.depth=2",
    "model.width=16",
    "data.name=synthetic",
    "data.input_shape=[8]",
    "data.num_classes=3",
    "data.num_samples=500",  # test 100, val 40, train 360
    "data.batch_size=32",
    "optim.lr=0.05",
    "scheduler.name=cosine",  # LearningRateMonitor on
    "trainer.max_epochs=3",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.progress_bar=true",
    "trainer.log_every_n_steps=2",
    "logging.grad_norm_every_n_steps=4",
]
BAR = re.compile(
    r"epoch( \d+/\d+)? \|[ \u2588-\u258f]*\| \d+/(\d+|\?) \[\d\d:\d\d<(\d\d:\d\d|\?)"
    r"(, loss \S+( val_acc \S+( val_loss \S+)?)?)?\] *"
)


def cli(tmp_path: Path, *overrides: str) -> tuple[int, list[str], Path]:
    """(exit code, output lines with stderr merged in order, the run directory) of `python train.py`."""
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONWARNINGS", "COLUMNS")}
    env |= {"PYTHONUNBUFFERED": "1", "COLUMNS": "200"}  # a wide terminal: the bar still keeps to 80
    proc = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "--config", "mlp", *RUN, "output_dir=runs", *overrides],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        timeout=300,
        env=env,
    )
    text = proc.stdout.decode()
    assert text.endswith("\n")
    return proc.returncode, text[:-1].split("\n"), Path("runs/console/version_0")


def screens(line: str) -> list[str]:
    """What a terminal shows of one output line: each `\\r`-separated redraw, blank clears dropped."""
    return [s for s in line.split("\r") if s.strip()]


def check_header(line: str, run_dir: Path, *overrides: str) -> None:
    cfg = load_config(str(ROOT / "configs" / "mlp.yaml"), [*RUN, *overrides])
    params = sum(p.numel() for p in build_model(cfg.model, (8,), 3).parameters())
    n = resolve_threads("auto", cfg)  # the subprocess has this environment, machine and (small) model
    threads = f"{n} thread{'s' if n > 1 else ''}"
    assert line == f"{run_dir} | mlp {params:,} params | synthetic 360/40/100 train/val/test | cpu 32-true | {threads}"


def check_bars(lines: list[str], last_epoch: int | None) -> list[str]:
    """Every redraw is a bar within 80 columns; returns the other screens (warnings), each of which must end its
    line (the bar is cleared before it and redrawn after it, never glued to it)."""
    others, bars = [], []
    for line in lines:
        for i, screen in enumerate(shown := screens(line)):
            if BAR.fullmatch(screen):
                assert len(screen) <= 80, screen
                bars.append(screen)
            else:
                assert i == len(shown) - 1, f"{screen!r} is followed by {shown[i + 1]!r} on its line"
                others.append(screen)
        assert "v_num" not in line
    assert bars, lines
    if last_epoch is not None:  # the bar's final state: last epoch complete, with the validation metrics
        assert re.match(rf"epoch {last_epoch}/{last_epoch} \|\u2588+\| 12/12 \[.*, loss \d\.\d{{3}} val_acc", bars[-1])
    return others


def test_a_run_prints_header_bar_and_summary_only(tmp_path: Path) -> None:
    rc, lines, run_dir = cli(tmp_path)
    assert rc == 0, "\n".join(lines)
    assert len(lines) == 3, "\n".join(lines)
    check_header(lines[0], run_dir)
    assert check_bars(lines[1:2], last_epoch=3) == []
    assert re.fullmatch(rf"completed: {re.escape(str(run_dir))} test/acc=\d\.\d{{4}}, .*", lines[2])
    metrics = (tmp_path / run_dir / "metrics.json").read_text()
    assert '"lr-' not in metrics  # the LR monitor's keys stay on TensorBoard
    # the count used: in hparams.yaml, and as a comment beside config.yaml's `auto`
    used = resolve_threads("auto", load_config(str(ROOT / "configs" / "mlp.yaml"), RUN))
    assert f"threads: {used}" in (tmp_path / run_dir / "hparams.yaml").read_text()
    config_yaml = (tmp_path / run_dir / "config.yaml").read_text()
    s = "" if used == 1 else "s"
    assert f"  threads: auto  # this run used {used} thread{s} (trainer.threads: N reproduces it)\n" in config_yaml
    assert load_config(str(tmp_path / run_dir / "config.yaml")).trainer.threads == "auto"  # loads back as auto


def test_a_vanishing_gradient_warning_is_one_line_that_clears_the_bar(tmp_path: Path) -> None:
    overrides = ("model.batch_norm=false", "model.activation=sigmoid", "model.depth=12", "trainer.max_epochs=1")
    rc, lines, run_dir = cli(tmp_path, *overrides)
    assert rc == 0, "\n".join(lines)
    check_header(lines[0], run_dir, *overrides)
    (warning,) = check_bars(lines[1:-1], last_epoch=1)
    assert warning.startswith("warning: vanishing gradients at step 0: first layer 'layers.0.0'")
    assert lines[-1].startswith(f"completed: {run_dir} ")


def test_a_diverged_run_ends_its_bar_line_before_the_summary(tmp_path: Path) -> None:
    overrides = ("model.batch_norm=false", "optim.lr=1e4", "trainer.max_epochs=2", "logging.grad_norm_every_n_steps=0")
    rc, lines, run_dir = cli(tmp_path, *overrides)
    assert rc == 1, "\n".join(lines)
    assert len(lines) == 4, "\n".join(lines)
    check_header(lines[0], run_dir, *overrides)
    assert check_bars(lines[1:2], last_epoch=None) == []
    assert lines[2].rstrip() == f"diverged: {run_dir}"
    assert re.fullmatch(r"error: run diverged: loss became non-finite at step \d+", lines[3])


# Statements that make the libraries emit the warnings console.configure() drops, one per LIBRARY_WARNINGS entry.
TRIGGERS = [
    "from lightning.pytorch.utilities._pytree import _tree_flatten; _tree_flatten(1.0)",  # LeafSpec
    "import torch; torch.func.jvp(torch.sin, (torch.ones(2),), (torch.ones(2),))",  # torch.jit.script
]


def test_each_library_warning_filter_drops_a_warning_the_library_still_emits() -> None:
    """Without the filters the libraries warn (else a filter is dead: remove it); with them, silence."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}
    assert len(TRIGGERS) == len(console.LIBRARY_WARNINGS)
    for configure in ("", "from deepnets import console; console.configure(); "):
        proc = subprocess.run(
            [sys.executable, "-W", "default", "-c", configure + "; ".join(TRIGGERS)],
            capture_output=True,
            text=True,
            timeout=120,
            env=env,
        )
        assert proc.returncode == 0, proc.stderr
        if configure:
            assert proc.stderr == ""
        else:
            for _, message, _ in console.LIBRARY_WARNINGS:
                assert re.search(message, proc.stderr), (message, proc.stderr)
