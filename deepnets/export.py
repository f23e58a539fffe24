"""Pickle-free model export: the best weights as `.safetensors` beside the resolved config.

`preprocess.safetensors` carries what predict and evaluate need besides the weights: the data's
preprocessing state (standardisation / whitening statistics as tensors; class names, column names and
shapes as JSON in the file's metadata) and the task module's buffers (a regression's target_mean /
target_std). safetensors holds only tensors and strings: loading it runs nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_model, save_file, save_model
from torch import Tensor, nn

from deepnets.checkpoint import first_mismatch, load_checkpoint
from deepnets.config import Config, load_config
from deepnets.data import InMemoryDataModule
from deepnets.errors import UserError
from deepnets.models import build_model
from deepnets.module import TASK_BUFFERS, TaskModule

WEIGHTS, CONFIG, PREPROCESS = "model.safetensors", "config.yaml", "preprocess.safetensors"
DATA_STATE = InMemoryDataModule.__qualname__  # the key Lightning stores a datamodule's state_dict under
BUFFERS = TASK_BUFFERS  # the task module's own buffers that predictions need
_TENSORS = ("mean", "std", "zca_mean", "zca_W")


def _input_spec(cfg: Config, state: dict[str, Any] | None = None) -> tuple[tuple[int, ...], int]:
    """(input shape, outputs) from the saved preprocessing state, else from the config's dataset."""
    if state:
        return tuple(state["input_shape"]), int(state["num_outputs"])
    dm = InMemoryDataModule(cfg.data, cfg.seed, task=cfg.task)
    return dm.input_shape, dm.num_outputs


def checkpoint_parts(ckpt: dict[str, Any]) -> tuple[dict[str, Any] | None, dict[str, Tensor]]:
    """The data module's preprocessing state (None in checkpoints from before it was saved) and the
    module's prediction buffers of a loaded checkpoint."""
    state = ckpt.get(DATA_STATE)
    buffers = {k: v for k, v in ckpt["state_dict"].items() if k in BUFFERS}
    return (state if isinstance(state, dict) and state else None), buffers


def save_preprocess(path: Path, state: dict[str, Any], buffers: dict[str, Tensor]) -> None:
    tensors = {k: state[k].contiguous() for k in _TENSORS if state.get(k) is not None}
    tensors.update({k: v.contiguous() for k, v in buffers.items()})
    plain = {k: v for k, v in state.items() if k not in _TENSORS}
    save_file(tensors, str(path), metadata={"state": json.dumps(plain)})


