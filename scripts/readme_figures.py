"""Regenerate the README's figures: the shipped-config table and the experiments' tables, from one command.

    python scripts/readme_figures.py [--out FILE] [--configs mlp,resnet] [--experiments vanishing,...]
                                     [--repeat N] [--threads auto|N] [--quick]

Shipped configs: every `configs/*.yaml` on the bundled digits that is not a sweep, each run as a user runs it
(`python train.py --config NAME`, a fresh process, in a scratch directory), `--repeat` times. Test accuracy
comes from the run's metrics.json (with a fixed thread count it is the same in every repeat; the script
says so when it is not); wall time is the whole command (imports, training, test, files), given as the
range over the repeats. Parameter counts come from `deepnets.models.build_model`.

Experiments: each `python -m deepnets.experiments NAME` is run as the README shows it (double_descent with
`--ridge`, for the weight-decay columns; `--quick` passes `--quick`) and the markdown tables it writes into its
run directory are copied out unchanged, with the wall time of the command: nothing is recomputed here.

The markdown goes to stdout and, with `--out`, to FILE, to paste into the README. Wall times depend on the
machine and its load: the header line of the output records the conditions (threads, cores, load average).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from deepnets.config import load_config  # noqa: E402
from deepnets.data import InMemoryDataModule  # noqa: E402
from deepnets.models import build_model  # noqa: E402

# What each shipped config is, in words (the numbers beside it are measured).
DESCRIPTIONS = {
    "mlp": "3x256 ReLU MLP, BN, dropout",
    "skipnet": "MLP with shortcuts from the input",
    "resmlp": "residual MLP",
    "densemlp": "dense MLP",
    "resnet": "small CIFAR-stem ResNet",
    "densenet": "small DenseNet-BC",
    "deep_sigmoid": "12-layer sigmoid MLP, no BN: the vanishing-gradient baseline",
}
ORDER = list(DESCRIPTIONS)


def shipped_digits_configs() -> list[str]:
    """Names of the configs/*.yaml that train on the bundled digits and are not sweeps, README order first."""
    names = []
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(str(path))
        if cfg.data.name == "digits" and not cfg.sweep.params:
            names.append(path.stem)
    return sorted(names, key=lambda n: (ORDER.index(n) if n in ORDER else len(ORDER), n))


def parameter_count(name: str) -> int:
    cfg = load_config(str(ROOT / "configs" / f"{name}.yaml"))
    dm = InMemoryDataModule(cfg.data, cfg.seed)
    return sum(p.numel() for p in build_model(cfg.model, dm.input_shape, dm.num_classes).parameters())


def clean_env() -> dict[str, str]:
    """The environment a user has: no thread variables (trainer.threads decides), warnings as they come."""
    drop = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "PYTHONWARNINGS")
    return {k: v for k, v in os.environ.items() if k not in drop} | {"PYTHONPATH": str(ROOT)}


def run_config(name: str, threads: str, workdir: Path, extra: list[str]) -> tuple[float, dict]:
    """(wall seconds of the whole command, metrics.json) of `python train.py --config NAME` in `workdir`."""
    out = workdir / "runs"
    args = [sys.executable, str(ROOT / "train.py"), "--config", name, f"output_dir={out}", f"trainer.threads={threads}"]
    args += ["trainer.progress_bar=false", *extra]
    t0 = time.perf_counter()
    proc = subprocess.run(args, cwd=workdir, capture_output=True, text=True, env=clean_env())
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"error: {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
    runs = sorted((out / name).glob("version_*/metrics.json"), key=lambda p: int(p.parent.name.split("_")[1]))
    return wall, json.loads(runs[-1].read_text())


