"""Shared plumbing for the experiments: run directories, tables, headless plotting."""

from __future__ import annotations

import argparse
import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # headless: experiments run on servers and in CI
import matplotlib.pyplot as plt

from deepnets.rundir import next_dir
from deepnets.tables import fmt, write_table

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
