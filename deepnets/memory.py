"""Will the model fit? A lower bound on a run's memory, measured on the meta device before anything is allocated.

`model.width=100000000` or `model.depth=100000` used to allocate for seconds (or minutes) and then crash;
`check_fits(cfg)` answers in milliseconds: parameters are counted on a model built on `torch.device("meta")`
(shapes, no storage), activations are the tensors autograd saves for backward in a meta-device forward of one
batch. Both are lower bounds (no allocator slack, no backward temporaries, no data), so a run it refuses
cannot fit.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from deepnets.config import Config
from deepnets.errors import UserError

GiB = 1 << 30
# Above this many layers the model is measured at depths 1, 2, 3 and extrapolated: building 100000 layers in
# Python takes a minute even on the meta device, and every zoo model's size is a polynomial of degree <= 2 in
# `depth` (linear for mlp/skipnet/resmlp, quadratic for densemlp's growing concatenation).
EXTRAPOLATE_ABOVE = 256
# optimizer state per parameter, in parameter-sized tensors (momentum buffers, Adam's two moments)
_OPTIMIZER_STATES = {"sgd": 1, "rmsprop": 1, "adagrad": 1, "adam": 2, "adamw": 2}


def input_spec(cfg: Config) -> tuple[tuple[int, ...], int]:
    """(input shape, classes) of `cfg`'s data, known without reading a file."""
    from deepnets.data import InMemoryDataModule

    dm = InMemoryDataModule(cfg.data, cfg.seed, task=cfg.task)
    return dm.input_shape, dm.num_outputs


def meta_model(model_cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    """`build_model` on the meta device: every parameter has its shape and no storage."""
    from deepnets.models import build_model

    with torch.random.fork_rng(devices=[]), torch.device("meta"):  # leaves the seeded CPU generator as it was
        return build_model(model_cfg, input_shape, num_classes)


def meta_model_for(cfg: Config) -> nn.Module:
    """The model of `cfg` on the meta device (for comparing shapes with a checkpoint's)."""
    return meta_model(cfg.to_dict()["model"], *input_spec(cfg))


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def _saved_activation_bytes(model: nn.Module, batch: torch.Tensor) -> int:
    """Bytes of the tensors autograd keeps for backward in one training forward, parameters excluded."""
    params = {id(p) for p in model.parameters()}
    seen: set[int] = set()
    keep: list[torch.Tensor] = []  # hold them, so ids stay unique during the forward
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        base = t._base if t._base is not None else t  # a view (weight.t(), x.flatten(1)) costs its base
        if id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            keep.append(base)
            total += base.numel() * base.element_size()
        return t

    model.train()
    with torch.random.fork_rng(devices=[]), torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, _same):
        model(batch)
    return total


def _measure(
    model_cfg: Mapping[str, Any], input_shape: tuple[int, ...], num_classes: int, batch: int
) -> tuple[int, int]:
    """(parameters, activation bytes at `batch`) of the model, on the meta device."""
    model = meta_model(model_cfg, input_shape, num_classes)
    n_params = sum(p.numel() for p in model.parameters())
    return n_params, _saved_activation_bytes(model, torch.empty(batch, *input_shape, device="meta"))


