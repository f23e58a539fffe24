"""Stacked sweeps: the shipped double_descent sweep with `sweep.vectorize: true` against false (issue 20:
>= 5x faster on a 2-core CPU, the same table within seed-to-seed noise).

    python bench/stacked.py                 # full sweep (12 widths x 3 seeds, 400 epochs), rounds A B A B
    python bench/stacked.py --quick         # smoke test: 4 widths, 2 seeds, 10 epochs, one round each
    python bench/stacked.py --rounds 3 --json stacked.json
    python bench/stacked.py --gpu-row [--quick] [--device cpu]   # bench/gpu_check.sh's row (skipped without a GPU)

Each round is `deepnets --config double_descent output_dir=<tmp> sweep.vectorize=V` in a fresh process (as a
user runs it: Lightning's start-up is part of the cost), alternating V = false and true (A B A B) so that a
change in the machine's load hits both alike. The speedup is the median over rounds of (plain time / the
stacked time of the same round); the 1-minute load average before each round is printed with it.

The tables: stacked training is exact per member (tests/test_stacked.py: bitwise on these shapes for a few
steps), but over 2,000 Adam steps float rounding of the batched matmuls may move a run a little, so every
metric of every width's seed mean must agree within the seed-to-seed spread (2 x the std over seeds, or
0.01 where the seeds agree closer), and the statuses must be equal.

`--gpu-row`: members per second of 64 stacked 2x64 MLPs (one `train_stacked`) against 64 sequential
`deepnets.run.train` runs of the same points (digits, 50 steps each, in this process after the imports, so
Lightning's per-run start-up is in the sequential figure as a sweep pays it). Without a visible GPU (and no
`--device cpu`) it says so and exits 0.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["sweep.params={model.width: [4, 16, 64, 256]}", "sweep.seeds=[0, 1]", "trainer.max_epochs=10"]
METRICS = ("test/error", "test/loss", "train/error", "train/loss")


def one_round(vectorize: bool, overrides: list[str], tmp: Path) -> tuple[float, list[dict[str, str]]]:
    out = tmp / f"v{int(vectorize)}_{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        "double_descent",
        f"output_dir={out}",
        f"sweep.vectorize={str(vectorize).lower()}",
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (table,) = out.glob("*/sweep_*/results.csv")
    with open(table, newline="") as f:
        return seconds, list(csv.DictReader(f))


def by_width(rows: list[dict[str, str]]) -> dict[str, dict[str, list[float]]]:
    out: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        for m in METRICS:
            out[r["width"]][m].append(float(r[m]))
    return out


def compare(plain: list[dict[str, str]], stacked: list[dict[str, str]]) -> list[str]:
    """The differences beyond seed-to-seed noise, one line each (empty: the tables agree)."""
    problems = []
    if [r["status"] for r in plain] != [r["status"] for r in stacked]:
        problems.append("statuses differ")
    a, b = by_width(plain), by_width(stacked)
    for width in a:
        for m in METRICS:
            xs, ys = a[width][m], b[width][m]
            noise = max(2 * statistics.stdev(xs) if len(xs) > 1 else 0.0, 0.01)
            diff = abs(statistics.mean(xs) - statistics.mean(ys))
            if diff > noise:
                problems.append(f"width {width} {m}: mean {statistics.mean(xs):.4f} vs {statistics.mean(ys):.4f}")
    return problems


def gpu_row(quick: bool, device: str | None, json_path: Path | None) -> int:
    import torch

    if device is None:
        if not torch.cuda.is_available():
            print("stacked gpu row: no CUDA device visible; skipped")
            return 0
        device = "gpu"
    from deepnets.config import load_config
    from deepnets.run import train
    from deepnets.stacked import train_stacked

    members = 4 if quick else 64
    with tempfile.TemporaryDirectory(prefix="stacked_gpu_") as tmp:

        def cfg(seed: int, kind: str) -> Any:
            return load_config(
                "double_descent",
                [f"name={kind}/s{seed}", f"seed={seed}", f"output_dir={tmp}", "model.depth=2", "model.width=64",
                 "trainer.max_epochs=10", f"trainer.accelerator={device}", "trainer.progress_bar=false"],
            )  # fmt: skip

        train_stacked([cfg(0, "warmup")])  # CUDA context, kernels: not part of either figure
        start = time.perf_counter()
        stacked = train_stacked([cfg(s, "stacked") for s in range(members)])
        t_stacked = time.perf_counter() - start
        start = time.perf_counter()
        alone = [train(cfg(s, "alone")) for s in range(members)]
        t_alone = time.perf_counter() - start
    ok = all(r.ok for r in stacked) and all(r.ok for r in alone)
    agree = all(abs(a.metrics["test/acc"] - b.metrics["test/acc"]) <= 0.02 for a, b in zip(alone, stacked, strict=True))
    row = {
        "device": device if device != "gpu" else torch.cuda.get_device_name(0),
        "members": members,
        "steps": 50,
        "stacked_members_per_s": members / t_stacked,
        "sequential_members_per_s": members / t_alone,
        "speedup": t_alone / t_stacked,
        "all_ok": ok,
        "test_acc_agree_0.02": agree,
    }
    print(
        f"stacked row: {members} x 2x64 MLP, 50 steps each on {row['device']}: stacked "
        f"{row['stacked_members_per_s']:.2f} members/s, sequential {row['sequential_members_per_s']:.2f} members/s "
        f"({row['speedup']:.1f}x); all ok: {ok}; test/acc within 0.02: {agree}"
    )
    if json_path:
        json_path.write_text(json.dumps(row, indent=2) + "\n")
    return 0 if ok and agree else 1


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gpu-row", action="store_true", help="64 stacked 2x64 MLPs vs 64 sequential runs (GPU only)")
    p.add_argument("--device", default=None, help="--gpu-row on this accelerator (cpu: a smoke test)")
    p.add_argument("--quick", action="store_true", help="4 widths, 2 seeds, 10 epochs, one round")
    p.add_argument("--rounds", type=int, default=None, help="A B rounds (default 2; --quick: 1)")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args()
    if args.gpu_row:
        return gpu_row(args.quick, args.device, args.json)
    overrides = QUICK if args.quick else []
    rounds = args.rounds or (1 if args.quick else 2)
    times: dict[str, list[float]] = {"plain": [], "stacked": []}
    loads: list[float] = []
    problems: list[str] = []
    gaps: list[float] = []
    with tempfile.TemporaryDirectory(prefix="stacked_") as tmp:
        for r in range(rounds):
            tables = {}
            for vectorize in (False, True):
                load = os.getloadavg()[0]
                loads.append(load)
                seconds, rows = one_round(vectorize, overrides, Path(tmp))
                kind = "stacked" if vectorize else "plain"
                times[kind].append(seconds)
                tables[kind] = rows
                print(f"round {r + 1}: {kind:7s}: {seconds:7.1f} s ({len(rows)} runs; load {load:.2f})", flush=True)
            problems += [f"round {r + 1}: {x}" for x in compare(tables["plain"], tables["stacked"])]
            gap = max(
                abs(float(a["test/error"]) - float(b["test/error"])) for a, b in zip(*tables.values(), strict=True)
            )
            same = sum(a["test/error"] == b["test/error"] for a, b in zip(*tables.values(), strict=True))
            gaps.append(gap)
            print(
                f"round {r + 1}: test/error of the same run, plain vs stacked: {same}/{len(tables['plain'])} "
                f"identical, largest difference {gap:.4f}",
                flush=True,
            )
    ratios = [a / b for a, b in zip(times["plain"], times["stacked"], strict=True)]
    speedup = statistics.median(ratios)
    print(
        f"cores: {len(os.sched_getaffinity(0))}; speedup stacked vs plain: {speedup:.2f}x (per round: "
        f"{', '.join(f'{x:.2f}' for x in ratios)}); target >= 5x: {'met' if speedup >= 5 else 'NOT met'}"
    )
    print("tables agree within seed-to-seed noise" if not problems else "tables DIFFER:\n  " + "\n  ".join(problems))
    if args.json:
        result = {
            "quick": args.quick,
            "seconds": times,
            "ratios": ratios,
            "speedup": speedup,
            "load_1min": loads,
            "tables_agree": not problems,
            "largest_run_test_error_difference": gaps,
            "differences": problems,
        }
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0 if not problems else 1


if __name__ == "__main__":
    sys.exit(main())