def load_preprocess(path: Path) -> tuple[dict[str, Any], dict[str, Tensor]]:
    try:
        with safe_open(str(path), framework="pt") as f:
            plain = json.loads((f.metadata() or {})["state"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    except Exception as e:
        raise UserError(f"{path}: cannot load: {str(e).splitlines()[0]}") from None
    if not isinstance(plain, dict) or "input_shape" not in plain:
        raise UserError(f"{path}: not a deepnets preprocessing file (no input_shape)")
    state = {**plain, **{k: tensors.get(k) for k in _TENSORS}}
    return state, {k: v for k, v in tensors.items() if k in BUFFERS}


def best_checkpoint(run_dir: Path) -> Path:
    """The checkpoint `--export` takes: the best one metrics.json names, else last.ckpt when it names none.

    `best_checkpoint` is a path relative to the run directory (older runs wrote an absolute one: it is taken
    as it is, or, where the run directory has moved since, as the file of that name in checkpoints/). A best
    checkpoint that is named but missing, and a metrics.json that cannot be read, are errors: exporting the
    last weights instead would hand on a model other than the one the run reported.
    """
    last = run_dir / "checkpoints" / "last.ckpt"
    metrics_path = run_dir / "metrics.json"
    if not metrics_path.is_file():
        print(f"warning: {run_dir} has no metrics.json (the run did not finish): exporting {last}", file=sys.stderr)
        return last
    try:
        metrics = json.loads(metrics_path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{metrics_path} is corrupt ({str(e).splitlines()[0]}): it names the best checkpoint; "
            f"repair it, or delete it to export {last}"
        ) from None
    if not isinstance(metrics, dict):
        raise UserError(f"{metrics_path} is not a deepnets metrics.json (top level is {type(metrics).__name__})")
    best = metrics.get("best_checkpoint")
    if best is None:
        return last
    if not isinstance(best, str) or not best:
        raise UserError(f"{metrics_path}: best_checkpoint is {best!r}, not a path")
    named = Path(best)
    candidates = [named] if named.is_absolute() else [run_dir / named]
    if named.is_absolute():  # an absolute path from before the run directory moved
        candidates.append(run_dir / "checkpoints" / named.name)
    for path in candidates:
        if path.is_file():
            return path
    raise UserError(
        f"{metrics_path} names the best checkpoint {best}, which does not exist (looked for "
        f"{' and '.join(map(str, candidates))}); refusing to export {last} in its place"
    )


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `<run_dir>/export/{model.safetensors, config.yaml}` from the run's best (else last) checkpoint.

    Exports are for sharing: the files are 0644 and the folder 0755 whatever the umask.
    """
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG})")
    cfg = load_config(str(run_dir / CONFIG))
    ckpt_path = best_checkpoint(run_dir)
    ckpt = load_checkpoint(ckpt_path)
    state = ckpt["state_dict"]
    data_state, buffers = checkpoint_parts(ckpt)
    model = build_model(cfg.model, *_input_spec(cfg, data_state))
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    problem = first_mismatch(weights, model)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt_path} does not fit the model of {run_dir / CONFIG}: {problem}")
    model.load_state_dict(weights)
    out = Path(out_dir) if out_dir else run_dir / "export"
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o755)
        save_model(model, str(out / WEIGHTS), metadata={"checkpoint": str(ckpt_path)})
        shutil.copyfile(run_dir / CONFIG, out / CONFIG)
        names = [WEIGHTS, CONFIG]
        if data_state is not None:
            save_preprocess(out / PREPROCESS, data_state, buffers)
            names.append(PREPROCESS)
        for name in names:
            os.chmod(out / name, 0o644)
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e.strerror or e}") from None
    return out


@dataclass
class Exported:
    """A model ready to apply: weights, config, the data's preprocessing state (None: an export from
    before it was saved, of a built-in dataset) and the task's buffers."""

    model: nn.Module
    cfg: Config
    state: dict[str, Any] | None
    buffers: dict[str, Tensor]


def load_export(export_dir: str | Path) -> Exported:
    """Rebuild the model from `config.yaml` and fill it from the .safetensors files: no pickle involved."""
    export_dir = Path(export_dir)
    for name in (WEIGHTS, CONFIG):
        if not (export_dir / name).is_file():
            raise UserError(f"{export_dir} has no {name}; make one with `deepnets --export RUN_DIR`")
    cfg = load_config(str(export_dir / CONFIG))
    state, buffers = load_preprocess(export_dir / PREPROCESS) if (export_dir / PREPROCESS).is_file() else (None, {})
    if state is None and cfg.data.name not in DATASETS_KNOWN_WITHOUT_FILES:
        raise UserError(f"{export_dir} has no {PREPROCESS} (the data's preprocessing); export the run again")
    model = build_model(cfg.model, *_input_spec(cfg, state))
    try:
        load_model(model, str(export_dir / WEIGHTS))
    except Exception as e:
        raise UserError(f"{export_dir / WEIGHTS}: cannot load: {str(e).splitlines()[0]}") from None
    return Exported(model.eval(), cfg, state, buffers)


DATASETS_KNOWN_WITHOUT_FILES = ("digits", "mnist", "fashion_mnist", "cifar10", "synthetic")


def load_exported(export_dir: str | Path) -> tuple[nn.Module, Config]:
    """The model and config of an export (see `load_export`)."""
    e = load_export(export_dir)
    return e.model, e.cfg


def outputs(model: nn.Module, x: Tensor, task: str, buffers: dict[str, Tensor]) -> Tensor:
    """What the run's module predicts from preprocessed inputs: class probabilities (N, C), or
    regression outputs in the target's own units (N, k) (the model's standardised outputs times
    target_std plus target_mean, where the module standardised the targets)."""
    return TaskModule(model, task=task, **_task_buffers(task, buffers, None)).predict_outputs(x)


def _task_buffers(task: str, buffers: dict[str, Tensor], where: str | Path | None) -> dict[str, Tensor]:
    """The TaskModule's target statistics from an export's preprocess file (regression needs them)."""
    if task != "regression":
        return {}
    if set(BUFFERS) - set(buffers):
        raise UserError(
            f"{where or 'the export'}: holds no target statistics (task regression); export the run again "
            "(deepnets --export RUN_DIR)"
        )
    return {k: buffers[k] for k in BUFFERS}


@torch.no_grad()
def evaluate(export_dir: str | Path) -> dict[str, float]:
    """The test-split metrics of an exported model (test/loss and test/acc, or test/loss, /mse, /mae, /r2), in
    plain PyTorch through the task module's own metric objects (no Trainer)."""
    e = load_export(export_dir)
    cfg = e.cfg
    dm = InMemoryDataModule(cfg.data, cfg.seed, task=cfg.task)
    if e.state is not None:
        dm.load_state_dict(e.state)  # setup checks that the data read now is what the model was trained on
    dm.setup("test")
    module = TaskModule(e.model, task=cfg.task, loss=cfg.optim.loss, **_task_buffers(cfg.task, e.buffers, export_dir))
    return module.evaluate(dm.test_dataloader())
