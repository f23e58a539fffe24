"""Gradient-flow monitor: per-layer gradient norms in depth order, on TensorBoard and as a PNG.

Vanishing gradients (Hochreiter 1991; Bengio et al. 1994; Glorot & Bengio 2010)
show up as the gradient norm of the first layers collapsing by orders of
magnitude relative to the head; residual (He et al. 2016) and dense (Huang
et al. 2017) connections and BatchNorm keep it flat. This callback makes that
visible: every `grad_norm_every_n_steps` optimizer steps it records, for each
weight matrix / conv kernel in depth order (`depth_ordered_layers`), the L2
norm of its gradient, plus the global gradient norm and (toggle) each layer's
weight norm and update-to-weight ratio ||W_after - W_before|| / ||W_before||.

Cost: on a logging step all norms come from one `torch._foreach_norm` call and
reach the host in one transfer; on every other step the hooks return after an
integer comparison, touching no tensor. The update ratio needs the weights
before the step: with `weight_norms` on, a copy of the depth-ordered weights
is kept during training and refreshed on logging steps (memory: one copy of
those weights; time: about 6 extra passes over them per log event).
"""

from __future__ import annotations

import functools
import math
import os
import struct
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor, nn

from deepnets.config import LoggingConfig
from deepnets.models import depth_ordered_layers, has_forward_order, record_forward_order, sample_batch

__all__ = ["GradientFlowHistory", "GradientFlowMonitor", "GradientFlowWarning"]

_STATE_VERSION = 1
_MAX_HEATMAP_COLUMNS = 512  # the heatmaps subsample longer histories
_EVENTS_PER_BURST = 8
# first-layer / last-layer gradient norm, and its log10 (readable on TensorBoard's linear axis)
RATIO_TAGS = ("grad_norm/global", "grad_norm/first_over_last", "grad_norm/log10_first_over_last")

# The figures are drawn for TensorBoard's image card, which shows an image TB_CARD_PX wide by
# default (measured in headless Chromium on TensorBoard 2.21, scripts/tb_screenshots.py): text of
# FONT_PT - 1 points on a FIGURE_WIDTH_IN figure is >= 12 px (9 pt) there.
TB_CARD_PX = 350
FIGURE_WIDTH_IN = 4.4
FIGURE_DPI = 150
FONT_PT = 12


class GradientFlowWarning(UserWarning):
    """Vanishing, exploding or non-finite gradients seen by the GradientFlowMonitor."""


@dataclass
class GradientFlowHistory:
    """Everything the monitor logged, one row per log event.

    Attributes:
        layer_names: depth-ordered layer names (input -> head).
        steps: optimizer step (0-based) of each log event.
        grad_norm: (n_logs, n_layers) L2 norm of each layer's weight gradient.
        global_grad_norm: (n_logs,) L2 norm of all parameters' gradients.
        weight_norm: (n_logs, n_layers) weight norm before the step (empty without weight_norms).
        update_ratio: (n_logs, n_layers) ||W_after - W_before|| / ||W_before|| (likewise).
    """

    layer_names: list[str]
    steps: list[int]
    grad_norm: Tensor
    global_grad_norm: Tensor
    weight_norm: Tensor
    update_ratio: Tensor

    def ratio_first_last(self) -> Tensor:
        """(n_logs,) first-layer / last-layer gradient norm: << 1 means vanishing gradients."""
        return self.grad_norm[:, 0] / self.grad_norm[:, -1]


