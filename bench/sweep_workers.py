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


def profile(sweep_dir: Path, t0: float, t_end: float) -> dict[str, float]:
    """Where the wall time went, from the study's trials (each records its worker and its start and end, in
    time.time()) and each run's `seconds` (metrics.json wall_seconds: Trainer, fit, test).

    startup: sweep start to each worker's first trial (process start, imports, opening the study; the
    1-worker arm runs in the sweep process itself); trial_overhead: per trial, its span minus the run's own
    seconds (data, model, checks, thread decision, recording the trial); gaps: between one worker's trials
    (the report rewrite after each, claiming the next); tail: each worker's idle time from its last trial's
    end to the end of the sweep (the imbalance a longest-first order shrinks); busy_imbalance: 1 - mean
    worker busy time / the longest.
    """
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    name = json.loads((sweep_dir / "study.json").read_text())["study"]
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'study.db'}")
    by_worker: dict[str, list[tuple[float, float, float]]] = {}
    index_span: list[tuple[int, float]] = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        if "started" in a and "finished" in a:
            seconds = float((a.get("row") or {}).get("seconds") or 0.0)
            by_worker.setdefault(a.get("worker", "?"), []).append((a["started"], a["finished"], seconds))
            index_span.append((int(a["index"]), a["finished"] - a["started"]))
    spans = [sorted(v) for v in by_worker.values()]
    trials = [x for v in spans for x in v]
    busy = [sum(f - s for s, f, _ in v) for v in spans]
    return {
        "workers_seen": len(spans),
        "trials": len(trials),
        "wall_s": t_end - t0,
        "startup_s": statistics.mean(v[0][0] - t0 for v in spans),
        "fit_s_total": sum(x[2] for x in trials),
        "trial_overhead_s_mean": statistics.mean(f - s - sec for s, f, sec in trials),
        "gaps_s_total": sum(v[i + 1][0] - v[i][1] for v in spans for i in range(len(v) - 1)),
        "tail_s_mean": statistics.mean(t_end - v[-1][1] for v in spans),
        "busy_imbalance": 1 - statistics.mean(busy) / max(busy),
        "first_trials_s": [round(v[0][1] - v[0][0], 1) for v in spans],
        "last_trials_s": [round(v[-1][1] - v[-1][0], 1) for v in spans],
        "spans_by_index": [round(x, 3) for _, x in sorted(index_span)],
    }


def makespan(spans: list[float], workers: int) -> float:
    """Greedy list scheduling: each run goes to the worker that frees up first, in the order given."""
    free = [0.0] * workers
    for x in spans:
        free[free.index(min(free))] += x
    return max(free)


def simulate(p: dict[str, float]) -> str:
    """From a 1-worker run's per-run spans: the 2-worker time of the runs alone in grid order and longest
    first (sorted by the measured spans, which the parameter-count order sweep.run_order uses follows here)."""
    spans = list(p["spans_by_index"])
    grid, lpt = makespan(spans, 2), makespan(sorted(spans, reverse=True), 2)
    return (
        f"    simulated from these runs' spans, 2 workers without start-up: grid order {grid:.1f} s, longest "
        f"first {lpt:.1f} s (all runs one after another: {sum(spans):.1f} s)"
    )


def show(p: dict[str, float]) -> str:
    return (
        f"    profile: start-up {p['startup_s']:.1f} s, runs' own seconds {p['fit_s_total']:.1f} s in all, "
        f"per-run overhead {p['trial_overhead_s_mean']:.2f} s, gaps {p['gaps_s_total']:.1f} s, end tail "
        f"{p['tail_s_mean']:.1f} s per worker (last runs took {p['last_trials_s']} s), busy imbalance "
        f"{p['busy_imbalance']:.1%}"
    )


def one_round(workers: int, overrides: list[str], tmp: Path) -> tuple[float, list[dict[str, str]], dict[str, float]]:
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
    start, t0 = time.perf_counter(), time.time()
    proc = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"error: {' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    (table,) = out.glob("*/sweep_*/results.csv")
    with open(table, newline="") as f:
        rows = [{k: v for k, v in r.items() if k not in VOLATILE} for r in csv.DictReader(f)]
    return seconds, rows, profile(table.parent, t0, t0 + seconds)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="4 widths, 1 seed, 20 epochs, one round")
    p.add_argument("--rounds", type=int, default=None, help="A B rounds (default 2; --quick: 1)")
    p.add_argument("--json", type=Path, help="also write the measurements here")
    args = p.parse_args()
    overrides = QUICK if args.quick else []
    rounds = args.rounds or (1 if args.quick else 2)
    times: dict[int, list[float]] = {1: [], 2: []}
    profiles: dict[int, list[dict[str, float]]] = {1: [], 2: []}
    tables = []
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sweep_workers_") as tmp:
        for r in range(rounds):
            for workers in (1, 2):
                seconds, rows, prof = one_round(workers, overrides, Path(tmp))
                times[workers].append(seconds)
                profiles[workers].append(prof)
                tables.append(rows)
                print(f"round {r + 1}: {workers} worker(s): {seconds:7.1f} s ({len(rows)} runs)", flush=True)
                print(show(prof), flush=True)
                if workers == 1:
                    print(simulate(prof), flush=True)
    same = all(t == tables[0] for t in tables)
    ratios = [a / b for a, b in zip(times[1], times[2], strict=True)]
    speedup = statistics.median(ratios)
    print(
        f"cores: {len(os.sched_getaffinity(0))}; speedup 2 vs 1 workers: {speedup:.2f}x (per round: "
        f"{', '.join(f'{x:.2f}' for x in ratios)}); target >= 1.7x: {'met' if speedup >= 1.7 else 'NOT met'}"
    )
    print(f"results tables identical across rounds (but {', '.join(VOLATILE)}): {same}")
    print(f"load average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "quick": args.quick,
                    "seconds": times,
                    "ratios": ratios,
                    "speedup": speedup,
                    "same_table": same,
                    "profiles": profiles,
                },
                indent=2,
            )
            + "\n"
        )
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
