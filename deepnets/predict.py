"""`deepnets --predict RUN_DIR|EXPORT_DIR --input FILE.csv|FILE.npz|FOLDER [--output FILE.csv]`.

Applies a trained model to new inputs with the training run's preprocessing: the statistics, class
names and column names come from the run's checkpoint (loaded with weights_only=True) or from an
export's `preprocess.safetensors`; the inputs are read by the same readers as the training data
(`deepnets.userdata`) and go through `deepnets.data.preprocess`.

Output: CSV, one row per input, in input order: `id` (a CSV's 1-based file line, an npz's row
index, an image's path below the folder), then for classification `prediction` (the class name)
and `p_<class>` for every class; for regression one column per target, named after the training
CSV's target columns (`y` / `y_<i>` otherwise). To stdout, or to `--output FILE`, which must not
exist yet (predict never overwrites a file) and is written whole or not at all.
"""

from __future__ import annotations

import csv
import io
import os
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deepnets import userdata
from deepnets.checkpoint import first_mismatch, load_checkpoint
from deepnets.config import Config, load_config
from deepnets.data import InMemoryDataModule, preprocess
from deepnets.errors import UserError
from deepnets.export import CONFIG, WEIGHTS, _input_spec, best_checkpoint, checkpoint_parts, load_export, outputs
from deepnets.models import build_model

BATCH = 1024  # inputs per forward pass (bounds the float copy of a large input)


@dataclass
class Predictor:
    model: nn.Module
    cfg: Config
    state: dict[str, Any]
    buffers: dict[str, Tensor]


def load_predictor(path: str | Path) -> Predictor:
    """The model + preprocessing of an export directory, or of a run directory's best (else last) checkpoint."""
    p = Path(path)
    if (p / WEIGHTS).is_file():
        e = load_export(p)
        state = e.state if e.state is not None else _state_from_data(e.cfg)
        return Predictor(e.model, e.cfg, state, e.buffers)
    if not (p / CONFIG).is_file():
        raise UserError(f"--predict {p}: neither a run directory (no {CONFIG}) nor an export (no {WEIGHTS})")
    cfg = load_config(str(p / CONFIG))
    ckpt_path = best_checkpoint(p)
    ckpt = load_checkpoint(ckpt_path)
    state, buffers = checkpoint_parts(ckpt)
    if state is None:  # a checkpoint from before the state was saved: a built-in dataset, read again
        state = _state_from_data(cfg)
    model = build_model(cfg.model, *_input_spec(cfg, state))
    weights = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    problem = first_mismatch(weights, model)
    if problem is not None:
        raise UserError(f"checkpoint {ckpt_path} does not fit the model of {p / CONFIG}: {problem}")
    model.load_state_dict(weights)
    return Predictor(model.eval(), cfg, state, buffers)


def _state_from_data(cfg: Config) -> dict[str, Any]:
    dm = InMemoryDataModule(cfg.data, cfg.seed, task=cfg.task)
    dm.setup("predict")
    assert dm.splits is not None
    return dm.splits.state


