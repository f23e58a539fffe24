"""Checkpoint I/O that is atomic on save and refuses to unpickle code on load."""

from __future__ import annotations

import os
import pickle
import random
import tempfile
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
    """torch.load with weights_only=True and nothing but SAFE_GLOBALS allowed.

    Any failure (missing, truncated, corrupt, or a pickle that would call
    arbitrary code) is a one-line UserError naming the file; there is no
    fallback to a full unpickle.
    """
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()
        detail = next(
            (line for line in reason if "GLOBAL" in line or "Unsupported" in line), reason[0] if reason else ""
        )
        raise UserError(f"checkpoint {path} refused: it needs unsafe unpickling ({detail.strip()})") from None
    except Exception as e:  # truncated zip, bad magic, EOF, ...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise UserError(f"checkpoint {path} is corrupt or truncated: {first}") from None
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} is not a deepnets checkpoint (top level is {type(ckpt).__name__})")
    return ckpt


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
