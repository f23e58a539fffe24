"""Pickle-free model export: the best weights as `.safetensors` beside the resolved config."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from deepnets.checkpoint import first_mismatch, load_checkpoint
from deepnets.config import Config, load_config
from deepnets.data import InMemoryDataModule
from deepnets.errors import UserError
from deepnets.models import build_model
from deepnets.module import TaskModule, read_task_metadata, task_metadata

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


def _input_spec(cfg: Config) -> tuple[tuple[int, ...], int]:
    dm = InMemoryDataModule(cfg.data, cfg.seed, task=cfg.task)
    return dm.input_shape, dm.num_outputs


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
    state = load_checkpoint(ckpt_path)["state_dict"]
    model = build_model(cfg.model, *_input_spec(cfg))
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    problem = first_mismatch(weights, model)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt_path} does not fit the model of {run_dir / CONFIG}: {problem}")
    model.load_state_dict(weights)
    out = Path(out_dir) if out_dir else run_dir / "export"
    try:
        out.mkdir(parents=True, exist_ok=True)
        os.chmod(out, 0o755)
        save_model(model, str(out / WEIGHTS), metadata={"checkpoint": str(ckpt_path), **task_metadata(state)})
        shutil.copyfile(run_dir / CONFIG, out / CONFIG)
        for name in (WEIGHTS, CONFIG):
            os.chmod(out / name, 0o644)
    except OSError as e:
        raise UserError(f"cannot write the export to {out}: {e.strerror or e}") from None
    return out


def load_exported(export_dir: str | Path) -> tuple[nn.Module, Config]:
    """Rebuild the model from `config.yaml` and fill it from `model.safetensors`: no pickle involved."""
    export_dir = Path(export_dir)
    for name in (WEIGHTS, CONFIG):
        if not (export_dir / name).is_file():
            raise UserError(f"{export_dir} has no {name}; make one with `deepnets --export RUN_DIR`")
    cfg = load_config(str(export_dir / CONFIG))
    model = build_model(cfg.model, *_input_spec(cfg))
    try:
        load_model(model, str(export_dir / WEIGHTS))
    except Exception as e:
        raise UserError(f"{export_dir / WEIGHTS}: cannot load: {str(e).splitlines()[0]}") from None
    return model.eval(), cfg


@torch.no_grad()
def evaluate(export_dir: str | Path) -> dict[str, float]:
    """The test-split metrics of an exported model (test/loss and test/acc, or test/loss, /mse, /mae, /r2), in
    plain PyTorch through the task module's own metric objects (no Trainer)."""
    model, cfg = load_exported(export_dir)
    stats = read_task_metadata(Path(export_dir) / WEIGHTS, cfg.task)
    dm = InMemoryDataModule(cfg.data, cfg.seed, task=cfg.task)
    dm.setup("test")
    module = TaskModule(model, task=cfg.task, loss=cfg.optim.loss, **stats)
    return module.evaluate(dm.test_dataloader())
