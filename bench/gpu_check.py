"""One-GPU check: ResNet-18 and MLP throughput through the deepnets trainer, and a sync check.

Run as `bash bench/gpu_check.sh` (or `python bench/gpu_check.py`) from the repository root.
Prints one Markdown table, row by row as results arrive, and writes `$OUT/gpu_check.json`
when `OUT` is set (or `--json PATH`). Every row is measured in its own try/except, so one
failure leaves the rest of the table standing; a time budget (default 270 s) skips rows
that would not fit, so the whole check ends in under five minutes on an H100.

Rows:
- ResNet-18 (deepnets zoo preset `resnet18`, CIFAR stem; torchvision's resnet18 when the
  preset is missing) on synthetic 3x32x32 data, images/s for fp32, bf16-mixed,
  bf16-mixed + channels_last, and that + torch.compile (compile's one-time cost reported
  separately), through a Lightning Trainer running deepnets' own `Classifier`
  (path `lightning`), then the same four in a raw PyTorch loop (path `raw`) for
  comparison, time permitting.
- MLP steps/s, both paths.
- Sync check: `deepnets.run.train` on the `synthetic` dataset with
  `torch.cuda.set_sync_debug_mode("error")` armed on every training step that neither
  logs nor monitors gradients; a raw training step when the framework cannot be used.

Timing: CUDA events around a window of steps after a discarded warm-up, with
`torch.cuda.synchronize()` at both ends (perf_counter on the CPU smoke run).

`--cpu-smoke` runs every code path on the CPU with tiny sizes (no GPU needed); the
numbers then mean nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import platform
import signal
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # deepnets from this checkout, installed or not

import torch  # noqa: E402
from torch import nn  # noqa: E402

# ---------------------------------------------------------------- settings


@dataclass
class Sizes:
    batch: int = 256  # ResNet-18 images per step
    warmup: int = 15  # steps discarded (cudnn autotune, allocator, lazy init)
    steps: int = 100  # timed steps
    compile_warmup: int = 5  # compile happens in the first of these
    mlp_batch: int = 128
    mlp_in: int = 784
    mlp_width: int = 1024
    mlp_depth: int = 4
    mlp_warmup: int = 30
    mlp_steps: int = 300
    sync_batch: int = 128
    sync_steps: int = 45
    sync_log_every: int = 20
    preset: str = "resnet18"
    image: int = 32


SMOKE = Sizes(
    preset="resnet20",
    image=16,
    batch=4,
    warmup=1,
    steps=2,
    compile_warmup=1,
    mlp_batch=8,
    mlp_in=32,
    mlp_width=32,
    mlp_depth=2,
    mlp_warmup=1,
    mlp_steps=3,
    sync_batch=4,
    sync_steps=7,
    sync_log_every=5,
)


@dataclass
class Row:
    check: str
    path: str
    value: float | None = None
    unit: str = ""
    detail: str = ""
    ok: bool = True
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def cell(self) -> str:
        if self.error is not None:
            return "FAILED" if self.ok is False else "skipped"
        if self.value is None:
            return "PASS" if self.ok else "FAIL"
        return f"{self.value:,.0f} {self.unit}" if self.value >= 100 else f"{self.value:,.2f} {self.unit}"


class RowTimeout(Exception):
    pass


@contextlib.contextmanager
def time_limit(seconds: float) -> Iterator[None]:
    """Raise RowTimeout in the main thread after `seconds` (a hung compile must not eat the table)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _raise(signum: int, frame: Any) -> None:
        raise RowTimeout(f"row exceeded its {seconds:.0f} s limit")

    previous = signal.signal(signal.SIGALRM, _raise)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ---------------------------------------------------------------- timing