class GradientFlowMonitor(L.Callback):
    """Logs per-layer gradient norms in depth order to TensorBoard and `run_dir/gradient_flow.png`.

    Args:
        every_n_steps: log every this many optimizer steps (0: off).
        weight_norms: also log weight norms and update/weight ratios (keeps a copy of the weights).
        vanishing_ratio: warn when the first/last layer gradient norm falls below this.
        exploding_norm: warn when a layer's gradient norm exceeds this.
        heatmap_every_n_logs: redraw the TensorBoard heatmap after this many log events (at an epoch end).
        heatmap_range: fixed log10 colour range (lo, hi) of the heatmaps (None: per run).
        run_dir: where `gradient_flow.png` goes at the end of training (None: no PNG).
        title: figure title (None: from the run directory and the module's hparams).
        input_shape: one sample's shape; when given, a net whose weight order no forward pass has recorded
            yet (`deepnets.models.record_forward_order`; `build_model` records it for every user's module)
            is run once on a sample batch at setup, and its layers are listed in the order that pass used
            them. Without it, such a net's layers are in registration order (every zoo model's forward order).

    `from_config(cfg.logging, run_dir)` takes the settings from a config's `logging:` section.
    The wrapped net is `pl_module.model` when the LightningModule has one,
    else the LightningModule itself. Only global rank 0 computes and logs
    (gradients are already all-reduced at `on_before_optimizer_step`).
    """

    # A labelled heatmap costs ~0.1-0.2 s to redraw (matplotlib; its frame ~0.5-3 s once per run),
    # too much for the step hooks: it is drawn at epoch ends, when `heatmap_every_n_logs` log events
    # have passed since the last one, at most every 30 s (TensorBoard's page reloads every 30 s), and
    # always at the end of training.
    heatmap_min_interval_s = 30.0

    def __init__(
        self,
        every_n_steps: int = 25,
        *,
        weight_norms: bool = False,
        vanishing_ratio: float = 1e-3,
        exploding_norm: float = 1e3,
        heatmap_every_n_logs: int = 20,
        heatmap_range: tuple[float, float] | list[float] | None = (-12.0, 1.0),
        run_dir: Path | str | None = None,
        title: str | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> None:
        self.every_n = every_n_steps
        self.weight_norms = weight_norms
        self.vanishing_ratio = vanishing_ratio
        self.exploding_norm = exploding_norm
        self.heatmap_every_n_logs = heatmap_every_n_logs
        self.heatmap_range: tuple[float, float] | None = (
            (float(heatmap_range[0]), float(heatmap_range[1])) if heatmap_range is not None else None
        )
        self.input_shape = tuple(input_shape) if input_shape is not None else None
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.title = title  # figure title: run and architecture (None: from the run directory and module hparams)
        self.layer_names: list[str] = []
        self._weights: list[Tensor] = []  # depth-ordered weights
        self._others: list[Tensor] = []  # every other trainable parameter (global norm only)
        self._reset_history()
        self._pending: dict[str, Any] | None = None  # device tensors of the current log event
        self._snapshot: list[Tensor] | None = None  # weights before the step (update ratios)
        self._writer: Any = None
        self._tag_cache: dict[tuple[str, int], tuple[list[str], list[str]]] = {}
        self._scaler = False
        self._last_heatmap = -math.inf
        self._heatmap_logs, self._heatmap_step = 0, -1  # log events and step of the last heatmap
        self._live: tuple[list[str], _LiveHeatmap] | None = None  # the blitted TensorBoard heatmap
        self._unwritten: list[tuple[Any, int, float]] = []  # (Summary, step, wall time) not yet written
        self._last_write = -math.inf

    @classmethod
    def from_config(
        cls,
        cfg: LoggingConfig,
        run_dir: Path | str | None = None,
        title: str | None = None,
        input_shape: tuple[int, ...] | None = None,
    ) -> GradientFlowMonitor:
        """The monitor a config's `logging:` section describes."""
        return cls(
            cfg.grad_norm_every_n_steps,
            weight_norms=cfg.weight_norms,
            vanishing_ratio=cfg.vanishing_ratio,
            exploding_norm=cfg.exploding_norm,
            heatmap_every_n_logs=cfg.heatmap_every_n_logs,
            heatmap_range=cfg.heatmap_range,
            run_dir=run_dir,
            title=title,
            input_shape=input_shape,
        )

    def _reset_history(self) -> None:
        self._steps: list[int] = []
        self._grad: list[list[float]] = []
        self._global: list[float] = []
        self._wnorm: list[list[float]] = []
        self._ratio: list[list[float]] = []
        self._warned: set[str] = set()

    # ------------------------------------------------------------ public

    @property
    def enabled(self) -> bool:
        return self.every_n > 0

    @property
    def warned(self) -> frozenset[str]:
        """The warnings this run has issued: a subset of {"vanishing", "exploding", "nonfinite"}."""
        return frozenset(self._warned)

    @property
    def history(self) -> GradientFlowHistory:
        n = len(self.layer_names)

        def mat(rows: list[list[float]]) -> Tensor:
            return torch.tensor(rows, dtype=torch.float64).reshape(len(rows), n)

        return GradientFlowHistory(
            layer_names=list(self.layer_names),
            steps=list(self._steps),
            grad_norm=mat(self._grad),
            global_grad_norm=torch.tensor(self._global, dtype=torch.float64),
            weight_norm=mat(self._wnorm),
            update_ratio=mat(self._ratio),
        )

    # ------------------------------------------------------------ setup

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or not self.enabled:
            return
        self._resolve(pl_module)  # names now, so a checkpoint's history can be checked against them
        if self.title is None:
            self.title = _default_title(self.run_dir, getattr(pl_module, "hparams", {}))
        self._writer = None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger) and trainer.is_global_zero:
                self._writer = logger.experiment
                break

    def _resolve(self, pl_module: L.LightningModule) -> None:
        net = getattr(pl_module, "model", None)
        net = net if isinstance(net, nn.Module) else pl_module
        net = getattr(net, "_orig_mod", net)  # torch.compile wrapper
        if self.input_shape is not None and not has_forward_order(net):
            # recorded once per net: on the device and in the dtype of its parameters now
            p = next((p for p in net.parameters() if p.is_floating_point()), None)
            sample = sample_batch(self.input_shape)
            record_forward_order(net, sample.to(p.device, p.dtype) if p is not None else sample)
        layers = depth_ordered_layers(net)
        names = [name for name, _ in layers]
        if self.layer_names and names != self.layer_names:
            self._reset_history()
        self.layer_names = names
        self._weights = [p for _, p in layers]
        self._snapshot = None
        ids = {id(p) for p in self._weights}
        self._others = [p for p in net.parameters() if p.requires_grad and id(p) not in ids]

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not self.enabled or not trainer.is_global_zero:
            return
        self._resolve(pl_module)  # again: the strategy may have replaced parameters since setup
        self._scaler = getattr(trainer.precision_plugin, "scaler", None) is not None
        # the first periodic heatmap comes one interval into training (the end always draws one)
        self._last_heatmap = time.monotonic()

    # ------------------------------------------------------------ the hot path

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        step = trainer.global_step
        if self.every_n <= 0 or step % self.every_n != 0 or not self.layer_names:
            return
        if not trainer.is_global_zero or self._pending is not None:
            return
        weights = self._weights
        grads = [p.grad if p.grad is not None else torch.zeros((), device=p.device, dtype=p.dtype) for p in weights]
        other = [p.grad for p in self._others if p.grad is not None]
        # One batched kernel for every norm of this log event, stacked into one tensor:
        # (n grads, m other grads[, n weights]); the global norm is taken on the host.
        norms = torch.stack(torch._foreach_norm(grads + other + (weights if self.weight_norms else []))).float()
        pending: dict[str, Any] = {"step": step, "n_other": len(other), "parts": [norms]}
        if self.weight_norms:
            # Snapshot into a buffer kept for the run: allocating a fresh copy each time
            # costs more than the copy itself (page faults on the CPU, allocator churn on GPUs).
            if self._snapshot is None:
                self._snapshot = [torch.empty_like(w, memory_format=torch.preserve_format) for w in weights]
            with torch.no_grad():
                torch._foreach_copy_(self._snapshot, [w.detach() for w in weights])
            pending["before"] = self._snapshot
        self._pending = pending
        if not self.weight_norms:
            self._finish()

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._pending is not None:
            self._finish()

    def _finish(self) -> None:
        """Complete the pending log event: the update norms, one host transfer, history, TB, warnings."""
        pending, self._pending = self._pending, None
        assert pending is not None
        parts = pending["parts"]
        if "before" in pending:
            with torch.no_grad():
                delta = pending.pop("before")
                torch._foreach_sub_(delta, [w.detach() for w in self._weights])  # W_before - W_after
                parts.append(torch.stack(torch._foreach_norm(delta)).float())
        values = (torch.cat(parts) if len(parts) > 1 else parts[0]).tolist()  # the one device-to-host transfer
        n, m = len(self.layer_names), pending["n_other"]
        step = pending["step"]
        grad, glob = values[:n], math.hypot(*values[: n + m])  # hypot: sqrt of the sum of squares
        self._steps.append(step)
        self._grad.append(grad)
        self._global.append(glob)
        if len(values) > n + m:
            wnorm, upd = values[n + m : 2 * n + m], values[2 * n + m :]
            ratio = [u / w if w > 0 else math.nan for u, w in zip(upd, wnorm, strict=True)]
            self._wnorm.append(wnorm)
            self._ratio.append(ratio)
        self._check(step, grad, glob)
        if self._writer is not None:
            self._log_scalars(step)

    # ------------------------------------------------------------ warnings

    def _warn(self, kind: str, message: str) -> None:
        if kind not in self._warned:
            self._warned.add(kind)
            warnings.warn(message, GradientFlowWarning, stacklevel=2)

    def _check(self, step: int, grad: list[float], glob: float) -> None:
        names = self.layer_names
        # glob is a hypot over every norm: finite iff all of them are, so one test covers the
        # common case and the lists below are built only when a warning may be due.
        finite = math.isfinite(glob)
        if not finite and not self._scaler:  # under 16-mixed the GradScaler skips inf steps by design
            bad = [f"{names[i]} ({g})" for i, g in enumerate(grad) if not math.isfinite(g)]
            self._warn(
                "nonfinite",
                f"non-finite gradients at step {step}: global norm {glob}; "
                f"layers: {', '.join(bad) or 'none of the weight layers (other parameters)'}",
            )
        if not finite or max(grad) > self.exploding_norm:
            big = [f"{names[i]} ({g:.3g})" for i, g in enumerate(grad) if math.isfinite(g) and g > self.exploding_norm]
        else:
            big = []
        if big:
            self._warn(
                "exploding",
                f"exploding gradients at step {step}: gradient norm > logging.exploding_norm="
                f"{self.exploding_norm:g} in {len(big)} layer(s): {_clip_list(big)}",
            )
        first, last = grad[0], grad[-1]
        if len(grad) > 1 and math.isfinite(first) and math.isfinite(last) and last > 0:
            ratio = first / last
            if ratio < self.vanishing_ratio:
                small = [
                    f"{names[i]} ({g / last:.2g})" for i, g in enumerate(grad[:-1]) if g / last < self.vanishing_ratio
                ]
                self._warn(
                    "vanishing",
                    f"vanishing gradients at step {step}: first layer {names[0]!r} has gradient norm "
                    f"{first:.3g}, {ratio:.2g} x that of the last layer {names[-1]!r} ({last:.3g}) "
                    f"(< logging.vanishing_ratio={self.vanishing_ratio:g}); layers below the threshold "
                    f"(ratio to the last): {_clip_list(small)}",
                )

    # ------------------------------------------------------------ TensorBoard

    def _tags(self, prefix: str) -> list[str]:
        key = (prefix, len(self.layer_names))
        if self._tag_cache.get(key, (None,))[0] != self.layer_names:
            width = max(2, len(str(len(self.layer_names) - 1)))  # zero-padded: sorts by depth
            tags = [f"{prefix}/{i:0{width}d}_{name}" for i, name in enumerate(self.layer_names)]
            self._tag_cache[key] = (list(self.layer_names), tags)
        return self._tag_cache[key][1]

    def _log_scalars(self, step: int) -> None:
        """All scalars of one log event as one Summary (one add_scalar call per tag costs ~30 us)."""
        grad = self._grad[-1]
        first, last = grad[0], grad[-1]
        ratio = first / last if last > 0 and math.isfinite(first) and math.isfinite(last) else math.nan
        log_ratio = math.log10(ratio) if ratio > 0 else math.nan
        tags = (*self._tags("grad_norm"), *RATIO_TAGS)
        values = [*grad, self._global[-1], ratio, log_ratio]
        if self.weight_norms and self._wnorm:
            tags += (*self._tags("weight_norm"), *self._tags("update_ratio"))
            values += self._wnorm[-1] + self._ratio[-1]
        if getattr(self._writer, "_get_file_writer", None) is None:  # tensorboardX or another writer
            for tag, v in zip(tags, values, strict=True):
                self._writer.add_scalar(tag, v, step)
            return
        self._unwritten.append((_scalar_summary(tags, values), step, time.time()))
        now = time.monotonic()
        # TensorBoard hands each event to its writer thread: ~0.12 ms of thread handoff per
        # event when they come one by one, ~0.02 ms in a burst. Events less than a second
        # apart go in bursts of 8 (under the writer's queue of 10); sparser ones at once.
        if len(self._unwritten) >= _EVENTS_PER_BURST or now - self._last_write >= 1.0:
            self._write_scalars()
            self._last_write = now

    def _write_scalars(self) -> None:
        if self._unwritten and self._writer is not None:
            file_writer = self._writer._get_file_writer()
            for summary, step, wall_time in self._unwritten:
                file_writer.add_summary(summary, step, wall_time)
        self._unwritten.clear()

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._writer is None or not self._steps or not trainer.is_global_zero:
            return
        due = len(self._steps) - self._heatmap_logs >= self.heatmap_every_n_logs
        now = time.monotonic()
        if due and now - self._last_heatmap >= self.heatmap_min_interval_s:
            self._last_heatmap = now
            self._write_heatmap(self._steps[-1])

    def _write_heatmap(self, step: int) -> None:
        self._heatmap_logs, self._heatmap_step = len(self._steps), step
        grad = np.asarray(self._grad, dtype=np.float64)  # (n_logs, n_layers)
        title = self.title or "gradient flow"
        if self.heatmap_range is not None:
            if self._live is None or self._live[0] != self.layer_names:
                self._live = (list(self.layer_names), _LiveHeatmap(self.layer_names, self.heatmap_range, title))
            rgb = self._live[1].update(self._steps, grad)
        else:  # a per-run colour range changes the colour bar: a fresh figure each time
            from matplotlib.figure import Figure

            n = len(self.layer_names)
            fig = Figure(figsize=(FIGURE_WIDTH_IN, _heatmap_height(n) + 1.6), dpi=FIGURE_DPI, layout="constrained")
            draw_heatmap(fig, fig.subplots(), self.layer_names, self._steps, grad, None, legend_always=True)
            fig.suptitle(title, fontsize=FONT_PT)
            rgb = render(fig)[..., :3]
        self._writer.add_image("gradient_flow/heatmap", rgb, step, dataformats="HWC")

    # ------------------------------------------------------------ the end

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._end(trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._pending = None  # the step may not have happened; drop its snapshot
        self._end(trainer)

    def _end(self, trainer: L.Trainer) -> None:
        if self._pending is not None:
            self._finish()
        self._write_scalars()
        self._snapshot = None  # free the weight copy
        if not self.enabled or not trainer.is_global_zero or not self._steps:
            return
        rgba = render(self.figure())  # (H, W, 4) uint8, drawn once for TensorBoard and the PNG
        if self._writer is not None:
            step = self._steps[-1]
            if self._heatmap_step != step:  # always one at the last logged step, however short the run
                self._write_heatmap(step)
            self._writer.add_image("gradient_flow/figure", rgba[..., :3], step, dataformats="HWC")
            self._writer.flush()
        if self.run_dir is not None:
            import matplotlib.image

            self.run_dir.mkdir(parents=True, exist_ok=True)
            path = self.run_dir / "gradient_flow.png"
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            matplotlib.image.imsave(tmp, rgba, format="png")
            os.replace(tmp, path)  # atomic: never a half-written PNG

    def figure(self) -> Any:
        """A matplotlib Figure: the layer x step heatmap above gradient norm vs depth.

        Stacked, FIGURE_WIDTH_IN wide with FONT_PT text, so it reads at TensorBoard's image width."""
        from matplotlib.figure import Figure

        h = self.history
        n = len(h.layer_names)
        fig = Figure(figsize=(FIGURE_WIDTH_IN, _heatmap_height(n) + 4.3), dpi=FIGURE_DPI, layout="constrained")
        ax1, ax2 = fig.subplots(2, 1, height_ratios=[_heatmap_height(n) + 0.3, 3.0])
        fig.suptitle(self.title or "gradient flow", fontsize=FONT_PT)
        draw_heatmap(fig, ax1, h.layer_names, h.steps, h.grad_norm.numpy(), self.heatmap_range)
        draw_depth(ax2, h.layer_names, h.steps, h.grad_norm.numpy())
        return fig

    # ------------------------------------------------------------ checkpointing

    def state_dict(self) -> dict[str, Any]:
        h = self.history
        return {
            "version": _STATE_VERSION,
            "layer_names": h.layer_names,
            "steps": h.steps,
            "grad_norm": h.grad_norm,
            "global_grad_norm": h.global_grad_norm,
            "weight_norm": h.weight_norm,
            "update_ratio": h.update_ratio,
            "warned": sorted(self._warned),
        }

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        names = list(state_dict.get("layer_names", []))
        if self.layer_names and names != self.layer_names:
            warnings.warn(
                "gradient-flow monitor: the checkpoint's layers differ from the model's; starting a fresh history",
                GradientFlowWarning,
                stacklevel=2,
            )
            return
        self.layer_names = names
        self._steps = [int(s) for s in state_dict["steps"]]
        self._grad = state_dict["grad_norm"].tolist()
        self._global = state_dict["global_grad_norm"].tolist()
        self._wnorm = state_dict["weight_norm"].tolist()
        self._ratio = state_dict["update_ratio"].tolist()
        self._warned = set(state_dict["warned"])
        self._pending = None


def _varint(n: int) -> bytes:
    out = bytearray()
    while n > 0x7F:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


@functools.lru_cache(maxsize=8)
def _summary_layout(tags: tuple[str, ...]) -> tuple[Any, struct.Struct, list[bytes]]:
    """The Summary class, and each scalar's protobuf bytes up to its value plus the struct packing them.

    `Summary {repeated Value value = 1}`, `Value {string tag = 1; float simple_value = 2}`: in wire
    format a scalar is 0x0A <len> (0x0A <len> <tag> 0x15 <float32 little-endian>).
    """
    from tensorboard.compat.proto.summary_pb2 import Summary

    prefixes = []
    for tag in tags:
        encoded = tag.encode()
        value_head = b"\x0a" + _varint(len(encoded)) + encoded + b"\x15"
        prefixes.append(b"\x0a" + _varint(len(value_head) + 4) + value_head)
    return Summary, struct.Struct("<" + "".join(f"{len(p)}sf" for p in prefixes)), prefixes


def _scalar_summary(tags: tuple[str, ...], values: list[float]) -> Any:
    """A TensorBoard Summary of `simple_value` scalars: packed by one struct call and parsed in C.

    The monitor builds one per log event; field by field it costs 20 us for 9 scalars, this 3 us."""
    summary, packer, prefixes = _summary_layout(tags)
    args: list[Any] = [None] * (2 * len(values))
    args[0::2], args[1::2] = prefixes, values
    try:
        return summary.FromString(packer.pack(*args))
    except OverflowError:  # a finite value beyond float32's range: protobuf stores it as inf
        return summary(value=[summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values, strict=True)])


