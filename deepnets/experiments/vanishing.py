"""Vanishing gradients through depth: plain nets vs BatchNorm vs skip, residual and dense connections.

Every net has the same depth (default 20 hidden layers) and width, starts
from the same seed and trains briefly on digits while the GradientFlowMonitor
records each layer's gradient norm. In a plain sigmoid MLP the backward pass
multiplies by sigma' <= 1/4 and a weight matrix per layer, so the first
layer's gradient is orders of magnitude below the head's (Hochreiter 1991;
Bengio et al. 1994; Glorot & Bengio 2010). BatchNorm (Ioffe & Szegedy 2015),
concatenated shortcuts (skipnet), identity shortcuts (He et al. 2016) and
dense connectivity (Huang et al. 2017) give the gradient a short path back.

    python -m deepnets.experiments vanishing [--depth 20] [--steps 300] [--quick]

Writes into `<out>/vanishing/version_<n>/`: one TensorBoard run per
architecture (with its `gradient_flow.png`), `grad_norm_vs_depth.png` and
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

from deepnets.config import Config, from_dict
from deepnets.experiments.common import base_parser, new_run_dir, plt, save_figure, write_table
from deepnets.monitor import GradientFlowMonitor


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


def train_one(cfg: Config, run_dir: Path) -> tuple[GradientFlowMonitor, dict[str, float]]:
    """Train `cfg` briefly with the gradient-flow monitor; return it and the final metrics."""
    import lightning as L

    from deepnets.data import InMemoryDataModule
    from deepnets.models import build_model
    from deepnets.module import Classifier
    from deepnets.run import build_trainer

    L.seed_everything(cfg.seed, workers=True, verbose=False)
    data = InMemoryDataModule(cfg.data, cfg.seed)
    data.setup("fit")
    model = build_model(cfg.model, data.input_shape, data.num_classes)
    monitor = GradientFlowMonitor(cfg.logging, run_dir)
    trainer = build_trainer(cfg, run_dir, [monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Classifier(model, cfg), datamodule=data)
    for w in caught:  # the monitor's own warnings are the point: show them
        if w.category.__name__ == "GradientFlowWarning":
            print(f"  warning: {str(w.message)[:200]}")
    metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if v.numel() == 1}
    return monitor, metrics


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
    torch.set_num_threads(args.threads)
    try:
        rows, results = _run_all(chosen, args, out)
    finally:
        torch.set_num_threads(threads)
    if results:
        _plot(results, out / "grad_norm_vs_depth.png")
    table = write_table(rows, out / "ratios")
    print()
    print(table)
    print(f"figure: {out / 'grad_norm_vs_depth.png'}")
    print(f"per-architecture heatmaps: {out}/*/gradient_flow.png; TensorBoard: tensorboard --logdir {out}")
    return 0


Result = tuple[Variant, GradientFlowMonitor, dict[str, float]]


def _run_all(chosen: list[Variant], args: Any, out: Path) -> tuple[list[dict[str, Any]], list[Result]]:
    results: list[Result] = []
    rows: list[dict[str, Any]] = []
    for v in chosen:
        cfg = from_dict(
            {
                "name": "vanishing",
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
                },
                "logging": {"grad_norm_every_n_steps": args.every},
            }
        )
        run_dir = out / re.sub(r"[^A-Za-z0-9]+", "_", v.label).strip("_")
        start = time.perf_counter()
        print(f"- {v.label}")
        try:
            with _quiet():
                monitor, metrics = train_one(cfg, run_dir)
        except Exception as e:  # an architecture not built yet must not sink the others
            print(f"  skipped: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}")
            rows.append({"architecture": v.label, "note": f"skipped ({type(e).__name__})"})
            continue
        h = monitor.history
        ratio = h.ratio_first_last()
        tail = ratio[-max(1, len(ratio) // 4) :]  # the last quarter of the run
        row = {
            "architecture": v.label,
            "weight layers": len(h.layer_names),
            "first/last @ step 0": ratio[0].item(),
            "first/last, last quarter (median)": tail.median().item(),
            "first layer |g| @ step 0": h.grad_norm[0, 0].item(),
            "val/acc": metrics.get("val/acc", math.nan),
            "vanishing warning": "yes" if "vanishing" in monitor.warned else "no",
            "seconds": round(time.perf_counter() - start, 1),
        }
        rows.append(row)
        results.append((v, monitor, metrics))
    return rows, results


def _plot(results: list[Result], path: Path) -> None:
    """Gradient norm vs depth, one line per architecture: at step 0 and at the end of training."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    for v, monitor, _ in results:
        h = monitor.history
        depth = range(len(h.layer_names))
        (line,) = axes[0].semilogy(depth, h.grad_norm[0].numpy(), "o-", ms=3, label=v.label)
        axes[1].semilogy(depth, h.grad_norm[-1].numpy(), "o-", ms=3, color=line.get_color(), label=v.label)
    steps = results[0][1].history.steps
    for ax, title in zip(
        axes, (f"at initialisation (step {steps[0]})", f"after training (step {steps[-1]})"), strict=True
    ):
        ax.set_title(f"gradient norm per layer, {title}")
        ax.set_xlabel("weight layer (0 = input, last = head)")
        ax.grid(True, which="both", alpha=0.3)
    axes[0].set_ylabel("||dL/dW|| (log scale)")
    axes[1].legend(fontsize=8)
    save_figure(fig, path)
