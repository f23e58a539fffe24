"""Shared plumbing for the experiments: run directories, tables, headless plotting."""

from __future__ import annotations

import argparse
import contextlib
import csv
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: experiments run on servers and in CI
import matplotlib.pyplot as plt

from deepnets.rundir import next_dir

__all__ = ["base_parser", "fmt", "new_run_dir", "plt", "save_figure", "torch_threads", "verdict", "write_table"]

DEFAULT_OUT = "runs/experiments"


def base_parser(name: str, description: str) -> argparse.ArgumentParser:
    """The flags every experiment takes: `--out DIR`, `--quick`, `--seed N`."""
    p = argparse.ArgumentParser(prog=f"python -m deepnets.experiments {name}", description=description)
    p.add_argument("--out", default=DEFAULT_OUT, help=f"root of run directories (default {DEFAULT_OUT})")
    p.add_argument("--quick", action="store_true", help="tiny sizes: seconds instead of minutes")
    p.add_argument("--seed", type=int, default=0)
    return p


def new_run_dir(root: str | os.PathLike[str], name: str) -> Path:
    """Create and return a fresh `<root>/<name>/version_<n>/`, never reusing an existing one."""
    return next_dir(Path(root) / name, "version", "--out")


def fmt(v: Any) -> str:
    """Compact cell text: floats in 4 significant digits (scientific when tiny or huge)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: Sequence[Mapping[str, Any]], path_stem: str | os.PathLike[str]) -> str:
    """Write `rows` to `<stem>.csv` (full precision) and `<stem>.md`; return the markdown."""
    stem = Path(path_stem)
    cols = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(md)
    return md


def save_figure(fig: Any, path: str | os.PathLike[str]) -> Path:
    """Save `fig` as PNG and close it (figures pile up in long sweeps otherwise)."""
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the body with `torch.set_num_threads(n)`, restoring the previous count after.

    The experiments' nets are tiny: on shared cores, more threads only add contention.
    """
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def verdict(agrees: bool, why: str) -> str:
    """Table text saying whether a measurement agrees with the lecture's claim, and why, for a student."""
    return f"{'yes' if agrees else 'NO'}: {why}"
