"""bench/exact_metrics.py (the GPU half of issue 15's exact-metrics check) on the CPU: it PASSes on deepnets as
it is, and FAILs when the epoch means drop the batch weights (as MeanMetric(nan_strategy="disable") did).

The fast tests run the script's main() in-process (the fault's patch is undone after the test); the slow one
runs it as `bench/gpu_check.sh` does, a subprocess, with the `deepnets --evaluate` subprocess rows.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "exact_metrics.py"
ROW = re.compile(r"^\| (PASS|FAIL|INFO) \| (\S+) +\| (\S+) +\| (\S+) +\|")


def rows(out: str) -> dict[tuple[str, str], str]:
    """(metric, source) -> verdict, from the printed table."""
    found = {}
    for line in out.splitlines():
        if m := ROW.match(line):
            found[(m[3], m[4])] = m[1]
    return found


def load_script(monkeypatch: pytest.MonkeyPatch) -> ModuleType:
    spec = importlib.util.spec_from_file_location("exact_metrics", SCRIPT)
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "exact_metrics", mod)  # its dataclass looks its module up there
    spec.loader.exec_module(mod)
    return mod


METRICS = ("train/loss", "train/acc", "val/loss", "val/acc", "test/loss", "test/acc")
WANT = {(m, src) for m in METRICS for src in ("callback", "metrics.json")}
WANT |= {(f"{m}@{e}", "per-epoch") for m in ("train/loss", "train/acc", "val/loss", "val/acc") for e in (1, 2, 3)}
WANT |= {(m, "evaluate()") for m in ("test/loss", "test/acc")} | {("val/loss", "blind?"), ("test/loss", "blind?")}
CLI_ROWS = {(m, "--evaluate") for m in ("test/loss", "test/acc")}


def test_passes_on_the_cpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    rc = load_script(monkeypatch).main(["--device", "cpu", "--out", str(tmp_path), "--no-cli"])
    out = capsys.readouterr().out
    assert rc == 0, out
    found = rows(out)
    assert set(found) == WANT
    assert set(found.values()) == {"PASS"}
    assert out.splitlines()[-1] == f"exact_metrics: PASS (0 of {len(WANT)} rows failed)"


@pytest.mark.slow
def test_the_script_passes_as_gpu_check_runs_it(tmp_path: Path) -> None:
    """A subprocess, fp32 and bf16-mixed (CPU autocast), with the `deepnets --evaluate` subprocess rows
    (~130 s on the busy 2-core machine)."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--device", "cpu", "--out", str(tmp_path), "--precision", "32", "bf16-mixed"],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
        cwd=tmp_path,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    lines = [m.groups() for line in proc.stdout.splitlines() if (m := ROW.match(line))]
    judged = {(p, metric, src): v for v, p, metric, src in lines if v != "INFO"}
    info = {(p, metric, src) for v, p, metric, src in lines if v == "INFO"}
    assert set(judged) == {(p, *key) for p in ("32", "bf16-mixed") for key in WANT | CLI_ROWS}
    assert set(judged.values()) == {"PASS"}
    # bf16 is judged against the same weights under the same autocast; its gap to float64 is shown, not judged
    assert info == {("bf16-mixed", m, "bf16-vs-f64") for m in ("val/loss", "val/acc", "test/loss", "test/acc")}
    assert proc.stdout.splitlines()[-1] == f"exact_metrics: PASS (0 of {len(judged)} rows failed)"


def test_fails_when_the_batch_weights_are_dropped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from deepnets import module

    monkeypatch.setattr(module.RunningMean, "_add", module.RunningMean._add)  # undone after the test
    rc = load_script(monkeypatch).main(
        ["--device", "cpu", "--out", str(tmp_path), "--no-cli", "--fault", "drop-batch-weights"]
    )
    out = capsys.readouterr().out
    assert rc == 1, out
    found = rows(out)
    for src in ("callback", "metrics.json"):
        for metric in METRICS:  # losses miss by ~2e-2, accuracies by ~2e-3
            assert found[(metric, src)] == "FAIL", out
    for e in (1, 2, 3):
        for metric in ("train/loss", "val/loss"):
            assert found[(f"{metric}@{e}", "per-epoch")] == "FAIL", out
    # evaluate() reduces through the same TaskModule metrics, so the fault reaches it too
    assert found[("test/loss", "evaluate()")] == "FAIL", out
    # the reference side is untouched: the check is still not blind
    assert found[("val/loss", "blind?")] == found[("test/loss", "blind?")] == "PASS"
    assert out.splitlines()[-1].startswith("exact_metrics: FAIL (")


@pytest.mark.skipif(torch.cuda.is_available(), reason="a GPU is visible")
def test_cuda_without_a_gpu_is_one_error_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    assert load_script(monkeypatch).main(["--device", "cuda"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == "error: --device cuda: no GPU visible to torch\n"


def test_gpu_check_skips_the_step_without_a_gpu() -> None:
    text = (ROOT / "bench" / "gpu_check.sh").read_text()
    assert "bench/exact_metrics.py --device cuda" in text
    assert "exact_metrics skipped (no GPU visible to torch" in text
    assert subprocess.run(["bash", "-n", str(ROOT / "bench" / "gpu_check.sh")]).returncode == 0