def config_table(names: list[str], threads: str, repeat: int, extra: list[str]) -> tuple[str, list[str]]:
    rows = ["| config | model | parameters | test acc on digits | wall time |", "| --- | --- | --- | --- | --- |"]
    notes = []
    with tempfile.TemporaryDirectory(prefix="readme_figures_") as tmp:
        for name in names:
            walls, accs = [], []
            for _ in range(repeat):
                wall, metrics = run_config(name, threads, Path(tmp), extra)
                walls.append(wall)
                accs.append(metrics["metrics"]["test/acc"])
                print(f"  {name}: test/acc {accs[-1]:.4f}, {wall:.1f} s", file=sys.stderr, flush=True)
            if len(set(accs)) > 1:
                notes.append(f"{name}: test accuracy differs between repeats: {', '.join(f'{a:.4f}' for a in accs)}")
            acc = f"{100 * accs[0]:.1f}%" + (" (chance: that is its point)" if name == "deep_sigmoid" else "")
            lo, hi = min(walls), max(walls)
            wall_text = f"{lo:.0f} s" if round(lo) == round(hi) else f"{lo:.0f}-{hi:.0f} s"
            desc = DESCRIPTIONS.get(name, "")
            rows.append(f"| `{name}.yaml` | {desc} | {parameter_count(name):,} | {acc} | {wall_text} |")
    return "\n".join(rows), notes


# Flags an experiment runs with for the README: the double-descent table has the tuned weight-decay columns.
README_FLAGS = {"double_descent": ["--ridge"]}


def experiment_tables(name: str, quick: bool) -> str:
    """The markdown tables `python -m deepnets.experiments NAME` writes, as it writes them."""
    with tempfile.TemporaryDirectory(prefix=f"readme_figures_{name}_") as tmp:
        flags = [*README_FLAGS.get(name, []), *(["--quick"] if quick else [])]
        args = [sys.executable, "-m", "deepnets.experiments", name, "--out", tmp, *flags]
        t0 = time.perf_counter()
        proc = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, env=clean_env())
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise SystemExit(f"error: {' '.join(args)} exited {proc.returncode}:\n{proc.stderr[-2000:]}")
        run_dirs = sorted(Path(tmp).glob("*/version_*"))
        if not run_dirs:
            raise SystemExit(f"error: {' '.join(args)} wrote no run directory under {tmp}")
        parts = [f"### `{name}{''.join(' ' + f for f in flags)}` ({wall:.0f} s, whole command)"]
        for md in sorted(run_dirs[-1].glob("*.md")):
            parts += [f"`{md.name}`:", "", md.read_text().strip(), ""]
        return "\n".join(parts)


def conditions(threads: str) -> str:
    import torch

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else "n/a"
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    return (
        f"trainer.threads={threads}; {os.cpu_count()} CPU cores ({platform.machine()}), load average {load} at "
        f"start; torch {torch.__version__}, Python {platform.python_version()}; {when}"
    )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, help="also write the markdown here")
    p.add_argument("--configs", help="comma-separated config names (default: every shipped digits config; 'none')")
    p.add_argument("--experiments", help="comma-separated experiment names (default: all; 'none' for none)")
    p.add_argument("--repeat", type=int, default=1, help="runs per config (wall time as the range over them)")
    p.add_argument("--threads", default="auto", help="trainer.threads for the config runs (default: auto)")
    p.add_argument("--quick", action="store_true", help="smoke test: 1 epoch per config, experiments --quick")
    args = p.parse_args(argv)

    from deepnets.experiments.__main__ import EXPERIMENTS

    names = [n for n in args.configs.split(",") if n != "none"] if args.configs else shipped_digits_configs()
    experiments = (
        list(EXPERIMENTS) if args.experiments is None else [e for e in args.experiments.split(",") if e != "none"]
    )
    for e in experiments:
        if e not in EXPERIMENTS:
            raise SystemExit(f"error: unknown experiment {e!r}; choose from {', '.join(EXPERIMENTS)}")
    extra = ["trainer.max_epochs=1"] if args.quick else []

    out = [f"<!-- scripts/readme_figures.py: {conditions(args.threads)} -->", ""]
    if names:
        table, notes = config_table(names, args.threads, args.repeat, extra)
        out += [table, ""]
        out += [f"<!-- note: {n} -->" for n in notes]
        if args.quick:
            out.append("<!-- --quick: 1 epoch per config; not the README's numbers -->")
    for e in experiments:
        print(f"  experiment {e} ...", file=sys.stderr, flush=True)
        out += [experiment_tables(e, args.quick), ""]
    text = "\n".join(out).rstrip() + "\n"
    print(text, end="")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