def read_inputs(path: str | Path, state: dict[str, Any]) -> tuple[Tensor, list[str]]:
    """Raw inputs (N, *input_shape) as the training data was read (float32, or uint8 images), with ids."""
    p = Path(path)
    shape = tuple(state["input_shape"])
    if not p.exists():
        raise UserError(f"--input {p} does not exist")
    if p.is_dir():
        if len(shape) != 3 or shape[0] not in (1, 3):
            raise UserError(f"--input {p}: a folder of images, but the model takes inputs of shape {shape}")
        files = userdata.image_files(p)
        if not files:
            raise UserError(f"--input {p}: no .jpg/.jpeg/.png images below it")
        x = userdata.decode_images(files, shape[1:], channels=shape[0])
        return x, [f.relative_to(p).as_posix() for f in files]
    suffix = p.suffix.lower()
    if suffix == ".csv":
        features = state.get("features")
        if not features:
            raise UserError(
                f"--input {p}: the model was trained on data.name={state.get('dataset')}, not on a CSV's columns; "
                "give an .npz (or an image folder)"
            )
        x, ids = userdata.read_csv_inputs(str(p), features)
    elif suffix == ".npz":
        key = state.get("x_key") or "x"
        with userdata.open_npz(str(p)) as npz:
            a = userdata.npz_array(npz, key, p, "--input")
        x = userdata.npz_inputs(a, p, key)
        if not state.get("uint8") and x.dtype == torch.uint8:
            x = x.float()  # the model was trained on these numbers as they are
        ids = [str(i) for i in range(len(x))]
    else:
        raise UserError(f"--input {p}: give a .csv file, an .npz file or a folder of images")
    if tuple(x.shape[1:]) != shape:
        raise UserError(
            f"--input {p}: samples of shape {tuple(x.shape[1:])}, the model was trained on {shape}"
            + (f" ({shape[0]} features)" if len(shape) == 1 else "")
        )
    return x, ids


@torch.no_grad()
def predict(model_dir: str | Path, input_path: str | Path) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the predictions CSV (see the module docstring)."""
    pr = load_predictor(model_dir)
    x_raw, ids = read_inputs(input_path, pr.state)
    task = pr.cfg.task
    outs = [
        outputs(pr.model, preprocess(x_raw[i : i + BATCH], pr.state), task, pr.buffers)
        for i in range(0, len(x_raw), BATCH)
    ]
    out = torch.cat(outs).reshape(len(x_raw), -1)  # (N, C) probabilities or (N, k) outputs
    if task == "classification":
        classes = pr.state.get("classes") or [str(i) for i in range(out.shape[1])]
        header = ["id", "prediction", *(f"p_{c}" for c in classes)]
        best = out.argmax(1).tolist()
        rows = [[i, classes[b], *(_num(v) for v in row)] for i, b, row in zip(ids, best, out.tolist(), strict=True)]
    else:
        targets = pr.state.get("targets") or (["y"] if out.shape[1] == 1 else [f"y_{j}" for j in range(out.shape[1])])
        header = ["id", *targets]
        rows = [[i, *(_num(v) for v in row)] for i, row in zip(ids, out.tolist(), strict=True)]
    return header, rows


def _num(v: float) -> str:
    return repr(float(v))  # the float32 value exactly (shortest repr that reads back equal)


def to_csv(header: list[str], rows: list[list[str]]) -> str:
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(header)
    w.writerows(rows)
    return buf.getvalue()


def write_new(path: Path, text: str) -> None:
    """Write `text` to `path`, which must not exist: whole (a temporary file renamed), or not at all."""
    if path.exists():
        raise UserError(f"--output {path} exists; predict never overwrites a file (remove it or choose another)")
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise UserError(f"--output {path}: the folder {parent} does not exist")
    tmp: str | None = None
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        with os.fdopen(fd, "w", newline="") as f:
            f.write(text)
        os.link(tmp, path)  # fails if `path` appeared meanwhile: never replaces a file
    except FileExistsError:
        raise UserError(
            f"--output {path} exists; predict never overwrites a file (remove it or choose another)"
        ) from None
    except OSError as e:
        raise UserError(f"cannot write --output {path}: {e.strerror or e}") from None
    finally:
        if tmp is not None and os.path.exists(tmp):
            os.unlink(tmp)


def main(model_dir: str, input_path: str | None, output: str | None) -> int:
    if input_path is None:
        raise UserError("--predict needs --input FILE.csv|FILE.npz|FOLDER")
    header, rows = predict(model_dir, input_path)
    text = to_csv(header, rows)
    if output is None:
        sys.stdout.write(text)
    else:
        write_new(Path(output), text)
        print(f"predictions: {output} ({len(rows)} rows)", file=sys.stderr)
    return 0