class Clock:
    """Elapsed seconds between `start()` and `stop()`: CUDA events on a GPU, perf_counter else."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.t0 = self.t1 = 0.0
        if self.cuda:
            self.e0 = torch.cuda.Event(enable_timing=True)
            self.e1 = torch.cuda.Event(enable_timing=True)

    def sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def start(self) -> None:
        self.sync()
        self.t0 = time.perf_counter()
        if self.cuda:
            self.e0.record()

    def stop(self) -> float:
        if self.cuda:
            self.e1.record()
        self.sync()
        self.t1 = time.perf_counter()
        return self.e0.elapsed_time(self.e1) / 1e3 if self.cuda else self.t1 - self.t0


def _lightning_timer(device: torch.device, warmup: int, steps: int) -> Any:
    import lightning as L

    class StepTimer(L.Callback):
        """Times optimizer steps warmup+1 .. warmup+steps; also the wall time of the warm-up."""

        def __init__(self) -> None:
            self.clock = Clock(device)
            self.t_first: float | None = None
            self.warmup_s = math.nan
            self.seconds = math.nan

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if trainer.global_step == 0 and self.t_first is None:
                self.clock.sync()
                self.t_first = time.perf_counter()
            if trainer.global_step == warmup:
                self.clock.start()
                self.warmup_s = self.clock.t0 - (self.t_first or self.clock.t0)

        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if trainer.global_step == warmup + steps:  # global_step counts the step just taken
                self.seconds = self.clock.stop()

    return StepTimer()


# ---------------------------------------------------------------- models and configs


def resnet18_model(preset: str = "resnet18", image: int = 32) -> tuple[nn.Module, str]:
    """ResNet-18 from the deepnets zoo (CIFAR stem); (model, description).

    The CPU smoke run passes a smaller preset and image size.
    """
    from deepnets.models import build_model

    model = build_model({"arch": "resnet", "preset": preset}, (3, image, image), 10)
    return model, f"deepnets zoo preset {preset}"


def mlp_model(s: Sizes) -> nn.Module:
    from deepnets.models import build_model

    return build_model({"arch": "mlp", "depth": s.mlp_depth, "width": s.mlp_width}, (s.mlp_in,), 10)


def _config(overrides: dict[str, Any]) -> Any:
    """A validated deepnets Config from nested overrides (benchmark defaults underneath)."""
    from deepnets.config import from_dict

    raw: dict[str, Any] = {
        "name": "gpu_check",
        "seed": 0,
        "optim": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
        "scheduler": {"name": "none"},
        "data": {"name": "synthetic", "val_fraction": 0.0, "test_fraction": 0.01, "standardize": False},
        "trainer": {
            "max_epochs": -1,
            "log_every_n_steps": 100000,
            "progress_bar": False,
            "limit_val_batches": 0,
            "test": False,
            "accelerator": "auto",
            "devices": 1,
        },
        "logging": {"tensorboard": False, "grad_norm_every_n_steps": 0},
        "checkpoint": {"enabled": False},
    }

    def merge(dst: dict[str, Any], src: dict[str, Any]) -> None:
        for k, v in src.items():
            if isinstance(v, dict) and isinstance(dst.get(k), dict):
                merge(dst[k], v)
            else:
                dst[k] = v

    merge(raw, overrides)
    return from_dict(raw)


def _samples_for(steps: int, batch: int, test_fraction: float = 0.01) -> int:
    """Synthetic samples so that `steps` batches fit in one epoch (no epoch-end syncs in the window)."""
    return math.ceil((steps + 2) * batch / (1 - test_fraction)) + 1


def _trainer(cfg: Any, callbacks: list[Any]) -> Any:
    """The framework's own Trainer factory (no run directory)."""
    from deepnets.run import build_trainer

    return build_trainer(cfg, None, callbacks)


# ---------------------------------------------------------------- measurements


@dataclass
class Measured:
    seconds: float  # the timed window
    steps: int
    warmup_s: float  # wall time of the warm-up steps (compile happens there)
    first_steps: int


def fresh_datamodule(cfg: Any, cache: dict[str, Any], key: str) -> Any:
    """A new InMemoryDataModule per Trainer (its train loader keeps its position across fits),
    sharing the synthetic tensors already made for `key`."""
    from deepnets.data import InMemoryDataModule

    dm = InMemoryDataModule(cfg.data, cfg.seed)
    if key in cache:
        dm.splits = cache[key]
    else:
        dm.setup("fit")
        cache[key] = dm.splits
    return dm


