"""Typed config schema, YAML loading, dotted overrides and validation.

Every key a user can set is a field below; its comment is its documentation
(the README's config table is generated from the same fields by
`python -m deepnets.config --markdown`). Validation is strict: unknown keys,
wrong types and out-of-range values are `UserError`s that name the full key
path, the nearest valid key or the allowed values.

- Files and override values are read as YAML 1.2 core (see `_Loader`);
  duplicate keys, unknown tags and anything else the parser refuses are one
  line naming file:line or the override.
- `from_dict` checks each field (type, bounds, finiteness, `check=`) and then
  the settings that span fields (`validate`: monitors against the logged
  metrics, schedules that need a validation split or a run length).
- `check_runtime` (called first by `deepnets.run.train`) checks the devices,
  strategy and precision against this machine; it and `model.arch` (the
  ARCHITECTURES table, a user's module) import torch / Lightning, lazily.
- `to_yaml` writes what `load_config` reads back equal.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import re
import sys
import types
import typing
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, NoReturn, Union

import yaml

from deepnets.errors import UserError
from deepnets.optimizers import canonical_name, check_optimizer
from deepnets.tasks import TASKS, logged_metrics

# The shipped configs are package data (pyproject.toml), so an installed package finds them from any directory;
# the repo's top-level `configs` is a symlink here, for the `configs/...` paths the docs and scripts quote.
CONFIGS_DIR = Path(__file__).resolve().parent / "configs"
SEED_MAX = 2**32 - 1  # numpy's seed range (Lightning's seed_everything seeds numpy too)


def _f(default: Any = dataclasses.MISSING, doc: str = "", **bounds: Any) -> Any:
    """A field with its documentation and checks as metadata.

    ge, gt, le, lt: numeric bounds (for a list: of every item); every float
    must also be finite. min_items, n_items: list lengths. check: a function
    (value, key path) that raises a UserError. path: the value is a file
    system path whose `~` is expanded at load time (absolute: and made absolute). allowed: the range as a
    message states it, where bounds alone do not say it.
    """
    kwargs: dict[str, Any] = {"metadata": {"doc": doc, **bounds}}
    if isinstance(default, list | dict):
        kwargs["default_factory"] = lambda d=default: type(d)(d)
    else:
        kwargs["default"] = default
    return field(**kwargs)


# ---------------------------------------------------------------- field checks (`check=` above)


def _optimizer_name(value: str, path: str) -> None:
    """A built-in name costs nothing; anything else must resolve (torch.optim, or the user's import path)."""
    from deepnets.optimizers import OPTIMIZERS, optimizer_class

    if value not in OPTIMIZERS:
        optimizer_class(value, path)


_DEVICES = "auto, an int >= 1, or a non-empty list of distinct device ids >= 0"


def _devices(value: Any, path: str) -> None:
    allowed = f"(allowed: {_DEVICES})"
    if isinstance(value, int) and value < 1:
        raise UserError(f"{path}: {value} is out of range {allowed}")
    if isinstance(value, list) and (not value or min(value) < 0 or len(set(value)) != len(value)):
        raise UserError(f"{path}: {_show(value)} is not a valid device list {allowed}")


_LIMIT = "-1 for no limit, or >= 1"


def _limit(value: int, path: str) -> None:
    # 0 would train nothing and still report `completed`
    if value != -1 and value < 1:
        raise UserError(f"{path}: {value} is out of range (allowed: {_LIMIT})")


_BATCHES = "an int >= 0, or a fraction in [0, 1]"


def _batches(value: int | float, path: str) -> None:
    ok = 0 <= value <= 1 if isinstance(value, float) else value >= 0
    if not ok:  # (a non-finite float is refused before this check)
        raise UserError(f"{path}: {_show(value)} is out of range (allowed: {_BATCHES})")


def _run_name(value: str, path: str) -> None:
    """`name` is a relative path that stays inside output_dir: no `..`, no absolute path, no empty parts."""
    parts = value.split("/")
    bad = (
        not value
        or value.startswith(("/", "~"))
        or any(p in ("", ".", "..") for p in parts)
        or any(ord(c) < 32 or ord(c) == 127 for c in value)
    )
    if bad:
        raise UserError(
            f"{path}: {_show(value)} is not a relative path inside output_dir "
            "(allowed: names like mlp or mnist/mlp; no '..', '.', '~', leading or double '/', control characters)"
        )
    long = next((p for p in parts if len(p.encode("utf-8", "surrogatepass")) > 255), None)
    if long is not None:
        raise UserError(f"{path}: the part {_show(long)} is longer than 255 bytes, the file system's limit")


Activation = Literal["relu", "leaky_relu", "gelu", "silu", "elu", "tanh", "sigmoid", "identity"]


def _arch(value: str, path: str) -> str:
    """A built-in name (did-you-mean on a miss) or an import path, recorded absolute (see deepnets.imports)."""
    from deepnets.models import check_arch_name  # the ARCHITECTURES table lives with the models (imports torch)

    return check_arch_name(value, path)


@dataclass
class ModelConfig:
    arch: str = _f(
        "mlp",
        "mlp, skipnet, resmlp, densemlp, resnet, densenet, or your own nn.Module: path/to/file.py:ClassName "
        "(relative to the config file) or package.module:ClassName",
        check=_arch,
    )
    kwargs: dict[str, Any] = _f(
        {}, "own model.arch: constructor keyword arguments (input_shape and num_outputs come from the data)"
    )
    preset: Literal["resnet18", "resnet34", "resnet50", "resnet20", "resnet56", "densenet121"] | None = _f(
        None, "named architecture; sets block/stage_depths/width/stem, explicit keys still win"
    )
    # --- fully connected family (input flattened) ---
    depth: int = _f(4, "hidden layers (mlp, skipnet), residual blocks (resmlp)", ge=1)
    width: int | list[int] | None = _f(
        None,
        "hidden width (int or per-layer list); resnet: first-stage channels; null = arch default",
        ge=1,
        min_items=1,
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
    stage_depths: list[int] | None = _f(None, "resnet: blocks per stage; densenet: layers per block", ge=1, min_items=1)
    width_multiplier: float = _f(1.0, "scales every channel count (width sweeps)", gt=0)
    stem: Literal["cifar", "imagenet"] = _f("cifar", "cifar: 3x3 conv; imagenet: 7x7 conv + max pool")
    zero_init_residual: bool = _f(False, "zero-init the last BN of each residual branch")
    bn_size: int = _f(4, "densenet: bottleneck width factor", ge=1)
    compression: float = _f(0.5, "densenet: transition channel factor", gt=0, le=1)
    num_init_features: int | None = _f(None, "densenet: stem channels (null = 2 * growth_rate)", ge=1)
    # --- shared ---
    checkpointing: bool = _f(False, "recompute block activations in backward (saves memory)")
    channels_last: bool = _f(False, "conv nets: NHWC memory format (faster with mixed precision on GPU)")

    def __post_init__(self) -> None:
        if ":" in self.arch or self.kwargs:  # an import path: its file runs now (built-in names import nothing)
            from deepnets.models import check_model_config

            check_model_config(self)


def _dataset(value: str, path: str) -> None:
    """`data.name` must be a key of `deepnets.data.DATASETS`, the table the readers live in."""
    from deepnets.data import DATASETS  # imported here: the readers need torch, a config check does not otherwise

    if value not in DATASETS:
        near = difflib.get_close_matches(value, list(DATASETS), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]}?" if near else ""
        raise UserError(f"{path}: {_show(value)} is not a dataset{hint} (allowed: {', '.join(DATASETS)})")


def _columns(value: str | list[str], path: str) -> None:
    names = [value] if isinstance(value, str) else value
    if not names or any(not n for n in names):
        raise UserError(f"{path}: {_show(value)} names no column (allowed: a column name or a non-empty list)")
    dup = next((n for n in names if names.count(n) > 1), None)
    if dup is not None:
        raise UserError(f"{path}: column {_show(dup)} is named twice")


USER_DATA = ("csv", "npz", "folder")  # datasets read from data.path (the user's own files)


@dataclass
class DataConfig:
    name: str = _f(
        "digits",
        "dataset: digits (bundled with scikit-learn), mnist, fashion_mnist, cifar10, synthetic, "
        "or your own files: csv, npz, folder (see data.path)",
        check=_dataset,
    )
    root: str = _f("data", "where mnist/fashion_mnist/cifar10 files live", path=True)
    download: bool = _f(False, "let torchvision download missing files")
    path: str | None = _f(
        None,
        "csv / npz: the file; folder: the image root (ROOT/<class>/*.png|jpg, or ROOT/train/ [+ val/, test/]); "
        "in your config file relative to that file, else (overrides, shipped configs) to the current directory; "
        "recorded absolute",
        path=True,
        absolute=True,
    )
    target: str | list[str] | None = _f(
        None, "csv: the target column (or a list of columns: several regression targets)", check=_columns
    )
    features: list[str] | None = _f(
        None, "csv: the feature columns (null = every column but the target)", check=_columns
    )
    x_key: str = _f("x", "npz: the inputs array (N, ...); an array named <x_key>_test is the test split")
    y_key: str = _f("y", "npz: the targets array (N,) or (N, k); with <y_key>_test for the test split")
    image_size: list[int] | None = _f(
        None,
        "folder: [H, W] every image is resized to (decoded as RGB: grey replicated, alpha dropped)",
        ge=1,
        n_items=2,
    )
    batch_size: int = _f(128, "training batch size (per device)", ge=1)
    eval_batch_size: int | None = _f(None, "val/test batch size (null = 4 x batch_size)", ge=1)
    val_fraction: float = _f(0.1, "share of the training data held out for validation", ge=0, lt=1)
    test_fraction: float = _f(0.2, "share held out for test where the data has no test split", gt=0, lt=1)
    split_seed: int = _f(0, "seed of the train/val/test split (kept apart from `seed` for sweeps)", ge=0, le=SEED_MAX)
    train_size: int | None = _f(None, "use only this many training samples", ge=1)
    label_noise: float = _f(0.0, "classification: fraction of training labels flipped to another class", ge=0, le=1)
    standardize: bool = _f(True, "zero mean, unit std from training statistics (per channel / feature)")
    whiten: Literal["none", "zca"] = _f("none", "ZCA whitening estimated on the training split")
    whiten_eps: float = _f(0.01, "ZCA epsilon added to the eigenvalues", gt=0)
    augment: bool = _f(False, "images (cifar10, folder, npz of N x C x H x W): random crop (pad 4) + h-flip per batch")
    # synthetic data
    input_shape: list[int] = _f([32], "synthetic: shape of one sample, e.g. [3, 32, 32]", ge=1, min_items=1)
    num_classes: int = _f(10, "synthetic: number of classes", ge=2)
    num_samples: int = _f(1024, "synthetic: samples in total (before splits)", ge=2)
    standardize_target: bool = _f(
        True, "regression: fit targets standardised with training mean/std (metrics, predictions: own units)"
    )


def check_data_keys(d: DataConfig, task: str) -> None:
    """The data keys that go together, checked when the config loads (the files are checked by
    `deepnets.data.check_data_files` before a run starts: a run's config.yaml must load where its data is gone)."""
    if d.name in USER_DATA and d.path is None:
        what = {"csv": "a .csv file", "npz": "an .npz file", "folder": "an image folder"}[d.name]
        raise UserError(f"data.path: data.name={d.name} reads {what}; set data.path")
    # (keys of another kind of data are ignored, as data.num_classes is: an override of data.name keeps them)
    if d.name == "csv" and d.target is None:
        raise UserError("data.target: data.name=csv needs the target column's name")
    if d.name == "csv" and d.features is not None:
        targets = [d.target] if isinstance(d.target, str) else d.target
        both = next((c for c in d.features if c in targets), None)
        if both is not None:
            raise UserError(f"data.features: {_show(both)} is also data.target")
    if d.name == "folder" and d.image_size is None:
        raise UserError("data.image_size: data.name=folder needs [H, W] to resize every image to")
    if d.name == "npz" and d.x_key == d.y_key:
        raise UserError(f"data.y_key: {_show(d.y_key)} is also data.x_key")
    if task == "regression":  # (data.label_noise: _check_task)
        if d.name == "folder":
            raise UserError("task: regression needs numeric targets; data.name=folder gives class labels")
        if d.name not in ("csv", "npz", "synthetic"):  # synthetic: a seeded teacher regression
            raise UserError(
                f"task: regression needs numeric targets; data.name={d.name} is a classification "
                "dataset (use csv, npz or synthetic)"
            )
    elif d.name == "csv" and isinstance(d.target, list) and len(d.target) > 1:
        raise UserError(f"data.target: {len(d.target)} columns are regression targets; set task=regression")


@dataclass
class OptimConfig:
    name: str = _f(
        "sgd",
        "optimizer: sgd, adam, adamw, rmsprop, adagrad (tuned paths), a torch.optim class (NAdam, RAdam, ...) "
        "or an import path file.py:Class / package.module:Class",
        check=_optimizer_name,
    )
    kwargs: dict[str, Any] = _f({}, "more constructor arguments of the optimizer class, checked against its signature")
    loss: Literal["auto", "cross_entropy", "mse", "huber"] = _f(
        "auto", "auto: cross_entropy (classification), mse (regression); huber: regression, delta 1 on fitted targets"
    )
    lr: float = _f(0.1, "learning rate", gt=0)
    momentum: float = _f(0.9, "sgd/rmsprop momentum (heavy ball unless nesterov)", ge=0, lt=1)
    nesterov: bool = _f(False, "sgd: Nesterov momentum")
    betas: list[float] = _f([0.9, 0.999], "adam/adamw betas", ge=0, lt=1, n_items=2)
    eps: float = _f(1e-8, "adam/adamw/rmsprop/adagrad epsilon", gt=0)
    amsgrad: bool = _f(False, "adam/adamw: AMSGrad variant")
    weight_decay: float = _f(0.0, "L2 penalty / decoupled decay (adamw)", ge=0)
    decay_bias_and_norm: bool = _f(False, "also decay biases and norm parameters")
    layer_decay: float | list[float] | None = _f(
        None,
        "per-layer weight decay: a list (one per depth-ordered layer) or a factor per depth",
        ge=0,
        min_items=1,
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
    devices: Literal["auto"] | int | list[int] = _f(
        "auto", "devices per node: auto, a count, or a list of ids", check=_devices, allowed=_DEVICES
    )
    strategy: Literal["auto", "ddp", "ddp_spawn", "fsdp"] = _f("auto", "multi-device strategy")
    num_nodes: int = _f(1, "nodes (multi-node DDP)", ge=1)
    precision: Literal["32", "bf16-mixed", "16-mixed", "64"] = _f("32", "numeric precision")
    max_epochs: int = _f(20, "epoch limit (-1: none)", check=_limit, allowed=_LIMIT)
    max_steps: int = _f(-1, "optimizer-step limit (-1: none)", check=_limit, allowed=_LIMIT)
    deterministic: bool = _f(False, "deterministic algorithms (bitwise-reproducible on CPU)")
    log_every_n_steps: int = _f(10, "step scalar logging interval (loss, LR, divergence check on GPUs)", ge=1)
    progress_bar: bool = _f(True, "show a progress bar")
    fast_dev_run: bool | int = _f(False, "run N (true: 1) batches of train/val/test, write nothing", ge=1)
    overfit_batches: int | float = _f(
        0, "train on this many (or fraction of) batches", check=_batches, allowed=_BATCHES
    )
    limit_val_batches: int | float = _f(
        1.0, "validation batches per epoch (or fraction)", check=_batches, allowed=_BATCHES
    )
    check_val_every_n_epoch: int = _f(1, "validation interval in epochs", ge=1)
    compile: bool = _f(False, "wrap the model in torch.compile")
    detect_anomaly: bool = _f(False, "torch.autograd anomaly detection (slow; debugging)")
    lr_find: bool = _f(False, "run Lightning's LR finder first and use its suggestion")
    lr_probe: list[float] | None = _f(None, "Bottou's trick: learning rates to probe on a subset", gt=0, min_items=1)
    lr_probe_steps: int = _f(200, "steps per probed learning rate", ge=1)
    test: bool = _f(True, "test the best checkpoint after fitting")
    threads: int | Literal["auto"] = _f(
        "auto", "torch intra-/inter-op CPU threads: auto (what this machine needs, see README) or N", ge=1, le=1024
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
    monitor: str = _f("val/acc", "metric that picks the best checkpoint (task regression, when not set: val/loss)")
    mode: Literal["min", "max"] = _f(
        "max", "min for losses, max for accuracies (task regression, when not set: the monitor's)"
    )
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
    search: Literal["grid", "random", "tpe"] = _f(
        "grid", "grid: every combination; random / tpe: Optuna's RandomSampler / TPESampler over params"
    )
    params: dict[str, list[Any] | dict[str, Any]] = _f(
        {}, "dotted key -> list of values (grid values, or random/tpe choices) or {low, high, log} (random/tpe)"
    )
    trials: int | None = _f(None, "random/tpe: points sampled (each runs every seed)", ge=1)
    seeds: list[int] = _f([0], "seeds run for every point")
    sampler_seed: int | None = _f(None, "random/tpe: sampler seed (the same trial list again, with workers: 1)")
    metric: str = _f("test/acc", "metric plotted against the first swept key; what tpe optimises")
    x_key: str | None = _f(None, "key on the plot's x axis (null = first of params)")
    workers: int = _f(1, "local worker processes (cores // workers threads, one GPU each; 0: create only)", ge=0)
    storage: str | None = _f(
        None, "Optuna storage: null = SQLite in the sweep dir; an SQLAlchemy URL or a journal file path (shared)"
    )
    prune: Literal["none", "median"] = _f("none", "median: Optuna's MedianPruner on the metric's val counterpart")
    vectorize: bool = _f(False, "train the points (mlp) together as one stacked model in one run (deepnets/stacked.py)")


@dataclass
class Config:
    name: str = _f("run", "run name: runs go to <output_dir>/<name>/version_<n>/", check=_run_name)
    seed: int = _f(0, "seed for weights, data order and dropout", ge=0, le=SEED_MAX)
    task: Literal["classification", "regression"] = _f(
        "classification", "classification (int class labels) or regression (float targets (N,) or (N, k))"
    )
    output_dir: str = _f("runs", "root of all run directories", path=True)
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


# ---------------------------------------------------------------- YAML 1.2 (core schema)
#
# PyYAML implements YAML 1.1, whose implicit types surprise: `1:20` is 80 (base 60), `0100` is 64
# (octal), `yes`/`on`/`n` are booleans, `2020-01-01` a date, `1e-3` a string, and a repeated key
# silently replaces the first. Configs are read with the YAML 1.2 core schema instead (what
# ruamel.yaml and most current parsers do), with a hand-built resolver table because PyYAML has
# no 1.2 mode: null, true/false, decimal / 0o / 0x ints, floats with an optional exponent,
# .inf/.nan; everything else is a string. Only the core tags construct; any other tag
# (!!timestamp, !!binary, !!set, !!python/...) is refused, so nothing but data comes out.

_NULL = re.compile(r"^(?:~|null|Null|NULL|)$")
_BOOL = re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$")
_INT_DEC = re.compile(r"^[-+]?[0-9]+$")
_INT_OCT = re.compile(r"^0o[0-7]+$")
_INT_HEX = re.compile(r"^0x[0-9a-fA-F]+$")
_INT = re.compile(r"^(?:[-+]?[0-9]+|0o[0-7]+|0x[0-9a-fA-F]+)$")
_FLOAT = re.compile(
    r"^(?:[-+]?(?:\.[0-9]+|[0-9]+(?:\.[0-9]*)?)(?:[eE][-+]?[0-9]+)?|[-+]?\.(?:inf|Inf|INF)|\.(?:nan|NaN|NAN))$"
)
_CORE_RESOLVERS = [  # (tag, regex, first characters); ints before floats: "1" is an int
    ("tag:yaml.org,2002:null", _NULL, ["~", "n", "N", ""]),
    ("tag:yaml.org,2002:bool", _BOOL, list("tTfF")),
    ("tag:yaml.org,2002:int", _INT, list("-+0123456789")),
    ("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789.")),
]
_MAX_DEPTH = 64  # nesting levels; a config needs 3
_MAX_VALUES = 100_000  # scalars and collections after expanding aliases (a "billion laughs" stops here)
_MAX_INT = 2**64  # larger integers are no config value (and their decimal text is slow to print)
_MAX_BYTES = 1 << 20  # a config file larger than 1 MiB is not a config file
_TAG = "tag:yaml.org,2002:"


def _tag_name(tag: str) -> str:
    return "!!" + tag.removeprefix(_TAG) if tag.startswith(_TAG) else tag


class _Loader(yaml.SafeLoader):
    """SafeLoader with the YAML 1.2 core schema, duplicate keys refused and a nesting limit."""

    yaml_implicit_resolvers: dict[Any, Any] = {}  # noqa: RUF012 (PyYAML's class-level tables)
    yaml_constructors: dict[Any, Any] = {}  # noqa: RUF012

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        # PyYAML composes recursively: 3,000 nested `[` would be a RecursionError, not a message
        self._depth += 1
        try:
            if self._depth > _MAX_DEPTH:
                raise yaml.composer.ComposerError(
                    None, None, f"nested more than {_MAX_DEPTH} levels deep", self.peek_event().start_mark
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1

    def fetch_flow_collection_start(self, TokenClass: Any) -> None:
        # Checked in the scanner too: it looks at every open `[` for each token (quadratic: 3,000
        # nested `[` took over a second before the composer's limit was reached).
        if self.flow_level >= _MAX_DEPTH:
            raise yaml.scanner.ScannerError(None, None, f"nested more than {_MAX_DEPTH} levels deep", self.get_mark())
        super().fetch_flow_collection_start(TokenClass)

    def _fail(self, node: yaml.Node, problem: str) -> NoReturn:
        raise yaml.constructor.ConstructorError(None, None, problem, node.start_mark)

    def construct_mapping(self, node: yaml.Node, deep: bool = False) -> dict[Any, Any]:
        if not isinstance(node, yaml.MappingNode):
            self._fail(node, f"expected a mapping, found {node.id}")
        mapping: dict[Any, Any] = {}
        lines: dict[Any, int] = {}
        for key_node, value_node in node.value:
            if isinstance(key_node, yaml.ScalarNode) and key_node.value == "<<" and key_node.style is None:
                self._fail(key_node, "merge keys (<<) are YAML 1.1, not 1.2; write the keys out")
            key = self.construct_object(key_node, deep=deep)
            try:
                hash(key)
            except TypeError:
                self._fail(key_node, f"a {type(key).__name__} cannot be a key")
            if key in mapping:
                self._fail(key_node, f"duplicate key {_show(key)} (first at line {lines[key]})")
            lines[key] = key_node.start_mark.line + 1
            mapping[key] = self.construct_object(value_node, deep=deep)
        return mapping

    def construct_yaml_null(self, node: yaml.Node) -> None:
        value = self.construct_scalar(node)
        if not _NULL.match(value):
            self._fail(node, f"!!null {_show(value)} is not null")
        return None

    def construct_yaml_bool(self, node: yaml.Node) -> bool:
        value = self.construct_scalar(node)
        if not _BOOL.match(value):
            self._fail(node, f"!!bool {_show(value)} is not a boolean (allowed: true, false)")
        return value.lower() == "true"

    def construct_yaml_int(self, node: yaml.Node) -> int:
        value = self.construct_scalar(node)
        try:
            if _INT_DEC.match(value):
                out = int(value, 10)
            elif _INT_OCT.match(value):
                out = int(value[2:], 8)
            elif _INT_HEX.match(value):
                out = int(value[2:], 16)
            else:
                self._fail(node, f"!!int {_show(value)} is not an integer (YAML 1.2: 12, -3, 0o17, 0x1f)")
        except ValueError:  # more digits than Python converts
            self._fail(node, f"integer {value[:20]}... has too many digits")
        if abs(out) >= _MAX_INT:
            self._fail(node, f"integer {value[:20]}{'...' if len(value) > 20 else ''} is too large")
        return out

    def construct_yaml_float(self, node: yaml.Node) -> float:
        value = self.construct_scalar(node)
        if not (_FLOAT.match(value) or _INT_DEC.match(value)):
            self._fail(node, f"!!float {_show(value)} is not a number (YAML 1.2: 0.1, 1e-3, .inf, .nan)")
        low = value.lower()
        if low.endswith((".inf", ".nan")):
            return float(low.replace(".", ""))
        return float(value)

    def construct_undefined(self, node: yaml.Node) -> NoReturn:
        self._fail(
            node,
            f"tag {_tag_name(node.tag)} is not allowed (allowed: !!str, !!int, !!float, !!bool, !!null, !!seq, !!map)",
        )


for _tag, _regex, _first in _CORE_RESOLVERS:
    _Loader.add_implicit_resolver(_tag, _regex, _first)
for _name, _method in [
    ("null", _Loader.construct_yaml_null),
    ("bool", _Loader.construct_yaml_bool),
    ("int", _Loader.construct_yaml_int),
    ("float", _Loader.construct_yaml_float),
    ("str", yaml.SafeLoader.construct_yaml_str),
    ("seq", yaml.SafeLoader.construct_yaml_seq),
    ("map", yaml.SafeLoader.construct_yaml_map),
]:
    _Loader.add_constructor(_TAG + _name, _method)
_Loader.add_constructor(None, _Loader.construct_undefined)


def _audit(data: Any, where: str) -> None:
    """Refuse what YAML's aliases can build but no config is: cycles, huge expansions, deep nesting,
    and strings that are not valid Unicode (a "\\ud800" escape cannot be written back as UTF-8)."""
    on_path: set[int] = set()
    stack: list[tuple[Any, int, bool]] = [(data, 1, False)]
    seen = 0
    while stack:
        obj, depth, leaving = stack.pop()
        if leaving:
            on_path.discard(id(obj))
            continue
        seen += 1
        if seen > _MAX_VALUES:
            raise UserError(f"{where}: more than {_MAX_VALUES:,} values after expanding aliases")
        if isinstance(obj, str):
            try:
                obj.encode("utf-8")
            except UnicodeEncodeError:
                raise UserError(f"{where}: the string {_show(obj)} is not valid Unicode (a lone surrogate)") from None
        elif isinstance(obj, list | dict):
            if id(obj) in on_path:
                raise UserError(f"{where}: a value contains itself (recursive alias)")
            if depth > _MAX_DEPTH:
                raise UserError(f"{where}: nested more than {_MAX_DEPTH} levels deep")
            on_path.add(id(obj))
            stack.append((obj, depth, True))
            children = [*obj.keys(), *obj.values()] if isinstance(obj, dict) else obj
            stack.extend((c, depth + 1, False) for c in children)


def parse_yaml(text: str, source: str) -> Any:
    """Parse YAML 1.2 safely; every problem (syntax, tags, duplicate keys, ...) becomes a one-line UserError.

    `source` names the file (messages then say file:line) or the override.
    """
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.reader.ReaderError as e:  # a character YAML does not allow (NUL, most control characters)
        line = text[: e.position].count("\n") + 1
        where = source if source.startswith("override") else f"{source}:{line}"
        raise UserError(f"{where}: invalid YAML: character #x{e.character:04x} is not allowed") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark and not source.startswith("override") else source
        problem = getattr(e, "problem", None) or str(e)
        raise UserError(f"{where}: invalid YAML: {_one_line(problem)}") from None
    except RecursionError:
        raise UserError(f"{source}: invalid YAML: nested too deeply") from None
    except (ValueError, TypeError, KeyError, AttributeError, OverflowError) as e:  # a PyYAML corner we missed
        raise UserError(f"{source}: invalid YAML: {_one_line(str(e)) or type(e).__name__}") from None
    _audit(data, source)
    return data


# ---------------------------------------------------------------- loading


def shipped_configs() -> dict[str, Path]:
    """The shipped configs, file name (`mlp.yaml`) -> path, sorted by name."""
    try:
        return {p.name: p for p in sorted(CONFIGS_DIR.glob("*.yaml")) if p.is_file()}
    except OSError:  # the package directory unreadable: no shipped configs, said where they are looked up
        return {}


def describe_config(path: Path) -> str:
    """A config's one-line description for `--list-configs`: its first comment line.

    A first line that runs on into the next (no closing `.`, `)`, `!`, `?`) is cut at its first ": " (the
    shipped headers read "Title: details ..."), else marked with " ..."; '' when the file starts without a
    comment.
    """
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            first = f.readline(1000).removeprefix("\ufeff").strip()
    except OSError:
        return ""
    if not first.startswith("#"):
        return ""
    text = first.lstrip("#").strip()
    if not text or text.endswith((".", ")", "!", "?")):
        return text
    head, sep, _ = text.partition(": ")
    return head if sep else f"{text} ..."


def resolve_config_path(name_or_path: str) -> Path:
    """A file at the path given; otherwise a shipped config by bare name (`mlp`, `mlp.yaml`), from any directory.

    The path is cwd-relative with `~` expanded. A bare name is looked up among the shipped file names, never
    joined to CONFIGS_DIR, so `..` or an absolute path cannot reach outside it. A dangling symlink in the way
    of a shipped name is an error, not a silent fall-back to the shipped file.
    """
    if not name_or_path.strip():
        raise UserError("--config is empty: give a config file or a shipped config name (deepnets --list-configs)")
    shipped = shipped_configs()
    bare = "/" not in name_or_path and not (os.altsep and os.altsep in name_or_path)
    try:
        p = Path(os.path.expanduser(name_or_path))
        if p.is_file():
            return p
        dangling = p.is_symlink() and not p.exists()  # or a loop
        if bare and not dangling:
            hit = shipped.get(name_or_path) or shipped.get(f"{name_or_path}.yaml")
            if hit is not None:
                return hit
        kind = "a directory" if p.is_dir() else "a device, FIFO or socket" if p.exists() else None
        if dangling:
            kind = f"a symlink to {_show(os.readlink(p))}, which does not resolve to a file"
    except (OSError, ValueError) as e:  # a name too long for the file system, a NUL byte, no permission
        reason = e.strerror if isinstance(e, OSError) and e.strerror else "not a usable path"
        raise UserError(f"config {_show(name_or_path)}: {reason}") from None
    if kind is not None:
        raise UserError(f"config {_show(name_or_path)} is {kind}, not a config file")
    if bare:
        hint = _shipped_hint(name_or_path, shipped)
        raise UserError(f"config {_show(name_or_path)} not found (no such file, nor a shipped config); {hint}")
    base = Path(name_or_path).name
    name = base if base in shipped else f"{base}.yaml" if f"{base}.yaml" in shipped else None
    if name is not None:  # `configs/mlp.yaml` (the repo's path) from another directory
        raise UserError(
            f"config {_show(name_or_path)} not found (no such file); the shipped {name} is found by name from any "
            f"directory: --config {name}"
        )
    raise UserError(f"config {_show(name_or_path)} not found (no such file)")


def _shipped_hint(name: str, shipped: Mapping[str, Path]) -> str:
    """Did-you-mean over the shipped names (case-insensitive, with or without .yaml/.yml)."""
    if not shipped:
        return f"no shipped configs in {CONFIGS_DIR}"
    stems = {n.removesuffix(".yaml").lower(): n for n in shipped}
    query = name.lower().removesuffix(".yaml").removesuffix(".yml")
    near = difflib.get_close_matches(query, list(stems), n=1, cutoff=0.6)
    listing = "deepnets --list-configs shows the shipped configs"
    return f"did you mean {stems[near[0]]}? ({listing})" if near else listing


def read_config_text(path: Path) -> str:
    """The text of a config file: UTF-8 (a BOM is allowed), at most 1 MiB."""
    try:
        size = path.stat().st_size
        if size > _MAX_BYTES:
            raise UserError(f"{path}: {size:,} bytes is too large for a config file (at most {_MAX_BYTES:,})")
        data = path.read_bytes()
    except OSError as e:
        raise UserError(f"cannot read config {path}: {e.strerror or e}") from None
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text (byte 0x{data[e.start]:02x}); save the file as UTF-8") from None


def load_config(name_or_path: str | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply `dotted.key=value` overrides, validate."""
    raw: Any = {}
    if name_or_path is not None:
        path = resolve_config_path(name_or_path)
        raw = parse_yaml(read_config_text(path), str(path))
        if raw is None:
            raw = {}
        if not isinstance(raw, dict):
            raise UserError(f"{path}: the top level must be a mapping of sections, got {_show(raw)}")
        if path.resolve().parent != CONFIGS_DIR.resolve():  # a shipped config's relative paths mean the cwd
            _anchor_paths(raw, path.parent)
    apply_overrides(raw, overrides)
    return from_dict(raw)


# keys whose value may be an import path `file.py:Name`; one written in a config file is relative to that
# file's directory (an override, or a config made in code, is relative to the current directory)
IMPORT_PATH_KEYS = (("model", "arch"), ("optim", "name"))


def _anchor_paths(raw: dict[str, Any], base_dir: Path) -> None:
    from deepnets.imports import anchor

    for section, key in IMPORT_PATH_KEYS:
        sec = raw.get(section)
        if isinstance(sec, dict) and isinstance(sec.get(key), str):
            sec[key] = anchor(sec[key], base_dir)
    data = raw.get("data")  # the user's data file, like their module, lives beside the config that names it
    if isinstance(data, dict) and isinstance(data.get("path"), str) and data["path"]:
        target = os.path.expanduser(data["path"])
        data["path"] = target if os.path.isabs(target) else str(base_dir / target)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> None:
    """Set each `dotted.key=value` in `raw` (the value parsed as YAML); a later override wins."""
    for item in overrides:
        key, sep, value = item.partition("=")
        parts = key.split(".")
        if not sep or not key or any(not p.strip() for p in parts):
            raise UserError(f"override {_show(item)} must look like dotted.key=value")
        node = raw
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"override {_key_text(key)}: {'.'.join(parts[: i + 1])} is not a section")
            node = child
        node[parts[-1]] = parse_yaml(value, f"override {_key_text(key)}")


def from_dict(raw: Mapping[str, Any]) -> Config:
    """Validate a nested dict (a parsed config file) into a Config: types, ranges, then cross-field checks."""
    cfg = build_section(Config, raw, "")
    _task_defaults(cfg, raw)
    cfg.optim.name = canonical_name(cfg.optim.name)
    validate(cfg)
    return cfg


def build_section(cls: type, raw: Any, prefix: str) -> Any:
    if not isinstance(raw, Mapping):
        raise UserError(f"{prefix.rstrip('.') or 'config'} must be a mapping, got {_show(raw)}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    hints = typing.get_type_hints(cls)
    for key in raw:
        if key not in fields:
            near = difflib.get_close_matches(str(key), list(fields), n=1, cutoff=0.5)
            hint = f"; did you mean {prefix}{near[0]}?" if near else f"; valid keys: {', '.join(fields)}"
            raise UserError(f"unknown key {prefix}{_key_text(key)}{hint}")
    kwargs = {}
    for name, f in fields.items():
        if name not in raw:
            continue
        path = f"{prefix}{name}"
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = build_section(tp, raw[name] if raw[name] is not None else {}, f"{path}.")
        else:
            kwargs[name] = _check_field(raw[name], tp, f.metadata, path)
    return cls(**kwargs)


def _check_field(value: Any, tp: Any, meta: Mapping[str, Any], path: str) -> Any:
    """`value` converted to `tp` and checked against the field's metadata, or a UserError naming `path`."""
    out = _check(value, tp, path)
    _check_bounds(out, meta, path)
    if meta.get("path") and isinstance(out, str):
        out = _expand_path(out, path)
        if meta.get("absolute"):  # config.yaml records where the data was, whatever the cwd of a later resume
            out = os.path.abspath(out)
    if "check" in meta and out is not None:
        checked = meta["check"](out, path)  # a check may also normalise (model.arch: an absolute path)
        if checked is not None:
            out = checked
    return out


def _expand_path(value: str, path: str) -> str:
    """`~` expanded once, here, so config.yaml records the path the run really used."""
    if not value or "\0" in value:
        raise UserError(f"{path}: {_show(value)} is not a path (empty or has a NUL character)")
    out = os.path.expanduser(value)
    if out.startswith("~"):
        raise UserError(f"{path}: cannot expand {_show(value.split('/')[0])} (no such user, or HOME is not set)")
    return out


# ---------------------------------------------------------------- types and bounds


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _show(value: Any, limit: int = 60) -> str:
    """repr of a value for a message: one line, at most `limit` characters."""
    try:
        text = repr(value)
    except ValueError:  # an int with more digits than Python prints
        text = f"<int of {value.bit_length()} bits>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _key_text(key: Any) -> str:
    """A key as written in a message: plain if it looks like a key, else its repr."""
    if isinstance(key, str) and re.fullmatch(r"[\w./-]{1,60}", key):
        return key
    return _show(key)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        args = typing.get_args(tp)
        return str(args[0]) if len(args) == 1 else "one of " + ", ".join(str(a) for a in args)
    if origin in (Union, types.UnionType):
        return " or ".join(_type_name(a) for a in typing.get_args(tp))
    if origin in (list, dict):
        return f"{origin.__name__}[{', '.join(_type_name(a) for a in typing.get_args(tp))}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _literals(tp: Any) -> list[str]:
    """Every allowed Literal value inside `tp` (for "did you mean")."""
    if typing.get_origin(tp) is Literal:
        return [str(a) for a in typing.get_args(tp)]
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [v for a in typing.get_args(tp) for v in _literals(a)]
    return []


def _hint(value: Any, tp: Any) -> str:
    if isinstance(value, str):
        near = difflib.get_close_matches(value, _literals(tp), n=1, cutoff=0.6)
        if near:
            return f"; did you mean {near[0]}?"
        if value.lower() in ("yes", "no", "on", "off", "y", "n") and bool in _flat_types(tp):
            return " (YAML 1.2: only true and false are booleans)"
        if re.fullmatch(r"[-+]?[0-9][0-9_:]*(\.[0-9_]*)?", value) and {int, float} & set(_flat_types(tp)):
            return " (YAML 1.2 numbers have no '_' separators and no base-60 ':')"
    elif value is not None and not isinstance(value, list | dict) and str in _flat_types(tp):
        return " (quote it to keep it a string)"
    return ""


def _flat_types(tp: Any) -> list[Any]:
    if typing.get_origin(tp) in (Union, types.UnionType):
        return [t for a in typing.get_args(tp) for t in _flat_types(a)]
    return [tp]


def _check(value: Any, tp: Any, path: str) -> Any:
    """Return `value` converted to `tp`, or raise a UserError naming `path` and what is allowed."""
    ok, out = _match(value, tp)
    if not ok:
        if typing.get_origin(tp) is dict and isinstance(value, dict):  # name the key, not the whole mapping
            key_tp = typing.get_args(tp)[0]
            bad = next((k for k in value if not _match(k, key_tp)[0]), None)
            if bad is not None:
                what = "string" if key_tp is str else _type_name(key_tp)
                raise UserError(f"{path}: key {_show(bad)} is not a {what}")
        raise UserError(f"{path}: expected {_type_name(tp)}, got {_show(value)}{_hint(value, tp)}")
    return out


def _match(value: Any, tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if tp is Any:
        return True, value
    if origin is Literal:
        for allowed in typing.get_args(tp):
            # precision: 32 in YAML is an int; the Literal holds the string "32"
            if type(value) is type(allowed) and value == allowed:
                return True, allowed
            numeric = isinstance(value, int) and not isinstance(value, bool)
            if isinstance(allowed, str) and numeric and str(value) == allowed:
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
        key_tp, val_tp = typing.get_args(tp)
        if not isinstance(value, dict):
            return False, None
        keys = [_match(k, key_tp) for k in value]
        items = {k: _match(v, val_tp) for k, v in value.items()}
        ok = all(ok for ok, _ in keys) and all(ok for ok, _ in items.values())
        return ok, {k: v for k, (_, v) in items.items()}
    if tp is type(None):
        return value is None, None
    if tp is bool:
        return isinstance(value, bool), value
    if tp is int:
        return isinstance(value, int) and not isinstance(value, bool), value
    if tp is float:
        ok = isinstance(value, int | float) and not isinstance(value, bool)
        try:
            return ok, float(value) if ok else None
        except OverflowError:  # an int beyond float's range
            return False, None
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
    """Every number finite, within the field's bounds (each item of a list), and lists of the right length."""
    if isinstance(value, list):
        if "n_items" in meta and len(value) != meta["n_items"]:
            n, want = len(value), meta["n_items"]
            raise UserError(f"{path}: {_show(value)} has {n} value{'' if n == 1 else 's'} (allowed: exactly {want})")
        if "min_items" in meta and len(value) < meta["min_items"]:
            raise UserError(f"{path}: {_show(value)} is empty (allowed: at least {meta['min_items']} value)")
        for i, v in enumerate(value):
            _check_number(v, meta, f"{path}[{i}]")
    else:
        _check_number(value, meta, path)


def _check_number(v: Any, meta: Mapping[str, Any], path: str) -> None:
    if not isinstance(v, int | float) or isinstance(v, bool):
        return
    rng = meta.get("allowed") or " and ".join(f"{s} {_show(meta[k])}" for k, (s, _) in _BOUNDS.items() if k in meta)
    allowed = f" (allowed: {rng})" if rng else ""
    if isinstance(v, float) and not math.isfinite(v):
        raise UserError(f"{path}: {v} is not a finite number{allowed}")
    if isinstance(v, int) and not -(2**63) <= v < 2**63:
        raise UserError(f"{path}: {_show(v)} does not fit in 64 bits{allowed}")
    for key, (_, ok) in _BOUNDS.items():
        if key in meta and not ok(v, meta[key]):
            raise UserError(f"{path}: {v!r} is out of range{allowed}")


# ---------------------------------------------------------------- cross-field checks

# The metrics a run logs while it fits, per task (deepnets.tasks.TASKS), each with the mode that means
# "better": a monitor must name one of these, with that mode (checkpoint.mode's default max would keep the
# worst val/loss checkpoint). Test metrics exist only after the fit; sweep.metric may name them too.
LOGGED_METRICS: dict[str, dict[str, Literal["min", "max"]]] = {
    name: logged_metrics(name, ("train", "val")) for name in TASKS
}


def task_of(cfg: Config) -> str:
    """The task a config trains (`task:`)."""
    return cfg.task


def _task_defaults(cfg: Config, raw: Mapping[str, Any]) -> None:
    """Monitor defaults that fit the task: where the config leaves checkpoint.monitor / mode unset, a
    regression run watches val/loss (min); classification keeps the fields' defaults (val/acc, max)."""
    if cfg.task == "classification":  # the fields' own defaults
        return
    task = TASKS[cfg.task]
    given = raw.get("checkpoint") if isinstance(raw.get("checkpoint"), Mapping) else {}
    if "monitor" not in given:
        cfg.checkpoint.monitor = task.monitor
    if "mode" not in given:  # the mode the monitored metric needs
        cfg.checkpoint.mode = LOGGED_METRICS[cfg.task].get(cfg.checkpoint.monitor, task.monitor_mode)


def _check_task(cfg: Config) -> None:
    """Settings that only one task has."""
    o, loss = cfg.optim, cfg.optim.loss
    if loss != "auto" and loss not in TASKS[cfg.task].losses:
        allowed = ", ".join(["auto", *TASKS[cfg.task].losses])
        raise UserError(f"optim.loss: {loss} is not a loss for task {cfg.task} (allowed: {allowed})")
    if cfg.task == "regression":
        for key, value in (("optim.label_smoothing", o.label_smoothing), ("data.label_noise", cfg.data.label_noise)):
            if value:
                raise UserError(f"{key}: {value} acts on class labels; task regression has none (set it to 0)")
        for key in ("lr_find", "lr_probe"):
            if getattr(cfg.trainer, key):
                raise UserError(f"trainer.{key}: measures the classification loss; not available for task regression")


def validation_off(cfg: Config) -> str | None:
    """Why the run has no validation (the setting to blame), or None when it validates."""
    t = cfg.trainer
    if cfg.data.val_fraction == 0:
        return f"data.val_fraction={cfg.data.val_fraction}"
    if t.limit_val_batches == 0:
        return f"trainer.limit_val_batches={t.limit_val_batches}"
    if not t.fast_dev_run and t.max_epochs != -1 and t.check_val_every_n_epoch > t.max_epochs:
        return f"trainer.check_val_every_n_epoch={t.check_val_every_n_epoch} > trainer.max_epochs={t.max_epochs}"
    return None


def _check_monitor(cfg: Config, key: str, metric: str, mode: str) -> None:
    logged = LOGGED_METRICS[task_of(cfg)]
    if metric not in logged:
        near = difflib.get_close_matches(metric, logged, n=1, cutoff=0.5)
        hint = f"; did you mean {near[0]}?" if near else ""
        other = [t for t, m in LOGGED_METRICS.items() if metric in m]
        if other:  # a metric of the other task
            hint = f" (task {task_of(cfg)}; {metric} is {other[0]}'s)"
        raise UserError(f"{key}: {_show(metric)} is not a metric this run logs{hint} (allowed: {', '.join(logged)})")
    off = validation_off(cfg)
    if metric.startswith("val/") and off is not None:
        train = ", ".join(m for m in logged if m.startswith("train/"))
        raise UserError(f"{key}: {metric} needs a validation split, but {off} (allowed without one: {train})")
    if mode != logged[metric]:
        section = key.split(".")[0]
        best = "lower" if logged[metric] == "min" else "higher"
        raise UserError(
            f"{section}.mode: {mode} with {key}={metric} would keep the worst value ({best} is better); "
            f"set {section}.mode={logged[metric]}"
        )


def validate(cfg: Config) -> None:
    """Checks that span several keys; each error names the key to change."""
    t, s = cfg.trainer, cfg.scheduler
    _check_task(cfg)
    o = cfg.optim
    check_optimizer(o.name, o.kwargs, o.lr, o.weight_decay > 0 or o.layer_decay is not None)
    check_data_keys(cfg.data, cfg.task)
    if s.name == "plateau":
        if s.warmup_steps:
            raise UserError("scheduler.warmup_steps: not supported with scheduler.name=plateau")
        off = validation_off(cfg)
        if off is not None:
            raise UserError(f"scheduler.name: plateau watches val/loss, but there is no validation split ({off})")
    if s.name in ("cosine", "onecycle") and t.max_epochs == -1 and t.max_steps == -1:
        raise UserError(
            f"scheduler.name: {s.name} needs the length of the run; set trainer.max_epochs or trainer.max_steps"
        )
    if t.lr_find and t.lr_probe:
        raise UserError("trainer.lr_find and trainer.lr_probe both set: choose one")
    if cfg.early_stopping.enabled:
        _check_monitor(cfg, "early_stopping.monitor", cfg.early_stopping.monitor, cfg.early_stopping.mode)
    if cfg.checkpoint.enabled:
        _check_monitor(cfg, "checkpoint.monitor", cfg.checkpoint.monitor, cfg.checkpoint.mode)


# ---------------------------------------------------------------- devices that exist


@dataclass
class Visible:
    """The accelerators this process can use."""

    cuda: int = 0  # CUDA devices
    mps: bool = False
    bf16: bool = True  # the CUDA device autocasts to bfloat16 (what torch.autocast checks)
    cuda_name: str = ""


def visible_devices(ask_bf16: bool = False) -> Visible:
    """What this process can use. Counting CUDA devices does not initialise CUDA (Lightning counts
    through NVML); asking about bfloat16 does, so it is asked only when the run would use it."""
    from lightning.pytorch.accelerators import CUDAAccelerator, MPSAccelerator

    cuda = CUDAAccelerator.auto_device_count() if CUDAAccelerator.is_available() else 0
    mps = MPSAccelerator.is_available()
    if cuda and ask_bf16 and not mps:
        import torch

        return Visible(cuda, mps, torch.cuda.is_bf16_supported(), torch.cuda.get_device_name())
    return Visible(cuda, mps)


_DEVICE_NAMES = {"cpu": "the CPU", "cuda": "CUDA", "mps": "MPS"}


def check_devices(t: TrainerConfig, visible: Visible) -> str:
    """The accelerator `t` resolves to on a machine with `visible`; a UserError for what cannot run there."""
    acc = t.accelerator
    if acc in ("gpu", "cuda") and not visible.cuda and not (acc == "gpu" and visible.mps):
        raise UserError(f"trainer.accelerator={acc}: no CUDA device is visible")
    if acc == "mps" and not visible.mps:
        raise UserError("trainer.accelerator=mps: no MPS device is available (Apple silicon only)")
    # auto and gpu in Lightning's order: MPS, then CUDA, then the CPU
    auto = "mps" if visible.mps else "cuda" if visible.cuda else "cpu"
    resolved = auto if acc in ("auto", "gpu") else acc
    d = t.devices
    shown = f"trainer.devices={d}"
    if resolved == "cpu" and isinstance(d, list):
        raise UserError(f"{shown}: device ids need a GPU; on the CPU give a process count (e.g. 2)")
    if resolved == "cuda":
        n = visible.cuda
        if isinstance(d, int) and d > n:
            raise UserError(f"{shown}: only {n} CUDA device{'s are' if n > 1 else ' is'} visible")
        if isinstance(d, list) and max(d) >= n:
            raise UserError(f"{shown}: CUDA device {max(d)} does not exist (visible: {', '.join(map(str, range(n)))})")
    if resolved == "mps":
        if d not in ("auto", 1, [0]):
            raise UserError(f"{shown}: an MPS machine has one device (allowed: auto, 1, [0])")
        if t.strategy != "auto" or t.num_nodes > 1:
            raise UserError(f"trainer.strategy={t.strategy}: MPS runs on one device only (allowed: auto)")
    if t.strategy == "fsdp":
        if resolved != "cuda":
            raise UserError(f"trainer.strategy=fsdp: needs CUDA devices, but the run uses {_DEVICE_NAMES[resolved]}")
        if t.precision == "64":
            raise UserError("trainer.precision=64: not supported with trainer.strategy=fsdp")
    if t.precision == "16-mixed" and resolved == "cpu":
        # Lightning would warn and train in bf16 while config.yaml says 16-mixed
        raise UserError(
            "trainer.precision=16-mixed: float16 mixed precision needs a GPU; on the CPU use bf16-mixed or 32"
        )
    if t.precision == "bf16-mixed" and resolved == "cuda" and not visible.bf16:
        raise UserError(
            f"trainer.precision=bf16-mixed: {visible.cuda_name or 'this GPU'} has no bfloat16; use 16-mixed"
        )
    if t.precision == "64" and resolved == "mps":
        raise UserError("trainer.precision=64: MPS has no float64 (allowed there: 32, 16-mixed, bf16-mixed)")
    return resolved


def check_runtime(cfg: Config) -> None:
    """Fail with one line, before anything is written, on trainer settings this machine cannot run.

    The known cases get their own message (check_devices); anything else Lightning's Trainer
    refuses at construction is caught by constructing one with the same settings (~20 ms;
    nothing is written: no logger, no checkpointing).
    """
    import logging

    import lightning as L

    from deepnets.data import check_data_files

    t = cfg.trainer
    check_data_files(cfg.data)  # the user's data files exist and are of their kind, before anything is written
    check_devices(t, visible_devices(ask_bf16=t.precision == "bf16-mixed"))
    quiet = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [q.level for q in quiet]
    try:
        for q in quiet:
            q.setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            L.Trainer(
                accelerator=t.accelerator,
                devices=t.devices,
                strategy=t.strategy,
                num_nodes=t.num_nodes,
                precision=t.lightning_precision,  # type: ignore[arg-type]
                max_epochs=t.max_epochs,
                max_steps=t.max_steps,
                log_every_n_steps=t.log_every_n_steps,
                fast_dev_run=t.fast_dev_run,
                overfit_batches=t.overfit_batches,
                limit_val_batches=t.limit_val_batches,
                check_val_every_n_epoch=t.check_val_every_n_epoch,
                gradient_clip_val=cfg.optim.grad_clip_norm,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                num_sanity_val_steps=0,
            )
    except Exception as e:  # Lightning raises ValueError, TypeError, MisconfigurationException, ...
        raise UserError(
            f"trainer: Lightning refuses accelerator={t.accelerator}, devices={t.devices}, strategy={t.strategy}, "
            f"num_nodes={t.num_nodes}, precision={t.precision}: {_one_line(str(e)) or type(e).__name__}"
        ) from None
    finally:
        for q, level in zip(quiet, levels, strict=True):
            q.setLevel(level)


# ---------------------------------------------------------------- writing


class _Dumper(yaml.SafeDumper):
    """Writes what `load_config` reads back equal: sections in block style, short lists of scalars
    in flow style, and any string that YAML 1.1 or 1.2 would read as something else quoted."""


# PyYAML quotes a string when its own (1.1) resolvers would read it as another type; adding the
# 1.2 resolvers quotes the rest ('1e5', '0o17'), so either reading gives the string back.
for _tag, _regex, _first in _CORE_RESOLVERS:
    _Dumper.add_implicit_resolver(_tag, _regex, _first)


def _represent_dict(dumper: yaml.SafeDumper, data: dict[Any, Any]) -> yaml.Node:
    return dumper.represent_mapping(_TAG + "map", data, flow_style=False)


def _represent_list(dumper: yaml.SafeDumper, data: list[Any]) -> yaml.Node:
    flat = all(isinstance(v, int | float | str | type(None)) for v in data) and len(data) <= 16
    return dumper.represent_sequence(_TAG + "seq", data, flow_style=flat)


_Dumper.add_representer(dict, _represent_dict)
_Dumper.add_representer(list, _represent_list)


def to_yaml(cfg: Config, threads_used: int | None = None) -> str:
    """The config as YAML that `load_config` reads back equal (a run's config.yaml). `threads_used`: the
    count `trainer.threads: auto` resolved to in this run, written as a comment beside `auto`, which stays
    (a comment, so that the file loaded back still means auto on another machine)."""
    text = yaml.dump(cfg.to_dict(), Dumper=_Dumper, sort_keys=False, allow_unicode=True, width=100)
    if threads_used is None or cfg.trainer.threads != "auto":
        return text
    lines, section = text.splitlines(), None
    for i, line in enumerate(lines):
        if not line.startswith(" "):
            section = line.rstrip(":")
        elif section == "trainer" and line == "  threads: auto":
            s = "" if threads_used == 1 else "s"
            lines[i] = f"{line}  # this run used {threads_used} thread{s} (trainer.threads: N reproduces it)"
    return "\n".join(lines) + "\n"


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
