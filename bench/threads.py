"""`trainer.threads: auto` against each fixed thread count, on every shipped digits config, idle and busy.

    python bench/threads.py [--configs mlp,resnet] [--threads 1,2] [--rounds 3] [--json PATH] [--quick]

For each config and each condition (idle; one competing CPU-bound process, `while True: pass`, running
throughout) the settings `auto`, 1, 2 (`--threads`) are run as a user runs them (`python train.py --config
NAME trainer.threads=T`, a fresh process, no OMP_NUM_THREADS in its environment), in A B C A B C ... rounds
(the order reversed every other round), so a change of load during the bench hits every setting alike. The
time compared is the run's own `wall_seconds` from metrics.json (training + test; imports excluded, they do
not depend on threads). Per config and condition it reports the median per setting and the ratio
auto / best fixed count; the target is <= 1.1 everywhere. Test accuracy is reported too: with a fixed count
it repeats exactly, and different counts may give different accuracies (other reduction orders).

Absolute seconds depend on the machine and its other load; the ratios are what this measures.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepnets.config import load_config  # noqa: E402

TARGET = 1.1


def shipped_digits_configs() -> list[str]:
    """Every configs/*.yaml that trains on the bundled digits and is not a sweep."""
    names = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(str(path))
        if cfg.data.name == "digits" and not cfg.sweep.params:
            names.append(path.stem)
    return names


def env() -> dict[str, str]:
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")  # trainer.threads decides, as for a user without them
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONPATH": str(ROOT)}


def run_once(name: str, threads: str, out: Path, extra: list[str]) -> tuple[float, float, int]:
    """(wall_seconds, test/acc, threads used) of one `python train.py --config NAME trainer.threads=T`; the
    count used is the run's own record (hparams.yaml), so for `auto` it is what auto picked in that run."""
    args = [sys.executable, str(ROOT / "train.py"), "--config", name, f"output_dir={out}", f"trainer.threads={threads}"]
    args += ["trainer.progress_bar=false", *extra]
    proc = subprocess.run(args, cwd=out.parent, capture_output=True, text=True, env=env())
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    metrics_files = sorted((out / name).glob("version_*/metrics.json"), key=lambda p: p.stat().st_mtime)
    m = json.loads(metrics_files[-1].read_text())
    used = re.search(r"^\s*threads: (\d+)$", (metrics_files[-1].parent / "hparams.yaml").read_text(), re.M)
    if used is None:
        raise SystemExit(f"error: {metrics_files[-1].parent / 'hparams.yaml'} records no thread count")
    return float(m["wall_seconds"]), float(m["metrics"].get("test/acc", float("nan"))), int(used.group(1))


def competing_process() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def bench(names: list[str], settings: list[str], rounds: int, extra: list[str]) -> list[dict]:
    rows = []
    with tempfile.TemporaryDirectory(prefix="bench_threads_") as tmp:
        out = Path(tmp) / "runs"
        for condition in ("idle", "busy"):
            hog = competing_process() if condition == "busy" else None
            try:
                for name in names:
                    times: dict[str, list[float]] = {s: [] for s in settings}
                    accs: dict[str, list[float]] = {s: [] for s in settings}
                    picked: list[int] = []
                    for r in range(rounds):
                        for s in settings if r % 2 == 0 else settings[::-1]:
                            wall, acc, used = run_once(name, s, out, extra)
                            times[s].append(wall)
                            accs[s].append(acc)
                            if s == "auto":
                                picked.append(used)
                            print(
                                f"  {condition} {name} threads={s} ({used}): {wall:.2f} s, test/acc {acc:.4f}",
                                flush=True,
                            )
                    med = {s: statistics.median(v) for s, v in times.items()}
                    fixed = [s for s in settings if s != "auto"]
                    best = min(fixed, key=lambda s: med[s])
                    rows.append(
                        {
                            "condition": condition,
                            "config": name,
                            "median_s": med,
                            "times_s": times,
                            "test_acc": accs,
                            "best_fixed": best,
                            "auto_picked": picked,
                            "ratio": med["auto"] / med[best] if "auto" in med else None,
                        }
                    )
            finally:
                if hog is not None:
                    hog.kill()
                    hog.wait()
    return rows


def markdown(rows: list[dict], settings: list[str]) -> str:
    head = "| condition | config | " + " | ".join(f"threads={s} (median s)" for s in settings)
    head += " | auto picked | auto / best fixed | test acc (" + ", ".join(settings) + ") |"
    lines = [head, "|" + " --- |" * (len(settings) + 5)]
    for r in rows:
        cells = [f"{r['median_s'][s]:.2f}" for s in settings]
        ratio = f"{r['ratio']:.2f} (best: {r['best_fixed']})" + ("" if r["ratio"] <= TARGET else " **over 1.1**")
        acc = ", ".join("/".join(sorted({f"{a:.4f}" for a in r["test_acc"][s]})) for s in settings)
        picked = ", ".join(str(n) for n in r["auto_picked"]) or "-"
        lines.append(f"| {r['condition']} | {r['config']} | " + " | ".join(cells) + f" | {picked} | {ratio} | {acc} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", help="comma-separated config names (default: every shipped digits config)")
    p.add_argument("--threads", default="1,2", help="fixed counts to compare auto with (default: 1,2)")
    p.add_argument("--rounds", type=int, default=3, help="A B A B rounds per config and condition (default: 3)")
    p.add_argument("--json", type=Path, help="write the raw results here")
    p.add_argument("--quick", action="store_true", help="smoke test: mlp and resnet, 1 epoch, 1 round")
    args = p.parse_args(argv)
    names = args.configs.split(",") if args.configs else shipped_digits_configs()
    rounds, extra = args.rounds, []
    if args.quick:
        names, rounds, extra = (names if args.configs else ["mlp", "resnet"]), 1, ["trainer.max_epochs=1"]
    settings = ["auto", *args.threads.split(",")]
    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    print(f"threads bench: {os.cpu_count()} cores, load average {load}", flush=True)
    t0 = time.perf_counter()
    rows = bench(names, settings, rounds, extra)
    table = markdown(rows, settings)
    worst = max(r["ratio"] for r in rows)
    print()
    print(table)
    print(
        f"\nworst auto / best fixed: {worst:.2f} (target <= {TARGET}); {rounds} round(s), "
        f"{time.perf_counter() - t0:.0f} s; load average at the end " + ", ".join(f"{x:.2f}" for x in os.getloadavg())
    )
    if args.json:
        payload = {"cores": os.cpu_count(), "rounds": rounds, "extra": extra, "rows": rows}
        args.json.write_text(json.dumps(payload, indent=2) + "\n")
    return 0 if worst <= TARGET else 1


if __name__ == "__main__":
    sys.exit(main())