def lightning_fit(cfg: Any, model: nn.Module, warmup: int, steps: int, dm: Any = None) -> Measured:
    """Train `model` with deepnets' Classifier through a Lightning Trainer; time steps after warm-up."""
    from deepnets.data import InMemoryDataModule
    from deepnets.module import Classifier

    cfg.trainer.max_steps = warmup + steps
    if cfg.trainer.compile:
        with contextlib.suppress(Exception):
            torch._dynamo.utils.counters.clear()
        model.compile()  # as deepnets.run.train does: in place, state_dict keys unchanged
    module = Classifier(model, cfg)
    dm = dm or InMemoryDataModule(cfg.data, cfg.seed)
    dev = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    timer = _lightning_timer(dev, warmup, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(cfg, [timer])
        trainer.fit(module, datamodule=dm)
    if math.isnan(timer.seconds):
        raise RuntimeError(f"timed window never closed (trainer stopped at step {trainer.global_step})")
    return Measured(timer.seconds, steps, timer.warmup_s, warmup)


def bare_fit(cfg: Any, model: nn.Module, warmup: int, steps: int, dm: Any = None) -> Measured:
    """The same Trainer around a minimal LightningModule (no metrics, no logging): Lightning's own cost."""
    import lightning as L
    import torch.nn.functional as F

    from deepnets.data import InMemoryDataModule

    channels_last = cfg.model.channels_last

    class Bare(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model.to(memory_format=torch.channels_last) if channels_last else model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            return F.cross_entropy(self.model(x), y)

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)

    cfg.trainer.max_steps = warmup + steps
    dm = dm or InMemoryDataModule(cfg.data, cfg.seed)
    dev = torch.device("cuda" if cfg.trainer.accelerator in ("gpu", "cuda") else "cpu")
    timer = _lightning_timer(dev, warmup, steps)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = _trainer(cfg, [timer])
        trainer.fit(Bare(), datamodule=dm)
    if math.isnan(timer.seconds):
        raise RuntimeError(f"timed window never closed (trainer stopped at step {trainer.global_step})")
    return Measured(timer.seconds, steps, timer.warmup_s, warmup)


def dynamo_summary() -> str:
    """Graphs compiled and graph breaks since the last `torch._dynamo.utils.counters.clear()`."""
    try:
        from torch._dynamo.utils import counters

        graphs = counters["stats"].get("unique_graphs", 0)
        breaks = sum(counters["graph_break"].values())
        return f"dynamo: {graphs} graph(s), {breaks} graph break(s)"
    except Exception:  # a private API: its absence must not fail the row
        return ""


def raw_fit(
    model: nn.Module,
    x_shape: tuple[int, ...],
    batch: int,
    device: torch.device,
    *,
    bf16: bool,
    channels_last: bool,
    compile: bool,
    warmup: int,
    steps: int,
) -> Measured:
    """The same training step in plain PyTorch: autocast bf16, SGD with momentum, cross-entropy."""
    g = torch.Generator(device="cpu").manual_seed(0)
    pool = 8
    xs = torch.randn(pool, batch, *x_shape, generator=g).to(device)
    ys = torch.randint(0, 10, (pool, batch), generator=g).to(device)
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
        xs = torch.stack([x.contiguous(memory_format=torch.channels_last) for x in xs])
    if compile:
        with contextlib.suppress(Exception):
            torch._dynamo.utils.counters.clear()
        model.compile()
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    loss_fn = nn.CrossEntropyLoss()
    model.train()

    def step(i: int) -> None:
        x, y = xs[i % pool], ys[i % pool]
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16):
            loss = loss_fn(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    clock = Clock(device)
    clock.sync()
    t0 = time.perf_counter()
    for i in range(warmup):
        step(i)
    clock.start()
    warmup_s = clock.t0 - t0
    for i in range(steps):
        step(warmup + i)
    return Measured(clock.stop(), steps, warmup_s, warmup)


# ---------------------------------------------------------------- the sync check


def _sync_callbacks(log_every: int, start_after: int) -> tuple[Any, Any, dict[str, int]]:
    """Two callbacks bracketing every other callback: arm sync errors on quiet training steps."""
    import lightning as L

    state = {"armed": 0, "passed": 0}

    def quiet(step: int) -> bool:
        # Steps next to a logging step are left out: Lightning decides to log from a counter
        # that may be one off the optimizer step, and the monitor fires on its own multiples.
        return step >= start_after and step % log_every not in (log_every - 1, 0, 1)

    class Arm(L.Callback):
        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if quiet(trainer.global_step):
                torch.cuda.set_sync_debug_mode("error")
                state["armed"] += 1

    class Disarm(L.Callback):
        def on_train_batch_end(
            self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, batch_idx: int
        ) -> None:
            if torch.cuda.get_sync_debug_mode() != 0:
                torch.cuda.set_sync_debug_mode(0)
                state["passed"] += 1

        def on_exception(self, trainer: L.Trainer, pl_module: Any, exception: BaseException) -> None:
            torch.cuda.set_sync_debug_mode(0)

    return Arm(), Disarm(), state


def sync_check_framework(s: Sizes, on_gpu: bool) -> Row:
    """`deepnets.run.train` on synthetic data, sync errors armed on quiet steps (CPU smoke: not armed)."""
    import deepnets.run as run

    start_after = 2  # first steps: lazy state (optimizer buffers, cudnn plans)
    arm, disarm, state = _sync_callbacks(s.sync_log_every, start_after)
    original = run._callbacks

    def patched(cfg: Any, run_dir: Any) -> Any:
        callbacks, ckpt, early = original(cfg, run_dir)
        if on_gpu:
            callbacks = [arm, *callbacks, disarm]
        return callbacks, ckpt, early

    with tempfile.TemporaryDirectory() as tmp:
        cfg = _config(
            {
                "output_dir": tmp,
                "model": {"arch": "resnet", "preset": s.preset, "channels_last": True},
                "data": {
                    "input_shape": [3, s.image, s.image],
                    "batch_size": s.sync_batch,
                    "num_samples": _samples_for(s.sync_steps, s.sync_batch),
                },
                "trainer": {
                    "max_steps": s.sync_steps,
                    "precision": "bf16-mixed" if on_gpu else "32",
                    "log_every_n_steps": s.sync_log_every,
                    "accelerator": "gpu" if on_gpu else "cpu",
                },
                "logging": {"tensorboard": True, "grad_norm_every_n_steps": s.sync_log_every},
                "checkpoint": {"enabled": True},
            }
        )
        run._callbacks = patched
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                result = run.train(cfg)
        finally:
            run._callbacks = original
            if on_gpu:
                torch.cuda.set_sync_debug_mode(0)
    detail = (
        f"deepnets.run.train: ResNet-18 bf16-mixed channels_last, {s.sync_steps} steps, logging + grad monitor "
        f"every {s.sync_log_every}; {state['passed']}/{state['armed']} quiet steps ran with no host sync"
    )
    if not on_gpu:
        detail = f"CPU smoke: pipeline ran ({result.status}); sync mode needs CUDA, not armed"
    ok = result.status == "completed" and state["passed"] == state["armed"]
    return Row(
        "sync check: non-logging training step",
        "lightning",
        None,
        "",
        detail,
        ok,
        extra={"armed": state["armed"], "passed": state["passed"], "status": result.status},
    )


# ---------------------------------------------------------------- the table


def _first_line(e: BaseException) -> str:
    msg = str(e).strip().splitlines()
    return f"{type(e).__name__}: {msg[0] if msg else ''}"[:200]


def _where(e: BaseException) -> str:
    """The innermost frames of `e` in deepnets / lightning / this file, for a sync error."""
    frames = traceback.extract_tb(e.__traceback__)
    keep = [f for f in frames if any(k in f.filename for k in ("deepnets", "lightning", "gpu_check"))]
    return " <- ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in reversed(keep[-4:]))


class Table:
    def __init__(self, json_path: Path | None, header: dict[str, Any]) -> None:
        self.rows: list[Row] = []
        self.json_path = json_path
        self.header = header
        self.started = time.perf_counter()

    def add(self, row: Row) -> None:
        self.rows.append(row)
        print(f"  -> {row.check} [{row.path}]: {row.cell()}  {row.error or row.detail}", flush=True)
        self.write_json()

    def write_json(self) -> None:
        if self.json_path is None:
            return
        payload = {
            **self.header,
            "elapsed_s": round(time.perf_counter() - self.started, 1),
            "rows": [asdict(r) for r in self.rows],
        }
        self.json_path.parent.mkdir(parents=True, exist_ok=True)
        self.json_path.write_text(json.dumps(payload, indent=2, default=str) + "\n")

    def render(self) -> str:
        lines = ["| check | path | result | detail |", "| --- | --- | --- | --- |"]
        for r in self.rows:
            detail = (r.error or r.detail).replace("|", "/")
            lines.append(f"| {r.check} | {r.path} | {r.cell()} | {detail} |")
        return "\n".join(lines)


def run_row(
    table: Table, check: str, path: str, fn: Callable[[], Row], *, deadline: float, need_s: float, limit_s: float
) -> Row | None:
    """Measure one row unless the budget is spent; a failure becomes a FAILED row, never a crash."""
    left = deadline - time.perf_counter()
    if left < need_s:
        row = Row(
            check, path, ok=True, error=f"skipped: {left:.0f} s of the time budget left, row needs ~{need_s:.0f} s"
        )
        table.add(row)
        return row
    try:
        with time_limit(min(limit_s, left)):
            row = fn()
    except Exception as e:
        where = _where(e)
        row = Row(check, path, ok=False, error=_first_line(e) + (f" (at {where})" if where else ""))
    finally:
        with contextlib.suppress(Exception):
            torch.cuda.set_sync_debug_mode(0) if torch.cuda.is_available() else None
            torch.cuda.empty_cache() if torch.cuda.is_available() else None
    table.add(row)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cpu-smoke",
        action="store_true",
        default=os.environ.get("GPU_CHECK_CPU_SMOKE") == "1",
        help="tiny sizes on the CPU: exercises every code path, measures nothing",
    )
    p.add_argument(
        "--budget",
        type=float,
        default=None,
        help="seconds for the whole check (default $GPU_CHECK_BUDGET_S or 270; smoke: 3600); "
        "rows that would not fit are skipped",
    )
    p.add_argument("--json", type=Path, default=None, help="also write the table here (default: $OUT/gpu_check.json)")
    p.add_argument("--no-raw", action="store_true", help="skip the raw-PyTorch comparison rows")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile rows")
    args = p.parse_args(argv)
    smoke = args.cpu_smoke
    budget = args.budget or float(os.environ.get("GPU_CHECK_BUDGET_S", 3600 if smoke else 270))
    start = time.perf_counter()
    deadline = start + budget
    json_path = args.json or (Path(os.environ["OUT"]) / "gpu_check.json" if os.environ.get("OUT") else None)

    on_gpu = torch.cuda.is_available()
    if not on_gpu and not smoke:
        msg = (
            "gpu_check: no CUDA device visible (torch.cuda.is_available() is False); nothing to measure. "
            "Run on a GPU machine, or with --cpu-smoke to exercise the code paths on the CPU."
        )
        print(msg)
        if json_path is not None:
            json_path.parent.mkdir(parents=True, exist_ok=True)
            json_path.write_text(json.dumps({"status": "no_gpu", "message": msg}) + "\n")
        return 0
    s = SMOKE if smoke else Sizes()  # --cpu-smoke on a GPU box: smoke sizes on the GPU
    device = torch.device("cuda" if on_gpu else "cpu")
    accel = "gpu" if on_gpu else "cpu"

    import lightning

    for name in ("lightning.pytorch", "lightning.fabric", "pytorch_lightning"):  # no per-Trainer banners
        logging.getLogger(name).setLevel(logging.WARNING)
    gpu_name = torch.cuda.get_device_name(0) if on_gpu else f"CPU ({platform.processor() or platform.machine()})"
    header: dict[str, Any] = {
        "status": "ran",
        "device": gpu_name,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if on_gpu else None,
        "lightning": lightning.__version__,
        "python": platform.python_version(),
        "cpu_smoke": smoke,
        "sizes": asdict(s),
        "cudnn_benchmark": torch.backends.cudnn.benchmark,
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
    }
    table = Table(json_path, header)
    _, resnet_desc = resnet18_model(s.preset, s.image)
    header["resnet18"] = resnet_desc
    print(
        f"gpu_check on {gpu_name}: torch {torch.__version__} (CUDA {torch.version.cuda}), lightning "
        f"{lightning.__version__}, python {platform.python_version()}"
        + ("  [CPU SMOKE: numbers mean nothing]" if smoke else "")
    )
    print(
        f"ResNet-18: {resnet_desc}; batch {s.batch} of synthetic 3x{s.image}x{s.image}, 10 classes; "
        f"{s.warmup} warm-up steps discarded, {s.steps} timed ({'CUDA events' if on_gpu else 'perf_counter'})",
        flush=True,
    )

    variants = [  # (label, precision, channels_last, compile)
        ("fp32", "32", False, False),
        ("bf16-mixed", "bf16-mixed", False, False),
        ("bf16-mixed + channels_last", "bf16-mixed", True, False),
        ("bf16-mixed + channels_last + compile", "bf16-mixed", True, True),
    ]
    if args.no_compile:
        variants = variants[:3]
    dm_cache: dict[str, Any] = {}

    def throughput_row(m: Measured, comp: bool, path: str) -> Row:
        step_s = m.seconds / m.steps
        once = m.warmup_s - m.first_steps * step_s
        detail = f"{step_s * 1e3:.1f} ms/step over {m.steps} steps"
        if comp:
            detail += f"; compile one-time cost {once:.1f} s (warm-up wall time minus steady steps)"
            detail += f"; {dynamo_summary()}" if dynamo_summary() else ""
        else:
            detail += f"; warm-up overhead {once:.1f} s"
        return Row(
            "",
            path,
            s.batch / step_s,
            "img/s",
            detail,
            extra={"ms_per_step": step_s * 1e3, "one_time_s": once, "warmup_wall_s": m.warmup_s},
        )

    def resnet_lightning(prec: str, cl: bool, comp: bool) -> Row:
        model, desc = resnet18_model(s.preset, s.image)
        if not desc.startswith("deepnets"):
            raise RuntimeError("the deepnets zoo has no resnet18 preset yet; see the raw rows")
        warmup = s.compile_warmup + s.warmup if comp else s.warmup
        cfg = _config(
            {
                "model": {"arch": "resnet", "preset": s.preset, "channels_last": cl},
                "data": {
                    "input_shape": [3, s.image, s.image],
                    "batch_size": s.batch,
                    "num_samples": _samples_for(s.compile_warmup + s.warmup + s.steps, s.batch),
                },
                "trainer": {"precision": prec, "compile": comp, "accelerator": accel},
            }
        )
        dm = fresh_datamodule(cfg, dm_cache, "resnet")  # one synthetic data set for all rows
        return throughput_row(lightning_fit(cfg, model, warmup, s.steps, dm), comp, "lightning")

    def resnet_raw(prec: str, cl: bool, comp: bool) -> Row:
        model, _ = resnet18_model(s.preset, s.image)
        m = raw_fit(
            model,
            (3, s.image, s.image),
            s.batch,
            device,
            bf16=prec == "bf16-mixed",
            channels_last=cl,
            compile=comp,
            warmup=(s.compile_warmup + s.warmup) if comp else s.warmup,
            steps=s.steps,
        )
        return throughput_row(m, comp, "raw")

    def sync_check() -> Row:
        return sync_check_framework(s, on_gpu)

    mlp_label = f"MLP {s.mlp_depth}x{s.mlp_width} fp32 ({s.mlp_in} in, batch {s.mlp_batch})"

    def mlp_lightning() -> Row:
        cfg = _config(
            {
                "model": {"arch": "mlp", "depth": s.mlp_depth, "width": s.mlp_width},
                "data": {
                    "input_shape": [s.mlp_in],
                    "batch_size": s.mlp_batch,
                    "num_samples": _samples_for(s.mlp_warmup + s.mlp_steps, s.mlp_batch),
                },
                "trainer": {"accelerator": accel},
            }
        )
        m = lightning_fit(cfg, mlp_model(s), s.mlp_warmup, s.mlp_steps)
        return Row(
            mlp_label,
            "lightning",
            m.steps / m.seconds,
            "steps/s",
            f"{m.seconds / m.steps * 1e3:.2f} ms/step over {m.steps} steps",
        )

    def mlp_raw() -> Row:
        m = raw_fit(
            mlp_model(s),
            (s.mlp_in,),
            s.mlp_batch,
            device,
            bf16=False,
            channels_last=False,
            compile=False,
            warmup=s.mlp_warmup,
            steps=s.mlp_steps,
        )
        return Row(
            mlp_label,
            "raw",
            m.steps / m.seconds,
            "steps/s",
            f"{m.seconds / m.steps * 1e3:.2f} ms/step over {m.steps} steps",
        )

    def mlp_bare() -> Row:
        cfg = _config(
            {
                "model": {"arch": "mlp", "depth": s.mlp_depth, "width": s.mlp_width},
                "data": {
                    "input_shape": [s.mlp_in],
                    "batch_size": s.mlp_batch,
                    "num_samples": _samples_for(s.mlp_warmup + s.mlp_steps, s.mlp_batch),
                },
                "trainer": {"accelerator": accel},
            }
        )
        m = bare_fit(cfg, mlp_model(s), s.mlp_warmup, s.mlp_steps)
        return Row(
            mlp_label, "lightning-bare", m.steps / m.seconds, "steps/s",
            f"{m.seconds / m.steps * 1e3:.2f} ms/step over {m.steps} steps",
        )  # fmt: skip

    def resnet_bare(prec: str, cl: bool) -> Row:
        model, _ = resnet18_model(s.preset, s.image)
        cfg = _config(
            {
                "model": {"arch": "resnet", "preset": s.preset, "channels_last": cl},
                "data": {
                    "input_shape": [3, s.image, s.image],
                    "batch_size": s.batch,
                    "num_samples": _samples_for(s.compile_warmup + s.warmup + s.steps, s.batch),
                },
                "trainer": {"precision": prec, "accelerator": accel},
            }
        )
        return throughput_row(
            bare_fit(cfg, model, s.warmup, s.steps, fresh_datamodule(cfg, dm_cache, "resnet")), False, "lightning-bare"
        )

    def named(fn: Callable[..., Row], name: str, *a: Any) -> Callable[[], Row]:
        def call() -> Row:
            row = fn(*a)
            row.check = name
            return row

        return call

    # (check, path, fn, seconds it needs, its hard limit). Lightning rows first (they are the
    # framework's), then the sync check and the MLP, then the raw comparison, so a tight
    # budget drops the least important rows.
    plan: list[tuple[str, str, Callable[[], Row], float, float]] = []
    for label, prec, cl, comp in variants:
        name = f"ResNet-18 {label}"
        plan.append(
            (name, "lightning", named(resnet_lightning, name, prec, cl, comp), 150 if comp else 20, 170 if comp else 60)
        )
    plan.append(("sync check: non-logging training step", "lightning", sync_check, 25, 90))
    plan.append((mlp_label, "lightning", mlp_lightning, 15, 60))
    if not args.no_raw:
        plan.append((mlp_label, "raw", mlp_raw, 10, 60))
        plan.append((mlp_label, "lightning-bare", mlp_bare, 10, 60))
        for label, prec, cl, comp in variants:
            if not comp:
                name = f"ResNet-18 {label}"
                plan.append((name, "lightning-bare", named(resnet_bare, name, prec, cl), 15, 45))
        for label, prec, cl, comp in variants:
            name = f"ResNet-18 {label}"
            plan.append((name, "raw", named(resnet_raw, name, prec, cl, comp), 90 if comp else 15, 120 if comp else 45))

    try:
        for check, path, fn, need_s, limit_s in plan:
            if smoke:
                need_s, limit_s = 1, 1800
            run_row(table, check, path, fn, deadline=deadline, need_s=need_s, limit_s=limit_s)
    except KeyboardInterrupt:  # the shell wrapper's hard timeout: still print what was measured
        done = {(r.check, r.path) for r in table.rows}
        for check, path, *_ in plan:
            if (check, path) not in done:
                table.rows.append(Row(check, path, ok=False, error="interrupted (hard timeout)"))

    # One table in a fixed order: ResNet rows by variant (lightning, then raw), MLP, sync.
    order = {f"ResNet-18 {v[0]}": i for i, v in enumerate(variants)}
    order[mlp_label] = len(variants)
    paths = {"lightning": 0, "lightning-bare": 1, "raw": 2}
    table.rows.sort(key=lambda r: (order.get(r.check, len(variants) + 1), paths.get(r.path, 3)))
    elapsed = time.perf_counter() - start
    print()
    print(
        f"## deepnets gpu_check: {gpu_name}, torch {torch.__version__}, lightning {lightning.__version__}"
        f"{' (CPU SMOKE: numbers mean nothing)' if smoke else ''}"
    )
    print(
        f"ResNet-18: {resnet_desc}, batch {s.batch}, 3x{s.image}x{s.image}; MLP batch {s.mlp_batch}. "
        "lightning = deepnets Classifier in a Lightning Trainer; lightning-bare = a minimal "
        "LightningModule in the same Trainer; raw = plain PyTorch loop."
    )
    print()
    print(table.render())
    print()
    failed = [r for r in table.rows if r.ok is False]
    print(
        f"total {elapsed:.0f} s; {len(table.rows)} rows, {len(failed)} failed"
        + (f"; JSON: {json_path}" if json_path else "")
    )
    header["elapsed_s"] = round(elapsed, 1)
    table.write_json()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
