"""The model zoo: `build_model(model_cfg, input_shape, num_classes)` for every `model.arch`.

Presets: `model.preset` fills in the keys of `PRESETS[preset]`, but a key
the config sets explicitly wins. "Explicitly" means "differs from the
dataclass default" (e.g. `block: basic` with preset resnet50 cannot be told
apart from leaving `block` out, so resnet50 keeps its bottlenecks). Presets
never set `stem`: `stem: imagenet` gives torchvision's exact architectures,
the default `stem: cifar` the usual small-image variant.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from deepnets.config import ModelConfig, build_section
from deepnets.errors import UserError
from deepnets.layers import get_activation, get_norm
from deepnets.models.densemlp import DenseMLP
from deepnets.models.densenet import DenseNet
from deepnets.models.mlp import MLP
from deepnets.models.resmlp import ResMLP
from deepnets.models.resnet import BLOCKS, ResNet
from deepnets.models.skipnet import SkipNet

__all__ = ["ARCHS", "PRESETS", "apply_preset", "build_model", "depth_ordered_layers", "init_weights"]

PRESETS: dict[str, dict[str, Any]] = {
    # He et al. 2016a, Table 1 (ImageNet); widths 64-128-256-512
    "resnet18": {"arch": "resnet", "block": "basic", "stage_depths": [2, 2, 2, 2], "width": 64},
    "resnet34": {"arch": "resnet", "block": "basic", "stage_depths": [3, 4, 6, 3], "width": 64},
    "resnet50": {"arch": "resnet", "block": "bottleneck", "stage_depths": [3, 4, 6, 3], "width": 64},
    # He et al. 2016a, Sec. 4.2 (CIFAR): 6n + 2 layers, widths 16-32-64
    "resnet20": {"arch": "resnet", "block": "basic", "stage_depths": [3, 3, 3], "width": 16},
    "resnet56": {"arch": "resnet", "block": "basic", "stage_depths": [9, 9, 9], "width": 16},
    # Huang et al. 2017, Table 1: k = 32, DenseNet-BC
    "densenet121": {
        "arch": "densenet",
        "growth_rate": 32,
        "stage_depths": [6, 12, 24, 16],
        "bn_size": 4,
        "compression": 0.5,
        "num_init_features": 64,
    },
}

FC_ARCHS = ("mlp", "skipnet", "resmlp", "densemlp")


def apply_preset(cfg: ModelConfig) -> ModelConfig:
    """`cfg` with its preset's values filled into every key still at its dataclass default."""
    if cfg.preset is None:
        return cfg
    values = PRESETS[cfg.preset]
    default = ModelConfig()
    if cfg.arch not in (default.arch, values["arch"]):
        raise UserError(f"model.preset: {cfg.preset} is a {values['arch']}, but model.arch is {cfg.arch}")
    unset = {k: v for k, v in values.items() if getattr(cfg, k) == getattr(default, k)}
    return dataclasses.replace(cfg, **unset)


# ---------------------------------------------------------------- helpers


def _scale(channels: int, cfg: ModelConfig) -> int:
    return max(1, round(channels * cfg.width_multiplier))


def _widths(cfg: ModelConfig, default: int) -> list[int]:
    if isinstance(cfg.width, list):
        if len(cfg.width) != cfg.depth:
            raise UserError(f"model.width: {len(cfg.width)} widths given for model.depth={cfg.depth}")
        return [_scale(w, cfg) for w in cfg.width]
    return [_scale(cfg.width or default, cfg)] * cfg.depth


def _width(cfg: ModelConfig, default: int) -> int:
    if isinstance(cfg.width, list):
        raise UserError(f"model.width: {cfg.arch} takes one width (an int), got the list {cfg.width}")
    return _scale(cfg.width or default, cfg)


def _fc_norm(cfg: ModelConfig) -> Callable[..., nn.Module] | None:
    return get_norm("batch_norm1d") if cfg.batch_norm else None


def _image_channels(cfg: ModelConfig, input_shape: tuple[int, ...]) -> int:
    if len(input_shape) != 3:
        raise UserError(
            f"model.arch: {cfg.arch} needs image inputs (C, H, W), but the data gives shape "
            f"{input_shape}; use one of {', '.join(FC_ARCHS)}"
        )
    return input_shape[0]


def _stage_depths(cfg: ModelConfig, default: list[int]) -> list[int]:
    depths = default if cfg.stage_depths is None else cfg.stage_depths
    if not depths or min(depths) < 1:
        raise UserError(f"model.stage_depths: {cfg.arch} needs a non-empty list of ints >= 1, got {depths}")
    return depths


# ---------------------------------------------------------------- builders


def _fc_layers(cfg: ModelConfig) -> dict[str, Any]:
    """The keyword arguments every fully connected family takes from the config."""
    return {
        "activation_layer": get_activation(cfg.activation),
        "norm_layer": _fc_norm(cfg),
        "dropout": cfg.dropout,
        "bias": cfg.bias,
    }


def _mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return MLP(
        math.prod(input_shape),
        _widths(cfg, 256),
        num_classes,
        **_fc_layers(cfg),
        checkpointing=cfg.checkpointing,
    )


def _skipnet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return SkipNet(
        math.prod(input_shape),
        _widths(cfg, 256),
        num_classes,
        **_fc_layers(cfg),
        skip_from=cfg.skip_from,
        checkpointing=cfg.checkpointing,
    )


