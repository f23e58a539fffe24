"""Vanishing gradients through depth: plain nets vs BatchNorm vs skip, residual and dense connections.

Every net has the same depth (default 20 hidden layers) and width, starts
from the same seed and trains briefly on digits (`deepnets.run.train`, so each
is an ordinary run directory) while the GradientFlowMonitor records each
layer's gradient norm. The figure and the table come from `deepnets compare`'s
code, reading the runs' event files; this module adds what only it knows:
the fraction of exactly-zero hidden activations on the test split, and
whether the monitor warned. In a plain sigmoid MLP the backward pass
multiplies by sigma' <= 1/4 and a weight matrix per layer, so the first
layer's gradient is orders of magnitude below the head's (Hochreiter 1991;
Bengio et al. 1994; Glorot & Bengio 2010). BatchNorm (Ioffe & Szegedy 2015; it
also lets the sigmoid net train), concatenated shortcuts (skipnet), identity shortcuts (He et al. 2016) and
dense connectivity (Huang et al. 2017) give the gradient a short path back.

    python -m deepnets.experiments vanishing [--depth 20] [--steps 300] [--quick]

Writes into `<out>/vanishing/version_<n>/`: one run directory per
architecture (`<label>/version_0/`: TensorBoard events, `gradient_flow.png`,
`metrics.json`), `grad_norm_vs_depth.png` (compare's figure) and
`ratios.{csv,md}`; prints the table.
"""

from __future__ import annotations

import contextlib
import logging
import math
import re
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from deepnets import compare
from deepnets.config import Config, from_dict
from deepnets.experiments.common import base_parser, new_run_dir
from deepnets.layers import ACTIVATIONS


@dataclass(frozen=True)
class Variant:
    """One architecture of the comparison: a label and its `model:` section (depth filled in later)."""

    label: str
    model: dict[str, Any]


