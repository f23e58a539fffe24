"""Checkpoint I/O that is atomic on save and refuses to unpickle code on load."""

from __future__ import annotations

import os
import pickle
import random
import re
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.data import AttributeDict
from lightning.pytorch.plugins.io import TorchCheckpointIO

from deepnets.errors import UserError

# The only non-primitive types our checkpoints hold (Lightning's hparams container).
SAFE_GLOBALS: list[Any] = [AttributeDict]


def load_checkpoint(path: str | Path, map_location: Any = "cpu") -> dict[str, Any]:
    """torch.load with weights_only=True and nothing but SAFE_GLOBALS allowed, then checked to be Lightning's.

    Any failure (missing, truncated, corrupt, a pickle that would call arbitrary code, a file that is not a
    Lightning checkpoint) is a one-line UserError naming the file; there is no fallback to a full unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS), warnings.catch_warnings():
            # "Detected pickle protocol 4 ...": torch's note on a plain pickle, which is refused below anyway
            warnings.filterwarnings("ignore", message=".*pickle protocol", category=UserWarning)
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        # torch's message ends with advice to allow-list the global or to load with weights_only=False: for a
        # file from elsewhere that advice is the attack, so only the name of what the pickle wanted is kept.
        named = re.search(r"GLOBAL ([\w.]+)", str(e))
        if named:
            raise UserError(
                f"checkpoint {path} refused: its pickle calls {named.group(1)}, which is code, not weights "
                "(nothing was run)"
            ) from None
        op = re.search(r"Unsupported operand (\d+)", str(e))
        what = f"pickle opcode {int(op.group(1)):#04x} is not one torch.save writes" if op else _first_line(e)
        raise UserError(f"checkpoint {path} is corrupt or not a torch checkpoint ({what})") from None
    except Exception as e:  # truncated zip, bad magic, EOF, ...
        with open(path, "rb") as f:
            zipped = f.read(4) == b"PK\x03\x04"  # torch.save's zip, complete or cut short
        if not zipped:  # random bytes can also trip the unpickler (IndexError, ...)
            raise UserError(f"checkpoint {path} is corrupt or not a torch checkpoint ({_first_line(e)})") from None
        raise UserError(f"checkpoint {path} is corrupt or truncated: {_first_line(e)}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} is not a deepnets checkpoint (top level is {type(ckpt).__name__})")
    state = ckpt.get("state_dict")
    if not isinstance(state, dict) or "pytorch-lightning_version" not in ckpt:
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            why = f"a bare state_dict of {len(ckpt)} tensors, not a Lightning checkpoint from a run's checkpoints/"
        else:
            keys = ", ".join(map(str, list(ckpt)[:5])) + (", ..." if len(ckpt) > 5 else "")
            why = f"no state_dict / pytorch-lightning_version; its keys: {keys or 'none'}"
        raise UserError(f"checkpoint {path} is not a deepnets checkpoint ({why})")
    return ckpt


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def first_mismatch(saved: Mapping[str, Any], model: torch.nn.Module) -> str | None:
    """The first difference between the tensors of state_dict `saved` and those of `model`, in words; None if none.

    `model` may live on the meta device: only names and shapes are compared.
    """
    expected = model.state_dict()
    for name, tensor in expected.items():
        if name not in saved:
            return f"it has no {name} (this model's {list(tensor.shape)})"
        got = saved[name]
        if not isinstance(got, torch.Tensor):
            return f"its {name} is a {type(got).__name__}, not a tensor"
        if got.shape != tensor.shape:
            return f"its {name} has shape {list(got.shape)}, this model's {list(tensor.shape)}"
    extra = next((k for k in saved if k not in expected), None)
    return f"it has {extra}, which this model does not" if extra is not None else None


def check_resumable(ckpt: Mapping[str, Any], model: torch.nn.Module, path: str | Path) -> None:
    """Fail with one line unless `ckpt` (from `load_checkpoint`) can continue training `model`.

    Lightning would raise mid-restore with a state_dict dump (a head of another data set's classes, an input
    layer of another shape) or a KeyError (a weights-only checkpoint has no optimizer state).
    """
    model_state = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items() if k.startswith("model.")}
    problem = first_mismatch(model_state, model)
    if problem is not None:
        raise UserError(
            f"--resume {path}: the checkpoint does not fit this run's model: {problem} "
            "(trained on other data or another model?)"
        )
    missing = [k for k in ("optimizer_states", "loops") if k not in ckpt]
    if missing:
        raise UserError(
            f"--resume {path}: the checkpoint holds weights only (no {', '.join(missing)}); it cannot be resumed"
        )


def atomic_torch_save(obj: Any, path: str | Path) -> None:
    """Write to a temp file in the same directory, fsync, then rename over `path`.

    A crash mid-save leaves the previous file intact (rename is atomic on POSIX).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class SafeCheckpointIO(TorchCheckpointIO):
    """Lightning's checkpoint plugin, made atomic on save and weights-only on load."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        atomic_torch_save(checkpoint, path)

    def load_checkpoint(self, path: Any, map_location: Any = None, weights_only: bool | None = None) -> dict[str, Any]:
        return load_checkpoint(path, map_location=map_location or "cpu")


class RNGState(L.Callback):
    """Puts the Python, NumPy and torch (CPU + CUDA) RNG states into every checkpoint.

    Lightning restores model, optimizer and loops but not the global RNGs, and
    dropout draws from them: without this a resumed run diverges bitwise.
    """

    def state_dict(self) -> dict[str, Any]:
        version, internal, gauss = random.getstate()
        np_state = np.random.get_state()
        state: dict[str, Any] = {
            "python": [version, list(internal), gauss],
            # numpy's state holds an ndarray: store plain lists so weights_only loading needs no numpy globals
            "numpy": [np_state[0], np_state[1].tolist(), *np_state[2:]],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict[str, Any]) -> None:
        version, internal, gauss = state["python"]
        random.setstate((version, tuple(internal), gauss))
        kind, keys, *rest = state["numpy"]
        np.random.set_state((kind, np.array(keys, dtype=np.uint32), *rest))
        torch.set_rng_state(state["torch"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])
