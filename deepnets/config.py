"""Typed config schema, YAML loading, dotted overrides and validation.

Every key a user can set is a field below; its comment is its documentation
(the README's config table is generated from the same fields by
`python -m deepnets.config --markdown`). Validation is strict: unknown keys,
wrong types and out-of-range values are `UserError`s that name the full key
path, the nearest valid key or the allowed values.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import re
import sys
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union

import yaml

from deepnets.errors import UserError

CONFIGS_DIR = Path(__file__).resolve().parent.parent / "configs"


def _f(default: Any = dataclasses.MISSING, doc: str = "", **bounds: float) -> Any:
    """A field with its documentation and numeric bounds (ge, gt, le, lt) as metadata."""
    kwargs: dict[str, Any] = {"metadata": {"doc": doc, **bounds}}
    if isinstance(default, list | dict):
        kwargs["default_factory"] = lambda d=default: type(d)(d)
    else:
        kwargs["default"] = default
    return field(**kwargs)


Activation = Literal["relu", "leaky_relu", "gelu", "silu", "elu", "tanh", "sigmoid", "identity"]
Arch = Literal["mlp", "skipnet", "resmlp", "densemlp", "resnet", "densenet"]


@dataclass
class ModelConfig:
    arch: Arch = _f("mlp", "architecture family")
    preset: Literal["resnet18", "resnet34", "resnet50", "resnet20", "resnet56", "densenet121"] | None = _f(
        None, "named architecture; sets block/stage_depths/width/stem, explicit keys still win"
    )
    # --- fully connected family (input flattened) ---
    depth: int = _f(4, "hidden layers (mlp, skipnet), residual blocks (resmlp)", ge=1)
    width: int | list[int] | None = _f(
        None, "hidden width (int or per-layer list); resnet: first-stage channels; null = arch default"
    )
    activation: Activation = _f("relu", "nonlinearity h")
    bias: bool = _f(True, "bias terms in linear / classifier layers")
    batch_norm: bool = _f(False, "BatchNorm after each linear layer (MLP family)")
    dropout: float = _f(0.0, "dropout rate after each hidden activation", ge=0, lt=1)
    init: Literal["default", "kaiming", "xavier", "orthogonal", "normal"] = _f("default", "weight init")
    init_std: float = _f(0.01, "std of init: normal", gt=0)
    init_gain: float = _f(1.0, "gain multiplying kaiming/xavier/orthogonal init", gt=0)
    skip_from: Literal["input", "all"] = _f(
        "input", "skipnet: shortcuts from the input only, or from every earlier layer"
    )
    preact: bool = _f(False, "resmlp/resnet: pre-activation blocks (He et al. 2016b)")
    growth_rate: int | None = _f(None, "densemlp/densenet: features added per layer", ge=1)
    layers_per_block: int = _f(4, "densemlp: layers per dense block", ge=1)
    num_blocks: int = _f(2, "densemlp: dense blocks", ge=1)
    # --- convolutional family ---
    block: Literal["basic", "bottleneck"] = _f("basic", "resnet block type")
    stage_depths: list[int] | None = _f(None, "resnet: blocks per stage; densenet: layers per block")
    width_multiplier: float = _f(1.0, "scales every channel count (width sweeps)", gt=0)
    stem: Literal["cifar", "imagenet"] = _f("cifar", "cifar: 3x3 conv; imagenet: 7x7 conv + max pool")
    zero_init_residual: bool = _f(False, "zero-init the last BN of each residual branch")
    bn_size: int = _f(4, "densenet: bottleneck width factor", ge=1)
    compression: float = _f(0.5, "densenet: transition channel factor", gt=0, le=1)
    num_init_features: int | None = _f(None, "densenet: stem channels (null = 2 * growth_rate)", ge=1)
    # --- shared ---
    checkpointing: bool = _f(False, "recompute block activations in backward (saves memory)")
    channels_last: bool = _f(False, "conv nets: NHWC memory format (faster with mixed precision on GPU)")


@dataclass
class DataConfig:
    name: Literal["digits", "mnist", "fashion_mnist", "cifar10", "synthetic"] = _f(
        "digits", "dataset; digits is bundled with scikit-learn and needs no download"
    )
    root: str = _f("data", "where mnist/fashion_mnist/cifar10 files live")
    download: bool = _f(False, "let torchvision download missing files")
    batch_size: int = _f(128, "training batch size (per device)", ge=1)
    eval_batch_size: int | None = _f(None, "val/test batch size (null = 4 x batch_size)", ge=1)
    val_fraction: float = _f(0.1, "share of the training data held out for validation", ge=0, lt=1)
    test_fraction: float = _f(0.2, "share held out for test where the data has no test split", gt=0, lt=1)
    split_seed: int = _f(0, "seed of the train/val/test split (kept apart from `seed` for sweeps)")
    train_size: int | None = _f(None, "use only this many training samples", ge=1)
    label_noise: float = _f(0.0, "fraction of training labels flipped to another class", ge=0, le=1)
    standardize: bool = _f(True, "zero mean, unit std from training statistics (per channel / feature)")
    whiten: Literal["none", "zca"] = _f("none", "ZCA whitening estimated on the training split")
    whiten_eps: float = _f(0.01, "ZCA epsilon added to the eigenvalues", gt=0)
    augment: bool = _f(False, "cifar10: random crop (pad 4) + horizontal flip, per batch on device")
    # synthetic data
    input_shape: list[int] = _f([32], "synthetic: shape of one sample, e.g. [3, 32, 32]")
    num_classes: int = _f(10, "synthetic: number of classes", ge=2)
    num_samples: int = _f(1024, "synthetic: samples in total (before splits)", ge=2)


@dataclass
class OptimConfig:
    name: Literal["sgd", "adam", "adamw", "rmsprop", "adagrad"] = _f("sgd", "optimizer")
    lr: float = _f(0.1, "learning rate", gt=0)
    momentum: float = _f(0.9, "sgd/rmsprop momentum (heavy ball unless nesterov)", ge=0, lt=1)
    nesterov: bool = _f(False, "sgd: Nesterov momentum")
    betas: list[float] = _f([0.9, 0.999], "adam/adamw betas")
    eps: float = _f(1e-8, "adam/adamw/rmsprop/adagrad epsilon", gt=0)
    amsgrad: bool = _f(False, "adam/adamw: AMSGrad variant")
    weight_decay: float = _f(0.0, "L2 penalty / decoupled decay (adamw)", ge=0)
    decay_bias_and_norm: bool = _f(False, "also decay biases and norm parameters")
    layer_decay: float | list[float] | None = _f(
        None, "per-layer weight decay: a list (one per depth-ordered layer) or a factor per depth"
    )
    l1: float = _f(0.0, "L1 penalty coefficient on weights, added to the loss", ge=0)
    label_smoothing: float = _f(0.0, "cross-entropy label smoothing", ge=0, lt=1)
    grad_clip_norm: float | None = _f(None, "clip the global gradient norm to this value", gt=0)


@dataclass
class SchedulerConfig:
    name: Literal["none", "step", "cosine", "onecycle", "plateau"] = _f("none", "lr schedule")
    step_size: int = _f(30, "step: epochs between decays", ge=1)
    gamma: float = _f(0.1, "step/plateau: decay factor", gt=0, lt=1)
    patience: int = _f(5, "plateau: epochs without val/loss improvement", ge=0)
    min_lr: float = _f(0.0, "cosine: final learning rate", ge=0)
    warmup_steps: int = _f(0, "linear warmup from 0 over this many steps", ge=0)


@dataclass
class TrainerConfig:
    accelerator: Literal["auto", "cpu", "gpu", "cuda", "mps"] = _f("auto", "auto uses a GPU when present")
    devices: int | str | list[int] = _f("auto", "devices per node: auto, a count, or a list of ids")
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = _f("auto", "multi-device strategy")
    num_nodes: int = _f(1, "nodes (multi-node DDP)", ge=1)
    precision: Literal["32", "bf16-mixed", "16-mixed", "64"] = _f("32", "numeric precision")
    max_epochs: int = _f(20, "epoch limit (-1: none)", ge=-1)
    max_steps: int = _f(-1, "optimizer-step limit (-1: none)", ge=-1)
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-reproducible on CPU)")
    log_every_n_steps: int = _f(10, "step scalar logging interval (loss, LR, divergence check on GPUs)", ge=1)
    progress_bar: bool = _f(True, "show a progress bar")
    fast_dev_run: bool | int = _f(False, "run N (true: 1) batches of train/val/test, write nothing")
    overfit_batches: int | float = _f(0, "train on this many (or fraction of) batches", ge=0)
    limit_val_batches: int | float = _f(1.0, "validation batches per epoch (or fraction)", ge=0)
    check_val_every_n_epoch: int = _f(1, "validation interval in epochs", ge=1)
    compile: bool = _f(False, "wrap the model in torch.compile")
    detect_anomaly: bool = _f(False, "torch.autograd anomaly detection (slow; debugging)")
    lr_find: bool = _f(False, "run Lightning's LR finder first and use its suggestion")
    lr_probe: list[float] | None = _f(None, "Bottou's trick: learning rates to probe on a subset")
    lr_probe_steps: int = _f(200, "steps per probed learning rate", ge=1)
    test: bool = _f(True, "test the best checkpoint after fitting")
    threads: int | Literal["auto"] = _f(
        "auto", "torch intra-/inter-op CPU threads: auto (what this machine needs, see README) or N", ge=1
    )

    @property
    def lightning_precision(self) -> str:
        """`precision` as Lightning spells it ("32" -> "32-true")."""
        return {"32": "32-true", "64": "64-true"}.get(self.precision, self.precision)


@dataclass
class EarlyStoppingConfig:
    enabled: bool = _f(False, "stop when `monitor` stops improving")
    monitor: str = _f("val/loss", "metric to watch")
    mode: Literal["min", "max"] = _f("min", "min for losses, max for accuracies")
    patience: int = _f(5, "validation rounds without improvement", ge=0)
    min_delta: float = _f(0.0, "smallest change that counts as improvement", ge=0)
    restore_best: bool = _f(True, "test the best checkpoint (false: the last weights)")


@dataclass
class CheckpointConfig:
    enabled: bool = _f(True, "write checkpoints (best + last) under checkpoints/")
    monitor: str = _f("val/acc", "metric that picks the best checkpoint")
    mode: Literal["min", "max"] = _f("max", "min for losses, max for accuracies")
    save_top_k: int = _f(1, "best checkpoints kept", ge=0)
    every_n_steps: int | None = _f(None, "also save last.ckpt every N training steps", ge=1)


@dataclass
class LoggingConfig:
    tensorboard: bool = _f(True, "TensorBoard event files in the run directory")
    grad_norm_every_n_steps: int = _f(25, "gradient-flow monitor interval (0: off)", ge=0)
    weight_norms: bool = _f(False, "monitor: also log weight norms and update/weight ratios (costs a weight copy)")
    vanishing_ratio: float = _f(1e-3, "warn when first/last layer gradient norm falls below", gt=0)
    exploding_norm: float = _f(1e3, "warn when a layer's gradient norm exceeds", gt=0)
    heatmap_every_n_logs: int = _f(
        20, "monitor: TensorBoard heatmap at an epoch end after N log events (at most every 30 s), and at the end", ge=1
    )
    heatmap_range: list[float] | None = _f(
        [-12.0, 1.0], "log10 colour range [lo, hi] of the gradient heatmaps, fixed so runs compare (null = per run)"
    )

    def __post_init__(self) -> None:
        r = self.heatmap_range
        if r is not None and (len(r) != 2 or not all(map(math.isfinite, r)) or not r[0] < r[1]):
            raise UserError(f"logging.heatmap_range: expected [lo, hi] with finite lo < hi (log10), got {r!r}")


@dataclass
class SweepConfig:
    params: dict[str, list[Any]] = _f({}, "dotted key -> list of values; the grid is their product")
    seeds: list[int] = _f([0], "seeds run for every grid point")
    metric: str = _f("test/acc", "metric plotted against the first swept key")
    x_key: str | None = _f(None, "key on the plot's x axis (null = first of params)")


@dataclass
class Config:
    name: str = _f("run", "run name: runs go to <output_dir>/<name>/version_<n>/")
    seed: int = _f(0, "seed for weights, data order and dropout")
    output_dir: str = _f("runs", "root of all run directories")
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    early_stopping: EarlyStoppingConfig = field(default_factory=EarlyStoppingConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    sweep: SweepConfig = field(default_factory=SweepConfig)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------- YAML


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads `1e-3` as a float.

    PyYAML implements YAML 1.1, whose float regex needs a dot and a signed
    exponent, so `lr: 1e-3` would silently become the string "1e-3".
    """


_Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(
        r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
        |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
        |\.[0-9_]+(?:[eE][-+][0-9]+)?
        |[-+]?\.(?:inf|Inf|INF)
        |\.(?:nan|NaN|NAN))$""",
        re.X,
    ),
    list("-+0123456789."),
)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML safely; `!!python/...` tags and syntax errors become UserErrors."""
    try:
        return yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(e, "problem", None) or str(e).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None


def resolve_config_path(name_or_path: str) -> Path:
    """A path as given; otherwise configs/NAME or configs/NAME.yaml (cwd first, then the package's)."""
    p = Path(name_or_path)
    if p.is_file():
        return p
    for root in (Path("configs"), CONFIGS_DIR):
        for cand in (root / name_or_path, root / f"{name_or_path}.yaml"):
            if cand.is_file():
                return cand
    raise UserError(f"config {name_or_path!r} not found (looked in ., ./configs and {CONFIGS_DIR})")


def load_config(name_or_path: str | None, overrides: list[str] = ()) -> Config:  # type: ignore[assignment]
    """Read a YAML config, apply `dotted.key=value` overrides, validate."""
    raw: Any = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        try:
            text = path.read_text()
        except OSError as e:
            raise UserError(f"cannot read config {path}: {e.strerror}") from None
        raw = parse_yaml(text, str(path)) or {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections")
    apply_overrides(raw, overrides)
    return from_dict(raw)


def apply_overrides(raw: dict[str, Any], overrides: list[str] | tuple[str, ...]) -> None:
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"override {item!r} must look like dotted.key=value")
        node = raw
        parts = key.split(".")
        for part in parts[:-1]:
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise UserError(f"override {key}: {part} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(value, f"override {key}")


def from_dict(raw: Mapping[str, Any]) -> Config:
    return build_section(Config, raw, "")


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(fields)}"
            raise UserError(f"unknown key {prefix}{key}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        path = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, raw[name] if raw[name] is not None else {}, f"{path}.")
        else:
            kwargs[name] = _check(raw[name], tp, path)
            _check_bounds(kwargs[name], f.metadata, path)
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check(value: Any, tp: Any, path: str) -> Any:
    """Return `value` converted to `tp`, or raise a UserError naming `path` and what is allowed."""
    ok, out = _match(value, tp)
    if not ok:
        raise UserError(f"{path}: expected {_type_name(tp)}, got {value!r}")
    return out


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        for allowed in typing.get_args(tp):
            # precision: 32 in YAML is an int; the Literal holds the string "32"
            if value == allowed or (isinstance(allowed, str) and str(value) == allowed):
                return True, allowed
        return False, None
    if origin in (Union, types.UnionType):
        for arg in typing.get_args(tp):
            ok, out = _match(value, arg)
            if ok:
                return True, out
        return False, None
    if origin is list:
        (item_tp,) = typing.get_args(tp)
        if not isinstance(value, list):
            return False, None
        items = [_match(v, item_tp) for v in value]
        return (all(ok for ok, _ in items), [v for _, v in items])
    if origin is dict:
        _, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return False, None
        items = {k: _match(v, val_tp) for k, v in value.items()}
        return all(ok for ok, _ in items.values()), {k: v for k, (_, v) in items.items()}
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        return ok, float(value) if ok else None
    if tp is str:
        return isinstance(value, str), value
    return isinstance(value, tp), value


_BOUNDS = {
    "ge": (">=", lambda v, b: v >= b),
    "gt": (">", lambda v, b: v > b),
    "le": ("<=", lambda v, b: v <= b),
    "lt": ("<", lambda v, b: v < b),
}


def _check_bounds(value: Any, meta: Mapping[str, Any], path: str) -> None:
    values = value if isinstance(value, list) else [value]
    for v in values:
        if not isinstance(v, int | float) or isinstance(v, bool):
            continue
        for key, (_, ok) in _BOUNDS.items():
            if key in meta and not ok(v, meta[key]):
                rng = " and ".join(f"{s} {meta[k]}" for k, (s, _) in _BOUNDS.items() if k in meta)
                raise UserError(f"{path}: {v!r} is out of range (allowed: {rng})")


def to_yaml(cfg: Config) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=None)


def markdown_table() -> str:
    """Every key with its type, default and doc: the README's config reference."""
    rows = ["| key | type | default | meaning |", "| --- | --- | --- | --- |"]
    top = Config()
    for f in dataclasses.fields(Config):
        value = getattr(top, f.name)
        if dataclasses.is_dataclass(value):
            hints = typing.get_type_hints(type(value))
            for sub in dataclasses.fields(value):
                default = getattr(value, sub.name)
                rows.append(
                    f"| `{f.name}.{sub.name}` | {_type_name(hints[sub.name])} | `{default}` "
                    f"| {sub.metadata.get('doc', '')} |"
                )
        else:
            hint = typing.get_type_hints(Config)[f.name]
            rows.append(f"| `{f.name}` | {_type_name(hint)} | `{value}` | {f.metadata.get('doc', '')} |")
    return "\n".join(rows)


if __name__ == "__main__":
    if "--markdown" in sys.argv:
        print(markdown_table())
