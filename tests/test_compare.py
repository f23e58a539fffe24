"""`deepnets compare`: runs read back from their event files, checked against the runs' own records."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from deepnets import compare
from deepnets.cli import main
from deepnets.run import train
from tests.conftest import tiny_config

RUNS = {
    "sig": ["model.depth=4", "model.activation=sigmoid"],
    "res": ["model.arch=resmlp", "model.depth=2"],
}


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    tmp = tmp_path_factory.mktemp("cmp")
    out = {}
    for name, overrides in RUNS.items():
        # 256 samples, batch 32: 6 training batches per epoch (a smaller last val/test batch)
        result = train(tiny_config(tmp, f"name={name}", "logging.grad_norm_every_n_steps=2", *overrides))
        assert result.status == "completed", result.error
        out[name] = result.run_dir
    return out


def _history(run_dir: Path) -> dict[str, torch.Tensor]:
    """The monitor's own float64 history, from the run's checkpoint (not its event files)."""
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]
    (key,) = [k for k in state if "GradientFlowMonitor" in k]
    return state[key]


def test_table_equals_the_runs_records(runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    root = next(iter(runs.values())).parent.parent  # <output_dir>: a directory holding both runs
    assert main(["compare", str(root), "--out", str(tmp_path / "cmp")]) == 0
    out_dir = tmp_path / "cmp" / "version_0"
    assert (out_dir / "compare.png").stat().st_size > 20_000
    md = (out_dir / "compare.md").read_text()
    assert md in capsys.readouterr().out
    with open(out_dir / "compare.csv") as f:
        rows = {r["run"]: r for r in csv.DictReader(f)}
    assert sorted(rows) == sorted(f"{d.parent.name}/{d.name}" for d in runs.values())
    for name, run_dir in runs.items():
        row = rows[f"{name}/version_0"]
        recorded = json.loads((run_dir / "metrics.json").read_text())
        assert row["status"] == recorded["status"] == "completed"
        for key in ("test/acc", "test/loss", "val/acc", "val/loss"):
            assert float(row[key]) == recorded["metrics"][key], key  # exact: metrics.json's float
        from deepnets.config import load_config
        from deepnets.models import build_model

        cfg = load_config(str(run_dir / "config.yaml"))
        model = build_model(cfg.to_dict()["model"], tuple(cfg.data.input_shape), cfg.data.num_classes)
        assert int(row["parameters"]) == sum(p.numel() for p in model.parameters())
        h = _history(run_dir)
        g = h["grad_norm"]  # (T, L) float64
        assert int(row["weight layers"]) == g.shape[1] and int(row["last step"]) == h["steps"][-1]
        ratio = (g[:, 0] / g[:, -1]).numpy()
        assert float(row["first/last @ first step"]) == pytest.approx(ratio[0], rel=1e-6)  # float32 in the events
        assert float(row["first/last @ last step"]) == pytest.approx(ratio[-1], rel=1e-6)
        tail = ratio[-max(1, len(ratio) // 4) :]
        assert float(row["first/last, last quarter (median)"]) == pytest.approx(np.median(tail), rel=1e-6)
    assert float(rows["sig/version_0"]["first/last @ last step"]) < float(
        rows["res/version_0"]["first/last @ last step"]
    )


def test_figure_overlays_every_run(runs: dict[str, Path]) -> None:
    records = [compare.load_run(d) for d in compare.find_runs(list(runs.values()))]
    fig = compare.figure(records)
    a_first, a_last, a_ratio, a_loss, a_vloss, a_vacc = fig.axes[:6]
    for ax in (a_first, a_last, a_ratio, a_loss, a_vloss, a_vacc):
        assert len(ax.get_lines()) == len(records), ax.get_title()
    for rec, line_first, line_last, line_ratio in zip(
        records, a_first.get_lines(), a_last.get_lines(), a_ratio.get_lines(), strict=True
    ):
        g = _history(rec.path)["grad_norm"].numpy()
        np.testing.assert_allclose(line_first.get_ydata(), g[0], rtol=1e-6)  # no exact zeros in these nets
        np.testing.assert_allclose(line_last.get_ydata(), g[-1], rtol=1e-6)
        np.testing.assert_allclose(line_ratio.get_ydata(), g[:, 0] / g[:, -1], rtol=1e-6)
        assert list(line_ratio.get_xdata()) == _history(rec.path)["steps"]
    assert a_first.get_yscale() == a_last.get_yscale() == a_ratio.get_yscale() == "log"


def test_directories_expand_to_their_runs_once(runs: dict[str, Path], tmp_path: Path) -> None:
    sig, res = runs["sig"], runs["res"]
    root = sig.parent.parent
    assert compare.find_runs([sig, root, res]) == [sig, res]  # given order, then what a directory adds, no repeats
    assert compare.find_runs([root.parent]) == sorted([sig, res])  # any depth (a sweep's trials)


def test_bad_inputs_one_error_line_nothing_written(
    runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "out"
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken" / "version_0"
    broken.mkdir(parents=True)
    for f in runs["sig"].glob("events.out.tfevents.*"):
        (broken / f.name).write_bytes(f.read_bytes())
    (broken / "metrics.json").write_text("{not json")
    cases = [
        ((str(empty),), "no run directory"),
        ((str(runs["sig"]), str(broken)), "metrics.json: unreadable"),
    ]
    for paths, message in cases:
        assert main(["compare", *paths, "--out", str(out)]) == 2
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: compare: ") and message in lines[0], lines
        assert not out.exists()
    # the way a user runs it: one line on stderr, no traceback, exit code 2
    r = subprocess.run(
        [sys.executable, "-m", "deepnets.cli", "compare", str(tmp_path / "missing"), "--out", str(out)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 2 and r.stderr.splitlines() == [f"error: compare: {tmp_path / 'missing'}: no such directory"]
    assert not out.exists()