def variants(depth: int, width: int, skip_activation: str) -> list[Variant]:
    """The nets, each with `depth` hidden weight layers (+ the head) on its longest path."""
    blocks = 4  # densemlp: 4 dense blocks + 3 transitions + stem = depth layers
    per_block = max(1, (depth - 1 - (blocks - 1)) // blocks)
    act = skip_activation
    return [
        Variant("mlp sigmoid", {"arch": "mlp", "activation": "sigmoid", "depth": depth, "width": width}),
        Variant(
            "mlp sigmoid + bn",
            {"arch": "mlp", "activation": "sigmoid", "batch_norm": True, "depth": depth, "width": width},
        ),
        Variant("mlp relu", {"arch": "mlp", "activation": "relu", "depth": depth, "width": width}),
        Variant(
            "mlp relu + bn",
            {"arch": "mlp", "activation": "relu", "batch_norm": True, "depth": depth, "width": width},
        ),
        # skip_from=input: later layers see x, but W^1's gradient still crosses every layer;
        # skip_from=all: the head sees every layer, so each W^l is one layer from the loss
        Variant(
            f"skipnet {act} (from input)",
            {"arch": "skipnet", "activation": act, "depth": depth, "width": width, "skip_from": "input"},
        ),
        Variant(
            f"skipnet {act} (from all)",
            {"arch": "skipnet", "activation": act, "depth": depth, "width": width, "skip_from": "all"},
        ),
        # a residual block holds two linear layers, plus a stem layer
        Variant(f"resmlp {act}", {"arch": "resmlp", "activation": act, "depth": max(1, depth // 2), "width": width}),
        Variant(
            f"densemlp {act}",
            {
                "arch": "densemlp",
                "activation": act,
                "num_blocks": blocks,
                "layers_per_block": per_block,
                "growth_rate": max(1, width // 4),
                "width": width,
            },
        ),
    ]


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence Lightning's banner and its advice about small datasets; keep our own warnings."""
    loggers = [logging.getLogger(n) for n in ("lightning", "lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"lightning\..*")
            warnings.filterwarnings("ignore", module=r"torch\..*")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def zero_activation_fraction(model: torch.nn.Module, x: torch.Tensor, batch_size: int = 512) -> float:
    """Fraction of exactly-zero outputs over every hidden activation layer of `model` on the samples `x`.

    Counts the outputs of the modules the activation table builds (ReLU, Sigmoid, ...), in eval
    mode (BatchNorm with its running statistics), over all samples and units."""
    kinds = tuple({type(make()) for make in ACTIVATIONS.values()} - {torch.nn.Identity})
    counts = [0, 0]  # zeros, elements

    def hook(module: torch.nn.Module, inputs: Any, out: torch.Tensor) -> None:
        counts[0] += int((out == 0).sum())
        counts[1] += out.numel()

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, kinds)]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(0, len(x), batch_size):
                model(x[i : i + batch_size])
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return counts[0] / counts[1] if counts[1] else math.nan


def train_one(cfg: Config) -> tuple[Any, float, bool]:
    """`deepnets.run.train(cfg)`; returns its result, the zero-activation fraction on the test split,
    and whether the monitor warned about vanishing gradients."""
    from deepnets.data import InMemoryDataModule
    from deepnets.run import train

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = train(cfg)
    vanishing = False
    for w in caught:  # the monitor's own warnings are the point: show them
        if w.category.__name__ == "GradientFlowWarning":
            print(f"  warning: {str(w.message)[:200]}")
            vanishing |= str(w.message).startswith("vanishing")
    if not result.ok:
        raise RuntimeError(f"run {result.status}: {result.error}")
    data = InMemoryDataModule(cfg.data, cfg.seed)
    data.setup("test")
    assert data.splits is not None
    return result, zero_activation_fraction(result.model, data.splits.x_test), vanishing


def main(argv: list[str] | None = None) -> int:
    p = base_parser("vanishing", __doc__.splitlines()[0])
    p.add_argument("--depth", type=int, default=20, help="hidden weight layers per net (default 20)")
    p.add_argument("--width", type=int, default=64, help="hidden width (default 64)")
    p.add_argument("--steps", type=int, default=300, help="training steps per net (default 300)")
    p.add_argument("--every", type=int, default=10, help="monitor interval in steps (default 10)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default 0.05)")
    p.add_argument("--skip-activation", default="relu", help="activation of skipnet/resmlp/densemlp (default relu)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: these nets are too small to split)"
    )
    p.add_argument("--archs", default=None, help="comma-separated labels or archs to run (default: all)")
    args = p.parse_args(argv)
    if args.quick:
        args.steps, args.every, args.width = min(args.steps, 30), min(args.every, 5), min(args.width, 32)

    out = new_run_dir(args.out, "vanishing")
    chosen = variants(args.depth, args.width, args.skip_activation)
    if args.archs:
        wanted = {a.strip() for a in args.archs.split(",")}
        chosen = [v for v in chosen if v.label in wanted or v.model["arch"] in wanted]
    print(f"vanishing gradients: depth {args.depth}, width {args.width}, {args.steps} steps, seed {args.seed}")
    print(f"run directory: {out}")

    threads = torch.get_num_threads()
    try:
        rows, dirs = _run_all(chosen, args, out)  # train() applies trainer.threads = --threads
    finally:
        torch.set_num_threads(threads)
    runs = [compare.load_run(d, label) for label, d in dirs]
    if runs:
        save_figure_of(compare.figure(runs), out / "grad_norm_vs_depth.png")
    table = compare.write_table(rows, out / "ratios")
    print()
    print(table)
    print(f"figure: {out / 'grad_norm_vs_depth.png'}")
    print(f"per-architecture heatmaps: {out}/*/version_0/gradient_flow.png; TensorBoard: tensorboard --logdir {out}")
    return 0


def _run_all(chosen: list[Variant], args: Any, out: Path) -> tuple[list[dict[str, Any]], list[tuple[str, Path]]]:
    """Train every variant; the table's rows (compare's summary + this experiment's columns) and the runs."""
    rows: list[dict[str, Any]] = []
    dirs: list[tuple[str, Path]] = []
    for v in chosen:
        cfg = from_dict(
            {
                "name": re.sub(r"[^A-Za-z0-9]+", "_", v.label).strip("_"),
                "output_dir": str(out),
                "seed": args.seed,
                "model": v.model,
                "data": {"name": "digits", "batch_size": 128},
                "optim": {"name": "sgd", "lr": args.lr, "momentum": 0.9},
                "trainer": {
                    "accelerator": "cpu",
                    "devices": 1,
                    "max_steps": args.steps,
                    "max_epochs": -1,
                    "progress_bar": False,
                    "log_every_n_steps": args.every,
                    "threads": args.threads,
                },
                "checkpoint": {"enabled": False},  # test and zero activations: the last weights
                "logging": {"grad_norm_every_n_steps": args.every},
            }
        )
        start = time.perf_counter()
        print(f"- {v.label}")
        try:
            with _quiet():
                result, zeros, vanishing = train_one(cfg)
        except Exception as e:  # an architecture not built yet must not sink the others
            print(f"  skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            rows.append({"architecture": v.label, "note": f"skipped ({type(e).__name__})"})
            continue
        seconds = round(time.perf_counter() - start, 1)
        (summary,) = compare.summary_rows([compare.load_run(result.run_dir, v.label)])
        rows.append(
            {
                "architecture": v.label,
                "weight layers": summary["weight layers"],
                "first/last @ step 0": summary["first/last @ first step"],
                "first/last, last quarter (median)": summary["first/last, last quarter (median)"],
                "val/acc": summary["val/acc"],
                "test/acc": summary["test/acc"],
                "zero activations (test)": zeros,
                "vanishing warning": "yes" if vanishing else "no",
                "seconds": seconds,
            }
        )
        dirs.append((v.label, result.run_dir))
    return rows, dirs


def save_figure_of(fig: Any, path: Path) -> None:
    import matplotlib.image

    from deepnets.monitor import render

    matplotlib.image.imsave(path, render(fig), format="png")
