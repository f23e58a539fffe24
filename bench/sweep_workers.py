"""Local sweep workers: the shipped double_descent sweep with 2 workers against 1 (issue 18: >= 1.7x faster
on a 2-core machine, the same results table).

    python bench/sweep_workers.py                 # full sweep (12 widths x 3 seeds), rounds 1 2 1 2
    python bench/sweep_workers.py --quick         # smoke test: 4 widths, 1 seed, 20 epochs, one round each
    python bench/sweep_workers.py --rounds 3 --json sweep_workers.json

Each round is `deepnets --config double_descent output_dir=<tmp> sweep.workers=W` in a fresh process (as a
user runs it: Lightning's start-up is part of the cost), alternating W = 1 and 2 (A B A B) so that a change
in the machine's load hits both alike. The speedup is the median over rounds of (1-worker time / the
2-worker time of the same round). The tables of every round must agree in every column but `seconds` and
`run_dir` (both use one thread per run on 2 cores, so the numbers are the same to the last bit).
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
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
QUICK = ["sweep.params={model.width: [4, 8, 16, 32]}", "sweep.seeds=[0]", "trainer.max_epochs=20"]
VOLATILE = ("seconds", "run_dir")  # wall time and paths differ between rounds by nature


def one_round(workers: int, overrides: list[str], tmp: Path) -> tuple[float, list[dict[str, str]]]:
    out = tmp / f"w{workers}_{time.monotonic_ns()}"
    cmd = [
        sys.executable,
        str(ROOT / "train.py"),
        "--config",
        "double_descent",
        f"output_dir={out}",
        f"sweep.workers={workers}",
        *overrides,
    ]
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (table,) = out.glob("*/sweep_*/results.csv")
    with open(table, newline="") as f:
        rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(f)]
    return seconds, rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 widths, 1 seed, 20 epochs, one round")
    p.add_argument("--rounds", type=int, default=None, help="A B rounds (default 2; --quick: 1)")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args()
    overrides = QUICK if args.quick else []
    rounds = args.rounds or (1 if args.quick else 2)
    times: dict[int, list[float]] = {1: [], 2: []}
    tables = []
    with tempfile.TemporaryDirectory(prefix="sweep_workers_") as tmp:
        for r in range(rounds):
            for workers in (1, 2):
                seconds, rows = one_round(workers, overrides, Path(tmp))
                times[workers].append(seconds)
                tables.append(rows)
                print(f"round {r + 1}: {workers} worker(s): {seconds:7.1f} s ({len(rows)} runs)", flush=True)
    same = all(t == tables[0] for t in tables)
    ratios = [a / b for a, b in zip(times[1], times[2], strict=True)]
    speedup = statistics.median(ratios)
    print(
        f"cores: {len(os.sched_getaffinity(0))}; speedup 2 vs 1 workers: {speedup:.2f}x (per round: "
        f"{', '.join(f'{x:.2f}' for x in ratios)}); target >= 1.7x: {'met' if speedup >= 1.7 else 'NOT met'}"
    )
    print(f"results tables identical across rounds (but {', '.join(VOLATILE)}): {same}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {"quick": args.quick, "seconds": times, "ratios": ratios, "speedup": speedup, "same_table": same},
                indent=2,
            )
            + "\n"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
