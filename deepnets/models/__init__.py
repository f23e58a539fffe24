"""The model zoo: `build_model(model_cfg, input_shape, num_outputs)` for every `model.arch`.

`ARCHITECTURES` maps each built-in name to its builder; config validation reads it (did-you-mean on a
miss). A user's own `nn.Module` joins it under its import path (`path/to/file.py:ClassName` or
`package.module:ClassName`, checked when the config loads, see `check_model_config`): it is built with
`model.kwargs` plus `input_shape` and `num_outputs` (or `num_classes`) where its signature takes them.
The fields only the built-in families read (depth, width, activation, ...) are an error on such a model,
never silently ignored.

Presets: `model.preset` fills in the keys of `PRESETS[preset]`, but a key
the config sets explicitly wins. "Explicitly" means "differs from the
dataclass default" (e.g. `block: basic` with preset resnet50 cannot be told
apart from leaving `block` out, so resnet50 keeps its bottlenecks). Presets
never set `stem`: `stem: imagenet` gives torchvision's exact architectures,
the default `stem: cifar` the usual small-image variant.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import inspect
import math
import typing
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from deepnets.config import ModelConfig, build_section
from deepnets.errors import UserError
from deepnets.imports import absolute_spec, is_import_path, resolve_import, user_frame
from deepnets.layers import get_activation, get_norm
from deepnets.models.densemlp import DenseMLP
from deepnets.models.densenet import DenseNet
from deepnets.models.mlp import MLP
from deepnets.models.resmlp import ResMLP
from deepnets.models.resnet import BLOCKS, ResNet
from deepnets.models.skipnet import SkipNet

__all__ = [
    "ARCHITECTURES",
    "ARCHS",
    "PRESETS",
    "apply_preset",
    "build_model",
    "check_arch_name",
    "check_model_config",
    "depth_ordered_layers",
    "has_forward_order",
    "init_weights",
    "record_forward_order",
    "sample_batch",
]

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


Builder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]

ARCHITECTURES: dict[str, Builder] = {
    "mlp": _mlp,
    "skipnet": _skipnet,
    "resmlp": _resmlp,
    "densemlp": _densemlp,
    "resnet": _resnet,
    "densenet": _densenet,
}
BUILTIN_ARCHS = tuple(ARCHITECTURES)  # user import paths join ARCHITECTURES; these are the package's own
ARCHS = ARCHITECTURES  # the table's former name

# ModelConfig fields that only the built-in families read: on a user's module each is an error when set
# (it would silently do nothing). Those that do apply to any module: arch, kwargs, init / init_std /
# init_gain (every Linear/Conv weight), zero_init_residual (modules with a `zero_init_last`), channels_last.
BUILTIN_ONLY = (
    "preset", "depth", "width", "activation", "bias", "batch_norm", "dropout", "skip_from", "preact",
    "growth_rate", "layers_per_block", "num_blocks", "block", "stage_depths", "width_multiplier", "stem",
    "bn_size", "compression", "num_init_features", "checkpointing",
)  # fmt: skip
# constructor arguments deepnets fills in from the data (num_classes: a synonym of num_outputs)
FROM_DATA = ("input_shape", "num_outputs", "num_classes")
SAMPLE_BATCH = 2  # the sample batch a user's module is checked and traced on (BatchNorm needs > 1)


def check_arch_name(value: str, key: str = "model.arch") -> str:
    """`value` if it names a built-in architecture; an import path made absolute (what config.yaml records)."""
    if value in BUILTIN_ARCHS:
        return value
    if is_import_path(value):
        return absolute_spec(value)
    near = difflib.get_close_matches(value, BUILTIN_ARCHS, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]}?" if near else ""
    raise UserError(
        f"{key}: expected one of {', '.join(BUILTIN_ARCHS)}, got {value!r}{hint} (or your own nn.Module: "
        "path/to/file.py:ClassName or package.module:ClassName)"
    )


def check_model_config(cfg: ModelConfig) -> None:
    """Checks of the `model:` section that span its keys (ModelConfig calls this as it is built).

    A built-in arch takes no kwargs. An import path is resolved now (its file runs), must name an
    nn.Module subclass whose signature takes the kwargs, and then joins ARCHITECTURES.
    """
    if cfg.arch in BUILTIN_ARCHS:
        if cfg.kwargs:
            k = next(iter(cfg.kwargs))
            raise UserError(
                f"model.kwargs.{k}: model.kwargs is for a model.arch import path; {cfg.arch} takes its settings "
                "as model.<key> (see the README's config table)"
            )
        return
    default = ModelConfig()
    for name in BUILTIN_ONLY:
        if getattr(cfg, name) != getattr(default, name):
            raise UserError(
                f"model.{name}: applies to the built-in architectures only, not to model.arch={cfg.arch}; "
                "pass your module's settings in model.kwargs"
            )
    cls = resolve_import(cfg.arch, "model.arch", nn.Module)
    _check_kwargs(cls, cfg.kwargs)
    ARCHITECTURES[cfg.arch] = _user_builder(cls)


def _signature(cls: type) -> inspect.Signature | None:
    try:
        return inspect.signature(cls)
    except (TypeError, ValueError):  # a class whose signature Python cannot tell (C extensions)
        return None


def _check_kwargs(cls: type, kwargs: Mapping[str, Any]) -> None:
    """Every key of `model.kwargs` a parameter of `cls`, every required parameter given, simple types right."""
    for k in kwargs:
        if k in FROM_DATA:
            raise UserError(f"model.kwargs.{k}: deepnets passes {k} from the data; remove it from model.kwargs")
    sig = _signature(cls)
    if sig is None:
        return
    params = sig.parameters
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    for k in kwargs:
        if k not in named and not takes_any:
            near = difflib.get_close_matches(k, named, n=1, cutoff=0.5)
            hint = f"; did you mean {near[0]}?" if near else f" (it takes: {', '.join(named) or 'no arguments'})"
            raise UserError(f"model.kwargs.{k}: {cls.__name__}() takes no argument {k!r}{hint}")
    for n, p in params.items():
        required = p.default is p.empty and p.kind not in (p.VAR_KEYWORD, p.VAR_POSITIONAL)
        if required and n not in kwargs and n not in FROM_DATA:
            if p.kind is p.POSITIONAL_ONLY:
                raise UserError(f"model.arch: {cls.__name__}() needs the positional-only argument {n!r}")
            raise UserError(f"model.kwargs: {cls.__name__}() needs a value for {n!r} (set model.kwargs.{n})")
    try:
        hints = typing.get_type_hints(cls.__init__)
    except Exception:  # annotations that do not evaluate: no type check
        hints = {}
    for k, v in kwargs.items():
        want = hints.get(k)
        if want in (int, float, bool, str) and not _fits(v, want):
            raise UserError(f"model.kwargs.{k}: {cls.__name__}() expects {want.__name__}, got {v!r}")


def _fits(v: Any, want: type) -> bool:
    if want is float:
        return isinstance(v, int | float) and not isinstance(v, bool)
    if want is int:
        return isinstance(v, int) and not isinstance(v, bool)
    return isinstance(v, want)


def _user_builder(cls: type[nn.Module]) -> Builder:
    """The builder of a user's module: `cls(**model.kwargs, input_shape=..., num_outputs=...)` as it takes them."""
    sig = _signature(cls)
    takes = set(sig.parameters) if sig is not None else set()
    source = _source_file(cls)

    def build(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
        kwargs = dict(cfg.kwargs)
        if "input_shape" in takes:
            kwargs["input_shape"] = tuple(input_shape)
        for name in ("num_outputs", "num_classes"):
            if name in takes:
                kwargs[name] = num_outputs
        device = None
        if _default_device().type == "meta":  # shapes for the memory estimate and resume checks
            try:
                return cls(**kwargs)
            except Exception:  # an op with no meta kernel in the user's __init__: build it for real instead
                device = torch.device("cpu")
        try:
            with torch.device(device) if device is not None else contextlib.nullcontext():
                model = cls(**kwargs)
        except Exception as e:
            raise UserError(f"model.arch: {cls.__name__}(...) raised {user_frame(e, source)}") from None
        if not isinstance(model, nn.Module):  # a __new__ that returns something else
            raise UserError(f"model.arch: {cls.__name__}(...) returned a {type(model).__name__}, not an nn.Module")
        return model

    return build


def _source_file(cls: type) -> str | None:
    """The resolved path of the file defining `cls` (None for a class without one)."""
    try:
        path = inspect.getsourcefile(cls)
    except TypeError:  # a built-in class
        return None
    return str(Path(path).resolve()) if path else None


def _default_device() -> torch.device:
    return torch.empty(()).device  # honours a `with torch.device(...)` context (memory.meta_model uses "meta")


def build_model(
    model_cfg: Mapping[str, Any] | ModelConfig, input_shape: tuple[int, ...], num_outputs: int
) -> nn.Module:
    """Build `model_cfg['arch']` for inputs of `input_shape` (no batch dim) and `num_outputs` outputs.

    A mapping is validated like the `model:` section of a config file. A user's module is run once on a
    sample batch: its output shape is checked and the order in which it uses its weights recorded (the
    depth order of `depth_ordered_layers`).
    """
    if not isinstance(model_cfg, ModelConfig):
        model_cfg = build_section(ModelConfig, model_cfg, "model.")
    cfg = apply_preset(model_cfg)
    if cfg.arch not in ARCHITECTURES:  # a relative import path in a ModelConfig made in code: resolve it now
        cfg = dataclasses.replace(cfg, arch=check_arch_name(cfg.arch))  # (__post_init__ registers it)
    model = ARCHITECTURES[cfg.arch](cfg, tuple(input_shape), num_outputs)
    init_weights(model, cfg)
    if cfg.arch not in BUILTIN_ARCHS and _default_device().type != "meta":
        _check_user_model(model, cfg.arch, tuple(input_shape), num_outputs)
    return model


def _check_user_model(model: nn.Module, arch: str, input_shape: tuple[int, ...], num_outputs: int) -> None:
    """Run a user's module on a sample batch: the output shape must be (batch, num_outputs)."""
    source, name = _source_file(type(model)), arch.rpartition(":")[2]
    sample = sample_batch(input_shape)
    try:
        out = record_forward_order(model, sample)
    except Exception as e:
        raise UserError(
            f"model.arch: {name} fails on a sample batch of shape {tuple(sample.shape)}: {user_frame(e, source)}"
        ) from None
    want = (SAMPLE_BATCH, num_outputs)
    if not isinstance(out, Tensor) or tuple(out.shape) != want:
        got = f"shape {tuple(out.shape)}" if isinstance(out, Tensor) else f"a {type(out).__name__}"
        raise UserError(
            f"model.arch: {name} returns {got} for a batch of shape {tuple(sample.shape)}; expected {want} "
            f"(batch, num_outputs={num_outputs} from the data): take num_outputs in its constructor"
        )


def sample_batch(input_shape: tuple[int, ...], device: torch.device | str = "cpu") -> Tensor:
    """(SAMPLE_BATCH, *input_shape) standard normal values, drawn without touching the global RNG."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    return torch.randn(SAMPLE_BATCH, *input_shape, generator=gen).to(device)


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


# The order a module's weights were used in its forward pass, as parameter names, by module (recorded by
# `record_forward_order`; weak keys: the record goes with the module).
_FORWARD_ORDER: weakref.WeakKeyDictionary[nn.Module, list[str]] = weakref.WeakKeyDictionary()


class _ParameterUse(TorchFunctionMode):
    """Sees every torch function call and notes each Parameter at its first use as an argument.

    Why not forward hooks on the modules: a hook knows when a module runs, not when the module uses its
    own weight relative to its children (a parent's `self.head` weight applied after its blocks, a weight
    used through `F.linear` or `x @ self.W`); the operation that takes the weight as an argument is the
    exact moment of use.
    """

    def __init__(self, params: dict[int, str]) -> None:
        super().__init__()
        self.params = params  # id -> name of the weights to look for
        self.order: list[str] = []
        self._seen: set[int] = set()

    def _note(self, obj: Any) -> None:
        if isinstance(obj, list | tuple):
            for o in obj:
                self._note(o)
        elif isinstance(obj, nn.Parameter) and id(obj) in self.params and id(obj) not in self._seen:
            self._seen.add(id(obj))
            self.order.append(self.params[id(obj)])

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self._note(args)
        if kwargs:
            self._note(list(kwargs.values()))
        return func(*args, **(kwargs or {}))


def has_forward_order(model: nn.Module) -> bool:
    """Whether `record_forward_order` has seen `model`."""
    return model in _FORWARD_ORDER


def record_forward_order(model: nn.Module, sample: Tensor) -> Any:
    """Run `model` once on `sample` (train mode, no grad) and record the order it uses its weights in.

    Weights are the parameters with >= 2 dims (matrices, conv kernels, embeddings); one never used in the
    forward pass has no place in depth and is left out of the order. Buffers (BatchNorm's running
    statistics) and the global RNG are as before the call. Returns the model's output.
    """
    params = {id(p): n for n, p in model.named_parameters() if p.dim() >= 2}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    mode = _ParameterUse(params)
    devices = [sample.device.index or 0] if sample.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad(), mode:
        out = model(sample)
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    _FORWARD_ORDER[model] = mode.order
    return out


def depth_ordered_layers(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(name, weight) of every weight matrix / conv kernel, in depth order (input -> output).

    For a model `record_forward_order` has seen (every user's module, by `build_model`): the order of
    first use in its forward pass. Otherwise registration order: every zoo model registers its modules
    in forward order (tests/test_usermodel.py checks it against a recorded forward pass for every
    built-in architecture). The name is the module path (e.g. `layers.0.0`, `head`); a traced weight not
    called `weight` keeps its full parameter name. The gradient monitor, per-layer decay and L1 rely on this.
    """
    order = _FORWARD_ORDER.get(model)
    if order is not None:
        named = dict(model.named_parameters())
        if all(n in named for n in order):
            return [(n.removesuffix(".weight"), named[n]) for n in order]
    out = []
    for name, p in model.named_parameters():
        if name.endswith("weight") and p.dim() >= 2:
            out.append((name.removesuffix(".weight"), p))
    return out