def _resmlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    return ResMLP(
        math.prod(input_shape),
        _width(cfg, 256),
        cfg.depth,
        num_classes,
        **_fc_layers(cfg),
        preact=cfg.preact,
        checkpointing=cfg.checkpointing,
    )


def _densemlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    growth_rate = _scale(cfg.growth_rate or 32, cfg)
    return DenseMLP(
        math.prod(input_shape),
        _width(cfg, 2 * (cfg.growth_rate or 32)),  # DenseNet's stem: 2k features
        growth_rate,
        cfg.layers_per_block,
        cfg.num_blocks,
        num_classes,
        **_fc_layers(cfg),
        compression=cfg.compression,
        checkpointing=cfg.checkpointing,
    )


def _resnet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    # Conv nets always use BatchNorm: `model.batch_norm` is the MLP family's toggle.
    return ResNet(
        BLOCKS[(cfg.block, cfg.preact)],
        _stage_depths(cfg, [2, 2, 2, 2]),
        num_classes,
        in_channels=_image_channels(cfg, input_shape),
        width=_width(cfg, 64),
        stem=cfg.stem,
        norm_layer=get_norm("batch_norm2d"),
        activation_layer=get_activation(cfg.activation),
        dropout=cfg.dropout,
        bias=cfg.bias,
        checkpointing=cfg.checkpointing,
    )


def _densenet(cfg: ModelConfig, input_shape: tuple[int, ...], num_classes: int) -> nn.Module:
    if cfg.width is not None:
        raise UserError(
            "model.width: densenet has no width; set model.growth_rate, model.num_init_features "
            "or model.width_multiplier"
        )
    growth_rate = cfg.growth_rate or 32
    return DenseNet(
        _stage_depths(cfg, [6, 12, 24, 16]),
        num_classes,
        in_channels=_image_channels(cfg, input_shape),
        growth_rate=_scale(growth_rate, cfg),
        num_init_features=_scale(cfg.num_init_features or 2 * growth_rate, cfg),
        bn_size=cfg.bn_size,
        compression=cfg.compression,
        stem=cfg.stem,
        norm_layer=get_norm("batch_norm2d"),
        activation_layer=get_activation(cfg.activation),
        dropout=cfg.dropout,
        bias=cfg.bias,
        checkpointing=cfg.checkpointing,
    )


ARCHS: dict[str, Callable[[ModelConfig, tuple[int, ...], int], nn.Module]] = {
    "mlp": _mlp,
    "skipnet": _skipnet,
    "resmlp": _resmlp,
    "densemlp": _densemlp,
    "resnet": _resnet,
    "densenet": _densenet,
}


def build_model(
    model_cfg: Mapping[str, Any] | ModelConfig, input_shape: tuple[int, ...], num_classes: int
) -> nn.Module:
    """Build `model_cfg['arch']` for inputs of `input_shape` (no batch dim) and `num_classes` outputs.

    A mapping is validated like the `model:` section of a config file.
    """
    if not isinstance(model_cfg, ModelConfig):
        model_cfg = build_section(ModelConfig, model_cfg, "model.")
    cfg = apply_preset(model_cfg)
    model = ARCHS[cfg.arch](cfg, tuple(input_shape), num_classes)
    init_weights(model, cfg)
    return model


def init_weights(model: nn.Module, cfg: ModelConfig) -> None:
    """Apply `model.init` to every Linear/Conv weight, then `model.zero_init_residual`.

    "default" keeps each architecture's own init (PyTorch's for the MLP
    family, torchvision's He init for ResNet/DenseNet). Norm layers keep
    weight 1, bias 0.
    """
    if cfg.init != "default":
        _init_linear_and_conv(model, cfg)
    if cfg.zero_init_residual:
        for m in model.modules():
            if hasattr(m, "zero_init_last"):
                m.zero_init_last()


def _init_linear_and_conv(model: nn.Module, cfg: ModelConfig) -> None:
    nonlinearity = {"relu": "relu", "leaky_relu": "leaky_relu", "tanh": "tanh", "sigmoid": "sigmoid"}.get(
        cfg.activation, "linear"
    )
    for m in model.modules():
        if not isinstance(m, nn.Linear | nn.Conv1d | nn.Conv2d):
            continue
        w = m.weight
        with torch.no_grad():
            if cfg.init == "kaiming":
                nn.init.kaiming_normal_(w, nonlinearity=nonlinearity)
                w.mul_(cfg.init_gain)
            elif cfg.init == "xavier":
                nn.init.xavier_normal_(w, gain=cfg.init_gain * nn.init.calculate_gain(nonlinearity))
            elif cfg.init == "orthogonal":
                nn.init.orthogonal_(w, gain=cfg.init_gain * nn.init.calculate_gain(nonlinearity))
            elif cfg.init == "normal":
                nn.init.normal_(w, 0.0, cfg.init_std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def depth_ordered_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every weight matrix / conv kernel, in depth order.

    Every zoo model registers its modules in forward order, so registration
    order is depth order; the name is the module path (e.g. `layers.0.0`,
    `head`). The gradient monitor, per-layer decay and L1 rely on this.
    """
    out = []
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() >= 2:
            out.append((name.removesuffix(".weight"), p))
    return out
