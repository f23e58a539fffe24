"""What a run prints: one header line, the progress bar, the warnings that matter, one summary line.

The libraries under deepnets print things of their own. What we cause, we fix where we call them (an
explicit `weights_only=` to `trainer.save_checkpoint`, no explicit `limit_val_batches=1.0`). What they
print about themselves whatever we pass (device banners, an advertisement, deprecation warnings about
their own internals) is dropped here, each by its exact message and the module that emits it, never by
a blanket filter: every other warning, ours and theirs, still shows. `configure()` applies it; the CLI
and `python -m deepnets.experiments` call it once at start.
"""

from __future__ import annotations

import logging
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

import deepnets

_PACKAGE = Path(deepnets.__file__).resolve().parent

# (category, message regex, module regex): a library warning about its own code, not about our use of it.
LIBRARY_WARNINGS: tuple[tuple[type[Warning], str, str], ...] = (
    # Lightning 2.6's pytree helper constructs torch's deprecated LeafSpec (torch >= 2.10), on every fit.
    (FutureWarning, r"`isinstance\(treespec, LeafSpec\)` is deprecated", r"lightning\.pytorch\.utilities\._pytree"),
    # torch's forward-mode AD (torch.func.jvp / jacfwd) scripts its own decompositions on first use.
    (FutureWarning, r"`torch\.jit\.script` is deprecated", r"torch\.jit\._script"),
)

# Lightning INFO lines that describe the library or the hardware, not this run (the header says device,
# precision and what was resumed): logger name -> message prefixes.
LIBRARY_BANNERS: dict[str, tuple[str, ...]] = {
    "lightning.pytorch.utilities.rank_zero": (
        "GPU available:",
        "TPU available:",
        "HPU available:",
        "\N{ELECTRIC LIGHT BULB} Tip:",  # the litlogger advertisement (logger_connector.py)
        "Restoring states from the checkpoint path at",  # the header names the resumed checkpoint
        "Restored all states from the checkpoint at",
        "Loaded model weights from the checkpoint at",  # testing the best checkpoint: metrics.json names it
        "Using 16bit Automatic Mixed Precision",
        "Using bfloat16 Automatic Mixed Precision",
        "`Trainer.fit` stopped:",  # max_epochs / max_steps reached: the summary line says how the run ended
    ),
    "lightning.pytorch.accelerators.cuda": ("LOCAL_RANK:",),
}


class _TqdmHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Lightning's console handler, writing through tqdm so that a line clears the bar instead of being glued to it."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
        except Exception:  # logging's own contract: a handler never raises
            self.handleError(record)


class _DropBanners(logging.Filter):
    def __init__(self, prefixes: Sequence[str]) -> None:
        super().__init__()
        self.prefixes = tuple(prefixes)

    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith(self.prefixes)


def _is_ours(filename: str) -> bool:
    try:
        return Path(filename).resolve().is_relative_to(_PACKAGE)
    except (OSError, ValueError):
        return False


def _show_warning(
    message: Warning | str,
    category: type[Warning],
    filename: str,
    lineno: int,
    file: TextIO | None = None,
    line: str | None = None,
) -> None:
    """Our warnings as one `warning: ...` line, everyone's through tqdm, so a bar is cleared first, not glued on."""
    from tqdm import tqdm

    if _is_ours(filename):
        text = f"warning: {message}"
    else:
        text = warnings.formatwarning(message, category, filename, lineno, line).rstrip("\n")
    tqdm.write(text, file=file or sys.stderr)


_configured = False


def configure() -> None:
    """Install the filters above and the warning format (idempotent)."""
    global _configured
    if _configured:
        return
    _configured = True
    for category, message, module in LIBRARY_WARNINGS:
        warnings.filterwarnings("ignore", message=message, category=category, module=module)
    for name, prefixes in LIBRARY_BANNERS.items():
        logging.getLogger(name).addFilter(_DropBanners(prefixes))
    lightning_logger = logging.getLogger("lightning.pytorch")  # its own StreamHandler, unless logging is set up
    for i, handler in enumerate(lightning_logger.handlers):
        if type(handler) is logging.StreamHandler:
            replacement = _TqdmHandler(handler.stream)
            replacement.setLevel(handler.level)
            replacement.setFormatter(handler.formatter)
            lightning_logger.handlers[i] = replacement
    warnings.showwarning = _show_warning


def header(
    run_dir: Path | None,
    model_name: str,
    num_params: int,
    data_name: str,
    sizes: tuple[int, int, int],
    device: str,
    precision: str,
    threads: int,
    resumed_from: Path | None = None,
) -> str:
    """The run's one header line: where it writes, what it trains on what, on which device and threads."""
    where = str(run_dir) if run_dir is not None else "(no run directory: fast_dev_run)"
    train, val, test = sizes
    parts = [
        where,
        f"{model_name} {num_params:,} params",
        f"{data_name} {train:,}/{val:,}/{test:,} train/val/test",
        f"{device} {precision}",
        f"{threads} thread{'s' if threads != 1 else ''}",
    ]
    if resumed_from is not None:
        parts.append(f"resumed from {resumed_from}")
    return " | ".join(parts)


def device_name(trainer: Any) -> str:
    """`cpu`, `cuda`, `cuda x4`, `cuda x4 x 2 nodes` from a Lightning Trainer."""
    name = type(trainer.accelerator).__name__.removesuffix("Accelerator").lower()
    if trainer.num_devices > 1:
        name += f" x{trainer.num_devices}"
    if trainer.num_nodes > 1:
        name += f" x {trainer.num_nodes} nodes"
    return name