def estimate(cfg: Config, input_shape: tuple[int, ...], num_classes: int) -> tuple[int, int]:
    """(parameters, activation bytes of one training batch): exact on the meta model, or extrapolated in depth."""
    model_cfg = cfg.to_dict()["model"]
    batch = cfg.data.batch_size
    depth = model_cfg.get("depth")
    if isinstance(depth, int) and depth > EXTRAPOLATE_ABOVE and not isinstance(model_cfg.get("width"), list):
        # f(d) = f1 + (d-1) D1 + (d-1)(d-2)/2 D2: Newton's forward differences, exact up to degree 2
        f = [_measure({**model_cfg, "depth": d}, input_shape, num_classes, batch) for d in (1, 2, 3)]
        k = depth - 1
        return tuple(  # type: ignore[return-value]
            max(0, f[0][i] + k * (f[1][i] - f[0][i]) + k * (k - 1) // 2 * (f[2][i] - 2 * f[1][i] + f[0][i]))
            for i in range(2)
        )
    return _measure(model_cfg, input_shape, num_classes, batch)


def run_bytes(cfg: Config, n_params: int, activations: int) -> int:
    """Parameters + gradients + optimizer state (fp32, or fp64 under precision 64) + one batch's activations."""
    o = cfg.optim
    states = _OPTIMIZER_STATES.get(o.name, 0) if (o.name != "sgd" or o.momentum > 0) else 0
    width = 8 if cfg.trainer.precision == "64" else 4
    act = activations * (2 if cfg.trainer.precision == "64" else 1)
    if cfg.trainer.precision in ("bf16-mixed", "16-mixed"):
        act //= 2  # autocast keeps most activations in 16 bits; halving keeps this a lower bound
    return n_params * width * (2 + states) + act


def _device(cfg: Config) -> torch.device | None:
    """The device this process will train on, as far as it is known before Lightning picks it."""
    acc = cfg.trainer.accelerator
    if acc == "cpu" or (acc == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if acc in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        rank = int(os.environ.get("LOCAL_RANK", "0"))
        ids = cfg.trainer.devices
        return torch.device("cuda", ids[rank] if isinstance(ids, list) and rank < len(ids) else rank)
    return None  # mps, or no CUDA (which the config check reports): not measured


def _meminfo_available() -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _cgroup_available() -> int | None:
    """What a container's memory limit leaves (cgroup v2, then v1): MemAvailable shows the whole host."""
    for limit, used in (
        ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
        ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes"),
    ):
        try:
            cap = Path(limit).read_text().strip()
            if cap != "max" and int(cap) < 1 << 60:
                return max(0, int(cap) - int(Path(used).read_text()))
        except (OSError, ValueError):
            continue
    return None


def available_bytes(device: torch.device) -> int | None:
    """Free memory on `device`: CUDA's free bytes, or the CPU's MemAvailable (within a cgroup limit)."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    known = [b for b in (_meminfo_available(), _cgroup_available()) if b is not None]
    return min(known) if known else None


def _size_keys(cfg: Config) -> str:
    from deepnets.models import FC_ARCHS

    m = cfg.model
    if ":" in m.arch:  # a user's module: its own settings
        return f"model.arch={m.arch}, model.kwargs={m.kwargs}"
    keys = ("width", "depth") if m.arch in FC_ARCHS else ("width", "stage_depths", "growth_rate")
    return ", ".join(f"model.{k}={getattr(m, k)}" for k in keys if getattr(m, k, None) is not None)


def _gib(b: float) -> str:
    g = b / GiB
    return f"{g:,.0f}" if g >= 100 else f"{g:.3g}"


def check_fits(cfg: Config) -> None:
    """Fail with one line, before anything is built or written, when the model cannot fit on its device."""
    device = _device(cfg)
    free = available_bytes(device) if device is not None else None
    if free is None:
        return
    try:
        n_params, activations = estimate(cfg, *input_spec(cfg))
    except UserError:  # a bad model config: the same line the real build would give, only sooner
        raise
    except Exception:  # an op without a meta kernel (a user's own module, say): no estimate, no check
        return
    need = run_bytes(cfg, n_params, activations)
    if device.type == "cpu" and isinstance(cfg.trainer.devices, int) and cfg.trainer.devices > 1:
        need *= cfg.trainer.devices  # CPU DDP: one process, with its own copy, per device
    if need > free:
        raise UserError(
            f"model: ~{_gib(need)} GiB of parameters and activations at data.batch_size={cfg.data.batch_size}, "
            f"{_gib(free)} GiB available ({_size_keys(cfg)}; {n_params:,} parameters)"
        )


# Beyond the decoded images themselves: the encoded bytes of one decode chunk, one image being resized in
# float32, and the interpreter + torch (~400 MiB resident after `import torch, lightning`), with 10% slack.
DECODE_HEADROOM = 512 << 20


def check_decode_fits(n: int, shape: tuple[int, ...], where: object) -> None:
    """Fail with one line, before decoding, when `n` uint8 images of `shape` (C, H, W) cannot be held in RAM."""
    need = int(n * math.prod(shape) * 1.1) + DECODE_HEADROOM
    free = available_bytes(torch.device("cpu"))
    if free is not None and need > free:
        c, h, w = shape
        raise UserError(
            f"data.path={where}: {n:,} images of {c}x{h}x{w} need ~{_gib(need)} GiB of memory as uint8 (with "
            f"headroom), {_gib(free)} GiB available; lower data.image_size or use fewer images"
        )