def _log10(x: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        z = np.log10(x)
    z[np.isneginf(z)] = np.nan  # zero gradient: shown as a gap, not -inf
    return z


def _thin(n: int, most: int) -> list[int]:
    """At most `most` evenly spaced indices of range(n), always with the first and last."""
    if n <= most:
        return list(range(n))
    return sorted(set(np.linspace(0, n - 1, most).round().astype(int).tolist()))


def _clip_list(items: list[str], most: int = 8) -> str:
    if len(items) <= most:
        return ", ".join(items)
    return ", ".join(items[:most]) + f", ... ({len(items) - most} more)"


# ---------------------------------------------------------------- drawing (also used by deepnets.compare)


def describe_model(model: Any) -> str:
    """A short architecture label from a `model:` section, e.g. "mlp 20x64 sigmoid + bn"."""
    if not isinstance(model, dict) or "arch" not in model:
        return ""
    m, arch = model, str(model["arch"])
    if ":" in arch:  # a user's module: its class, file and kwargs
        target, _, name = arch.rpartition(":")
        kwargs = m.get("kwargs") or {}
        shown = " ".join(f"{k}={v}" for k, v in kwargs.items()) if isinstance(kwargs, dict) else ""
        return " ".join(p for p in (f"{name} ({Path(target).name})", shown) if p)
    if m.get("preset"):
        parts = [str(m["preset"])]
    elif arch in ("mlp", "skipnet", "resmlp"):
        width = m.get("width")
        parts = [f"{arch} {m.get('depth')}x{width if width is not None else 'default'}"]
    elif arch == "densemlp":
        parts = [f"densemlp {m.get('num_blocks')}x{m.get('layers_per_block')} growth {m.get('growth_rate')}"]
    else:
        depths = m.get("stage_depths")
        parts = [f"{arch} {m.get('block', '') if arch == 'resnet' else ''} {depths or ''}".replace("  ", " ").strip()]
    if arch not in ("densenet", "resnet") or m.get("activation", "relu") != "relu":
        parts.append(str(m.get("activation", "relu")))
    if m.get("batch_norm"):
        parts.append("+ bn")
    if arch == "skipnet":
        parts.append(f"(skip from {m.get('skip_from')})")
    if m.get("preact"):
        parts.append("pre-act")
    if m.get("zero_init_residual"):
        parts.append("zero-init residual")
    return " ".join(parts)


def _default_title(run_dir: Path | None, hparams: Any) -> str:
    run = f"{run_dir.parent.name}/{run_dir.name}" if run_dir is not None else str(hparams.get("name", "") or "")
    arch = describe_model(hparams.get("model")) if hasattr(hparams, "get") else ""
    return "\n".join(p for p in (run, arch) if p) or "gradient flow"  # two lines: the card is narrow


def _heatmap_height(n_layers: int) -> float:
    """Inches for a heatmap of `n_layers` rows: room for its (thinned) layer labels."""
    return min(5.0, max(2.0, 0.14 * n_layers + 0.8))


def _short(name: str, most: int = 13) -> str:
    return name if len(name) <= most else "…" + name[-(most - 1) :]


def render(fig: Any) -> np.ndarray:
    """(H, W, 4) uint8 pixels of a matplotlib Figure (Agg, no pyplot state)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)
    canvas.draw()
    return np.asarray(canvas.buffer_rgba()).copy()


_ZERO_STYLE = {"facecolor": "white", "edgecolor": "0.35", "hatch": "////"}
_NONFINITE_STYLE = {"facecolor": "red", "edgecolor": "red"}


def _heatmap_data(
    steps: list[int], grad: np.ndarray, vrange: tuple[float, float] | None
) -> tuple[np.ndarray, np.ndarray, tuple[float, float, float, float], float, float]:
    """(g (L, T) norms, z masked log10, extent, vmin, vmax) of a heatmap; long histories subsampled."""
    g = np.asarray(grad, dtype=np.float64).T  # (L, T)
    t_idx = np.arange(g.shape[1])
    if g.shape[1] > _MAX_HEATMAP_COLUMNS:
        t_idx = np.linspace(0, g.shape[1] - 1, _MAX_HEATMAP_COLUMNS).round().astype(int)
        g = g[:, t_idx]
    n, t = g.shape
    z = _log10(g.copy())
    finite = np.isfinite(z)
    if vrange is not None:
        vmin, vmax = vrange
    elif finite.any():
        vmin, vmax = float(z[finite].min()), float(z[finite].max())
        vmin, vmax = (vmin - 0.5, vmax + 0.5) if vmin == vmax else (vmin, vmax)
    else:
        vmin, vmax = 0.0, 1.0
    s = [steps[i] for i in t_idx]
    half = (s[-1] - s[0]) / (2 * (t - 1)) if t > 1 else 0.5
    extent = (s[0] - half, s[-1] + half, n - 0.5, -0.5)  # cell j centred on s[j]
    return g, np.ma.masked_invalid(z), extent, vmin, vmax


def _cell_collections(g: np.ndarray, extent: tuple[float, float, float, float]) -> list[tuple[Any, int, str]]:
    """(PatchCollection, cell count, label) for the exactly-zero (hatched) and non-finite (red) cells."""
    from matplotlib.collections import PatchCollection
    from matplotlib.patches import Rectangle

    n, t = g.shape
    x0, cw = extent[0], (extent[1] - extent[0]) / t
    out = []
    for mask, style, label in ((g == 0, _ZERO_STYLE, "exactly 0"), (~np.isfinite(g), _NONFINITE_STYLE, "non-finite")):
        if not mask.any():
            continue
        rects = []
        for row in range(n):  # one rectangle per run of consecutive cells
            cols = np.flatnonzero(mask[row])
            if cols.size == 0:
                continue
            breaks = np.flatnonzero(np.diff(cols) > 1)
            for a, b in zip(np.r_[cols[0], cols[breaks + 1]], np.r_[cols[breaks], cols[-1]], strict=True):
                rects.append(Rectangle((x0 + a * cw, row - 0.5), (b - a + 1) * cw, 1.0))
        out.append((PatchCollection(rects, linewidth=0.0, match_original=False, **style), int(mask.sum()), label))
    return out


def draw_heatmap(
    fig: Any,
    ax: Any,
    names: list[str],
    steps: list[int],
    grad: np.ndarray,
    vrange: tuple[float, float] | None,
    legend_always: bool = False,
) -> tuple[Any, list[Any]]:
    """Layer x step heatmap of log10 ||dL/dW|| on `ax`: grad is (n_logs, n_layers).

    Fixed colour range `vrange` (log10; values outside clip to the ends), or the data's own when None.
    Exact zeros are hatched, non-finite norms red, each with a legend entry when present (always,
    without counts, with `legend_always`). Returns the image and the cell collections."""
    from matplotlib.patches import Patch
    from matplotlib.ticker import MaxNLocator

    g, z, extent, vmin, vmax = _heatmap_data(steps, grad, vrange)
    n = g.shape[0]
    im = ax.imshow(z, aspect="auto", interpolation="nearest", cmap="viridis", vmin=vmin, vmax=vmax, extent=extent)
    ax.set_facecolor("white")
    # on top, horizontal: at TensorBoard's image width every column counts
    bar = fig.colorbar(im, ax=ax, location="top", extend="both" if vrange is not None else "neither", aspect=30)
    bar.ax.tick_params(labelsize=FONT_PT - 1)
    fixed = f"fixed {vmin:g}..{vmax:g}" if vrange is not None else "this run's range"
    bar.set_label(f"log10 ||dL/dW||, {fixed}", fontsize=FONT_PT - 1)
    cells = _cell_collections(g, extent)
    for collection, _, _ in cells:
        ax.add_collection(collection)
    if legend_always:
        handles = [Patch(label="exactly 0", **_ZERO_STYLE), Patch(label="non-finite", **_NONFINITE_STYLE)]
    else:
        styles = {"exactly 0": _ZERO_STYLE, "non-finite": _NONFINITE_STYLE}
        handles = [Patch(label=f"{label} ({count} cells)", **styles[label]) for _, count, label in cells]
    if handles:
        ax.legend(  # below the step axis: the data stays uncovered
            handles=handles,
            loc="upper center",
            bbox_to_anchor=(0.5, -0.3),
            ncols=len(handles),
            fontsize=FONT_PT - 1,
            frameon=False,
            borderaxespad=0.1,
            handlelength=1.5,
        )
    height_pt = ax.get_position().height * fig.get_figheight() * 72
    ticks = _thin(n, max(2, int(height_pt // (FONT_PT * 1.5))))
    width = len(str(n - 1))
    ax.set_yticks(ticks, [f"{i:0{width}d} {_short(names[i])}" for i in ticks], fontsize=FONT_PT - 1)
    ax.tick_params(axis="x", labelsize=FONT_PT - 1)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=6, integer=True))
    ax.set_xlabel("optimizer step", fontsize=FONT_PT - 1)
    ax.set_ylabel("layer (input on top)", fontsize=FONT_PT - 1)
    return im, [c for c, _, _ in cells]


class _LiveHeatmap:
    """The heatmap TensorBoard gets during training, redrawn by blitting.

    The frame (layer labels, colour bar, titles, legend) is drawn once; each update restores it
    and redraws only the image, the zero/non-finite cells and the step axis: ~10x cheaper than a
    fresh figure (~0.4 s on a busy 2-core box). Needs a fixed colour range (a per-run range
    changes the colour bar: `GradientFlowMonitor` then draws a fresh figure)."""

    def __init__(self, names: list[str], vrange: tuple[float, float], title: str) -> None:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure

        n = len(names)
        self.fig = Figure(figsize=(FIGURE_WIDTH_IN, _heatmap_height(n) + 1.6), dpi=FIGURE_DPI, layout="constrained")
        self.canvas = FigureCanvasAgg(self.fig)
        self.ax = self.fig.subplots()
        self.fig.suptitle(title, fontsize=FONT_PT)
        ones = np.ones((2, n))
        self.im, _ = draw_heatmap(self.fig, self.ax, names, [0, 1], ones, vrange, legend_always=True)
        self.canvas.draw()  # the layout, once
        self.fig.set_layout_engine("none")
        self.vrange = vrange
        self.im.set_visible(False)
        self.ax.xaxis.set_visible(False)
        self.canvas.draw()
        self.background = self.canvas.copy_from_bbox(self.fig.bbox)
        self.im.set_visible(True)
        self.ax.xaxis.set_visible(True)
        self.cells: list[Any] = []

    def update(self, steps: list[int], grad: np.ndarray) -> np.ndarray:
        """(H, W, 3) uint8 pixels of the heatmap of `grad` (n_logs, n_layers) at `steps`."""
        g, z, extent, _, _ = _heatmap_data(steps, grad, self.vrange)
        self.im.set_data(z)
        self.im.set_extent(extent)
        self.ax.set_xlim(extent[0], extent[1])
        for c in self.cells:
            c.remove()
        self.cells = [c for c, _, _ in _cell_collections(g, extent)]
        for c in self.cells:
            self.ax.add_collection(c)
        self.canvas.restore_region(self.background)
        for artist in (self.im, *self.cells, self.ax.xaxis, *self.ax.spines.values()):
            self.ax.draw_artist(artist)
        return np.asarray(self.canvas.buffer_rgba())[..., :3].copy()


def first_nonzero_row(grad: np.ndarray) -> int:
    """The first log event at which every layer's gradient norm is finite and non-zero (else 0).

    With zero-initialised residual branches every branch's gradient is exactly 0 at step 0:
    a norm-vs-depth line from there would fall off the log axis."""
    ok = np.flatnonzero(np.all(np.isfinite(grad) & (grad > 0), axis=1))
    return int(ok[0]) if ok.size else 0


def draw_depth(ax: Any, names: list[str], steps: list[int], grad: np.ndarray) -> None:
    """Gradient norm vs depth (log y) at the first non-zero and the last logged step."""
    from matplotlib.ticker import MaxNLocator

    g = np.asarray(grad, dtype=np.float64)  # (T, L)
    n = g.shape[1]
    first, last = first_nonzero_row(g), g.shape[0] - 1
    rows = [(first, "o-"), (last, "s-")] if last != first else [(first, "o-")]
    for row, style in rows:
        y = g[row].copy()
        zeros = int((y == 0).sum())
        y[~(np.isfinite(y) & (y > 0))] = np.nan
        label = f"step {steps[row]}"
        if row == first and first > 0:
            label += " (first non-zero)"
        if zeros:
            label += f"; {zeros} layer(s) exactly 0, not drawn"
        ax.semilogy(np.arange(n), y, style, ms=3, label=label)
    ratio = lambda r: g[r, 0] / g[r, -1] if g[r, -1] > 0 else math.nan  # noqa: E731
    ax.set_title(f"vs depth; first/last {ratio(first):.2g} -> {ratio(last):.2g}", fontsize=FONT_PT - 1)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))  # evenly spaced, never crowded
    ax.set_xlim(-0.5, n - 0.5)
    ax.tick_params(axis="x", labelsize=FONT_PT - 1)
    ax.tick_params(axis="y", labelsize=FONT_PT - 1)
    ax.set_xlabel(f"layer (0 = {_short(names[0])} ... {n - 1} = {_short(names[-1])})", fontsize=FONT_PT - 1)
    ax.set_ylabel("||dL/dW||", fontsize=FONT_PT - 1)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=FONT_PT - 1, loc="upper center", bbox_to_anchor=(0.5, -0.24), frameon=False)
