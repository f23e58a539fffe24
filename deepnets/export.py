"""Pickle-free model export: the best weights as `.safetensors` beside the resolved config."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from deepnets.checkpoint import load_checkpoint
from deepnets.config import Config, load_config
from deepnets.data import InMemoryDataModule
from deepnets.errors import UserError
from deepnets.models import build_model

WEIGHTS, CONFIG = "model.safetensors", "config.yaml"


def _input_spec(cfg: Config) -> tuple[tuple[int, ...], int]:
    dm = InMemoryDataModule(cfg.data, cfg.seed)
    return dm.input_shape, dm.num_classes


def export_run(run_dir: str | Path, out_dir: str | Path | None = None) -> Path:
    """Write `<run_dir>/export/{model.safetensors, config.yaml}` from the run's best (else last) checkpoint."""
    run_dir = Path(run_dir)
    if not (run_dir / CONFIG).is_file():
        raise UserError(f"{run_dir} is not a run directory (no {CONFIG})")
    cfg = load_config(str(run_dir / CONFIG))
    best = None
    if (run_dir / "metrics.json").is_file():
        best = json.loads((run_dir / "metrics.json").read_text()).get("best_checkpoint")
    ckpt_path = Path(best) if best and Path(best).is_file() else run_dir / "checkpoints" / "last.ckpt"
    state = load_checkpoint(ckpt_path)["state_dict"]
    model = build_model(cfg.model, *_input_spec(cfg))
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    model.load_state_dict(weights)
    out = Path(out_dir) if out_dir else run_dir / "export"
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, str(out / WEIGHTS), metadata={"checkpoint": str(ckpt_path)})
    shutil.copyfile(run_dir / CONFIG, out / CONFIG)
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
    """Test-split loss and accuracy of an exported model, in plain PyTorch."""
    model, cfg = load_exported(export_dir)
    dm = InMemoryDataModule(cfg.data, cfg.seed)
    dm.setup("test")
    loss, correct, n = 0.0, 0, 0
    for x, y in dm.test_dataloader():
        logits = model(x)
        loss += float(torch.nn.functional.cross_entropy(logits, y, reduction="sum"))
        correct += int((logits.argmax(1) == y).sum())
        n += len(y)
    return {"test/loss": loss / n, "test/acc": correct / n}
