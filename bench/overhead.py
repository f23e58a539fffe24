"""deepnets vs a hand-written PyTorch loop, side by side in one process (CPU).

    python bench/overhead.py [--json PATH] [--quick] [--threads N]

Every comparison alternates its contenders (A B A B ...), discards warm-up
steps, and reports medians over the repeats:

1. training steps/s: `deepnets.run.train` (the real pipeline: TensorBoard
   logger, progress bar, checkpoint callbacks, divergence guard; gradient
   monitor off here, see 3.) vs a raw loop vs a bare LightningModule in a
   plain Trainer (Lightning's own floor), same model init, data, data order,
   optimizer (what `build_optimizer` builds) and thread count. The loss of
   the framework and the raw loop must agree at the last timed step.
   Timing: a callback stamps `on_train_batch_end` of steps W .. W+N, so the
   window holds N complete loop iterations (data fetch, every hook, logging
   on every `log_every_n_steps`-th step) and no setup, validation or epoch end.
   Small models report the median over blocks of 50 steps (see `per_step_ms`),
   large ones the median step.
2. one epoch of `TensorBatches` vs `DataLoader(TensorDataset(...))`.
3. framework step time with the gradient-flow monitor every step / every 50 / off.
4. achieved training GFLOP/s of the wide MLP (6 x weights x batch per step)
   vs fp32 matmul GFLOP/s measured in the same alternation.

Not part of the test suite. Run on an otherwise idle machine where possible:
only ratios measured in the same alternation mean anything on a shared box.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn

import deepnets.run as run
from deepnets.config import Config, load_config
from deepnets.data import InMemoryDataModule, Splits, TensorBatches, in_huge_pages
from deepnets.models import build_model, depth_ordered_layers
from deepnets.module import build_optimizer


@dataclass
class Case:
    key: str
    label: str
    model: dict[str, Any]
    input_shape: tuple[int, ...]
    batch: int
    warmup: int
    steps: int
    repeats: int
    block: int = 1  # steps per timing block (see per_step_ms); 1: the median step
    extra: list[str] = field(default_factory=list)


def cases(quick: bool) -> list[Case]:
    q = 2 if quick else 1
    return [
        Case("a", "(a) MLP 8x1024, batch 256", {"arch": "mlp", "depth": 8, "width": 1024}, (784,), 256,
             3, 16 // q, 5 - q),
        Case("b", "(b) MLP 2x32, batch 32", {"arch": "mlp", "depth": 2, "width": 32}, (784,), 32,
             100, 2000 // q, 7 - 2 * q, block=50),
        Case("c", "(c) ResNet-20, batch 128", {"arch": "resnet", "preset": "resnet20"}, (3, 32, 32), 128,
             2, 8 // q, 7 - 2 * q),
    ]  # fmt: skip


# ---------------------------------------------------------------- helpers


def config(case: Case, out: str, *extra: str) -> Config:
    """A deepnets config for `case` whose training split holds every step of the run in one epoch."""
    samples = math.ceil((case.warmup + case.steps + 4) * case.batch / (0.8 * 0.9)) + 16
    model = [f"model.{k}={json.dumps(v)}" for k, v in case.model.items()]
    return load_config(
        None,
        [
            "name=overhead",
            f"output_dir={out}",
            "seed=0",
            *model,
            "data.name=synthetic",
            f"data.input_shape={json.dumps(list(case.input_shape))}",
            "data.num_classes=10",
            f"data.num_samples={samples}",
            f"data.batch_size={case.batch}",
            "optim.name=sgd",
            "optim.lr=0.01",
            "optim.momentum=0.9",
            "trainer.accelerator=cpu",
            "trainer.devices=1",
            f"trainer.max_steps={case.warmup + case.steps}",
            "trainer.test=false",
            "logging.grad_norm_every_n_steps=0",
            *case.extra,
            *extra,
        ],
    )


def per_step_ms(stamps: list[float], block: int) -> float:
    """ms per step: the median over consecutive blocks of `block` steps of each block's mean.

    A shared VM has slow spells lasting seconds (2x, with no steal time reported); a
    whole-window mean moves with them, a median of blocks does not. Every block holds
    the same periodic work (a logging step every 10, a monitor event every 50 when
    `block` is 50), so nothing periodic is left out.
    """
    blocks = [(stamps[i + block] - stamps[i]) / block for i in range(0, len(stamps) - block, block)]
    return statistics.median(blocks) * 1e3


class Window(L.Callback):
    """Stamps the end of optimizer steps `warmup` .. `warmup + steps`; keeps the loss of the last one."""

    def __init__(self, warmup: int, steps: int) -> None:
        self.warmup, self.end = warmup, warmup + steps
        self.stamps: list[float] = []
        self.loss = math.nan
        self.threads = 0

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: Any, outputs: Any, batch: Any, i: int) -> None:
        step = trainer.global_step
        if self.warmup <= step <= self.end:
            self.stamps.append(time.perf_counter())
        if step == self.end:
            self.loss = float(outputs["loss"] if isinstance(outputs, dict) else outputs)
            self.threads = torch.get_num_threads()

    def ms(self, block: int) -> float:
        if len(self.stamps) != self.end - self.warmup + 1:
            return math.nan
        return per_step_ms(self.stamps, block)


@contextlib.contextmanager
def quiet() -> Any:
    """Progress bars and Lightning's banners go to /dev/null (they still run)."""
    with (
        open(os.devnull, "w") as null,
        contextlib.redirect_stdout(null),
        contextlib.redirect_stderr(null),
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        yield


@dataclass
class Timed:
    ms_per_step: float
    loss: float
    threads: int
    wall_s: float = math.nan  # whole call, setup included


def train_with(cfg: Config, callbacks: Callable[[list[L.Callback]], list[L.Callback]]) -> run.RunResult:
    """`deepnets.run.train(cfg)`, quietly, with its callback list passed through `callbacks`."""
    original = run._callbacks

    def patched(c: Config, run_dir: Any) -> Any:
        found, ckpt, early = original(c, run_dir)
        return callbacks(found), ckpt, early

    run._callbacks = patched
    try:
        with quiet():
            return run.train(cfg)
    finally:
        run._callbacks = original


def framework(cfg: Config, warmup: int, steps: int, block: int = 1) -> Timed:
    """`deepnets.run.train(cfg)` with a Window callback appended to its callbacks."""
    window = Window(warmup, steps)
    t = time.perf_counter()
    result = train_with(cfg, lambda found: [*found, window])
    wall = time.perf_counter() - t
    ms = window.ms(block)
    if result.status != "completed" or math.isnan(ms):
        raise RuntimeError(f"framework run ended {result.status}: {result.error}")
    return Timed(ms, window.loss, window.threads, wall)


def same_model(cfg: Config, input_shape: tuple[int, ...]) -> nn.Module:
    """The model `train(cfg)` builds: same seed, same construction order."""
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    return build_model(cfg.model, input_shape, 10)


def cpu_splits(cfg: Config) -> Splits:
    """The splits as `train(cfg)` holds them on the CPU (training set in huge pages): through its DataModule."""
    dm = InMemoryDataModule(cfg.data, cfg.seed)
    dm.setup("fit")
    assert dm.splits is not None
    return dm.splits


def raw(cfg: Config, case: Case, warmup: int, steps: int, block: int = 1) -> Timed:
    """The loop a careful engineer writes: in-memory data gathered per batch, seeded order, the same
    optimizer, zero_grad(set_to_none=True), the loss read every `log_every_n_steps` steps."""
    s = cpu_splits(cfg)
    model = same_model(cfg, case.input_shape)
    opt = build_optimizer(model, cfg.optim)
    x, y = s.x_train, s.y_train
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(cfg.seed))  # epoch 0's order
    log_every = cfg.trainer.log_every_n_steps
    logged: list[float] = []
    model.train()
    stamps: list[float] = []
    for i in range(warmup + steps):
        idx = order[i * case.batch : (i + 1) * case.batch]
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (i + 1) % log_every == 0:
            logged.append(loss.item())
        if i + 1 >= warmup:
            stamps.append(time.perf_counter())
    return Timed(per_step_ms(stamps, block), float(loss), torch.get_num_threads())


def bare(cfg: Config, case: Case, warmup: int, steps: int, block: int = 1) -> Timed:
    """A minimal LightningModule (no metrics, no logging) in a plain Trainer (no logger, bar,
    checkpointing): what Lightning itself costs per step. Same data loader and optimizer."""
    model = same_model(cfg, case.input_shape)
    s = cpu_splits(cfg)
    optim_cfg = cfg.optim

    class Bare(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.model = model

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            x, y = batch
            return F.cross_entropy(self.model(x), y)

        def train_dataloader(self) -> Any:
            return TensorBatches(s.x_train, s.y_train, case.batch, shuffle=True, seed=cfg.seed)

        def configure_optimizers(self) -> Any:
            return build_optimizer(self.model, optim_cfg)

    window = Window(warmup, steps)
    with quiet():
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=warmup + steps,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            callbacks=[window],
        )
        trainer.fit(Bare())
    return Timed(window.ms(block), window.loss, window.threads)


def matmul_gflops(n: int = 1024, reps: int = 20) -> float:
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    t = time.perf_counter()
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / (time.perf_counter() - t) / 1e9


def alternate(fns: dict[str, Callable[[], Any]], repeats: int) -> dict[str, list[Any]]:
    """Run each contender once per round, rounds `repeats` times, after one discarded warm-up round."""
    out: dict[str, list[Any]] = {k: [] for k in fns}
    for r in range(repeats + 1):
        for k, fn in fns.items():
            v = fn()
            if r > 0:
                out[k].append(v)
    return out


def med(xs: list[float]) -> float:
    return statistics.median(xs)


def paired(res: dict[str, list[Any]], a: str, b: str, op: Callable[[float, float], float]) -> float:
    """Median over rounds of op(a's ms/step, b's ms/step) within each round."""
    return med([op(x.ms_per_step, y.ms_per_step) for x, y in zip(res[a], res[b], strict=True)])


# ---------------------------------------------------------------- the four measurements


def bench_training(case: Case, tmp: str, peak: bool) -> dict[str, Any]:
    cfg = config(case, tmp)
    fns: dict[str, Callable[[], Any]] = {
        "raw": lambda: raw(cfg, case, case.warmup, case.steps, case.block),
        "deepnets": lambda: framework(cfg, case.warmup, case.steps, case.block),
        "lightning_bare": lambda: bare(cfg, case, case.warmup, case.steps, case.block),
    }
    if peak:
        fns["matmul_gflops"] = matmul_gflops
    res = alternate(fns, case.repeats)
    ms = {k: med([t.ms_per_step for t in res[k]]) for k in ("raw", "deepnets", "lightning_bare")}
    losses = {k: res[k][-1].loss for k in ("raw", "deepnets", "lightning_bare")}
    out = {
        "case": case.label,
        "steps_timed": case.steps,
        "repeats": case.repeats,
        "ms_per_step": ms,
        "steps_per_s": {k: 1e3 / v for k, v in ms.items()},
        # Paired: each round runs the contenders back to back, so compare within rounds.
        "ratio_deepnets_raw": paired(res, "deepnets", "raw", lambda a, b: a / b),
        "extra_ms_deepnets_vs_raw": paired(res, "deepnets", "raw", lambda a, b: a - b),
        "extra_ms_bare_vs_raw": paired(res, "lightning_bare", "raw", lambda a, b: a - b),
        "extra_ms_deepnets_vs_bare": paired(res, "deepnets", "lightning_bare", lambda a, b: a - b),
        "loss_at_last_step": losses,
        "loss_match": math.isclose(losses["deepnets"], losses["raw"], rel_tol=1e-4, abs_tol=1e-5),
        "threads": {k: res[k][-1].threads for k in ("raw", "deepnets", "lightning_bare")},
        "deepnets_train_wall_s": med([t.wall_s for t in res["deepnets"]]),
        "all_ms": {k: [round(t.ms_per_step, 3) for t in res[k]] for k in ("raw", "deepnets", "lightning_bare")},
    }
    if peak:
        model = build_model(cfg.model, case.input_shape, 10)
        weights = sum(w.numel() for _, w in depth_ordered_layers(model))
        flops = 6 * weights * case.batch
        out["flops_per_step"] = flops
        out["matmul_gflops"] = med(res["matmul_gflops"])
        out["achieved_gflops"] = {k: flops / (ms[k] / 1e3) / 1e9 for k in ("raw", "deepnets")}
        out["fraction_of_matmul_peak"] = out["achieved_gflops"]["deepnets"] / out["matmul_gflops"]
    return out


def bench_loader(quick: bool) -> dict[str, Any]:
    from torch.utils.data import DataLoader, TensorDataset

    g = torch.Generator().manual_seed(0)
    n = 60_000
    # Where InMemoryDataModule keeps a CPU training set; both contenders read this same tensor.
    x, y = in_huge_pages(torch.randn(n, 784, generator=g)), torch.randint(0, 10, (n,), generator=g)
    batch = 256

    def ours() -> float:
        loader = TensorBatches(x, y, batch, shuffle=True, seed=0)
        t = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - t

    def torch_loader() -> float:
        loader = DataLoader(TensorDataset(x, y), batch_size=batch, shuffle=True, generator=g)
        t = time.perf_counter()
        for _ in loader:
            pass
        return time.perf_counter() - t

    res = alternate({"tensor_batches": ours, "dataloader": torch_loader}, 3 if quick else 9)
    s = {k: med(v) for k, v in res.items()}
    speedups = [d / t for d, t in zip(res["dataloader"], res["tensor_batches"], strict=True)]
    return {"samples": n, "batch": batch, "epoch_s": s, "speedup": med(speedups), "speedups": speedups}


class Toggle(L.Callback):
    """Switches the gradient monitor on for odd blocks of `block` steps after `warmup`, off for even ones.

    Off, its hooks return after one comparison (Lightning still dispatches to it: ~15 us/step).
    Adjacent off/on blocks of one run see the same machine state, so their ratio holds
    steady where separate runs on a shared VM differ by 20% (bench/overhead.py history)."""

    def __init__(self, every: int, warmup: int, block: int) -> None:
        self.every, self.warmup, self.block = every, warmup, block
        self.monitor: Any = None

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
        k = (trainer.global_step - self.warmup) // self.block
        self.monitor.every_n = self.every if k >= 0 and k % 2 == 1 else 0


def monitor_run(cfg: Config, every: int, warmup: int, steps: int, block: int) -> tuple[list[float], float]:
    """One `train(cfg)` with the monitor toggled by blocks. Returns the on/off time ratio of each
    adjacent block pair, and the time spent inside the monitor's hooks over the rest of the "on" time."""
    from deepnets.monitor import GradientFlowMonitor

    window, toggle = Window(warmup, steps), Toggle(every, warmup, block)
    inside = [0.0]  # seconds inside the monitor's hooks during the window

    def timed(hook: Callable[..., None]) -> Callable[..., None]:
        def call(trainer: L.Trainer, *args: Any) -> None:
            t = time.perf_counter()
            hook(trainer, *args)
            if warmup <= trainer.global_step < warmup + steps:
                inside[0] += time.perf_counter() - t

        return call

    def wire(found: list[L.Callback]) -> list[L.Callback]:
        (monitor,) = [cb for cb in found if isinstance(cb, GradientFlowMonitor)]
        for name in ("on_before_optimizer_step", "on_train_batch_end"):
            setattr(monitor, name, timed(getattr(monitor, name)))
        toggle.monitor = monitor
        return [toggle, *found, window]

    result = train_with(cfg, wire)
    if result.status != "completed" or len(window.stamps) != steps + 1:
        raise RuntimeError(f"monitor run ended {result.status}: {result.error}")
    t = [window.stamps[i + block] - window.stamps[i] for i in range(0, steps, block)]  # off, on, off, on, ...
    on_time = sum(t[1::2])
    return [on / off for off, on in zip(t[0::2], t[1::2], strict=True)], inside[0] / (on_time - inside[0])


def bench_monitor(tmp: str, quick: bool) -> dict[str, Any]:
    label, model, batch = "MLP 8x256, batch 128", {"arch": "mlp", "depth": 8, "width": 256}, 128
    q = 2 if quick else 1
    out: dict[str, Any] = {"case": label + " (weight_norms off, the default)", "pairs": {}}
    # every step: blocks of 50 steps; every 50: blocks of 100 (two log events per "on" block)
    for name, every, block, steps, runs in (("every_step", 1, 50, 1000, 3), ("every_50", 50, 100, 2000, 2)):
        case = Case("m", label, model, (784,), batch, 100, steps // q, 1, block=block)
        cfg = config(case, tmp, "logging.grad_norm_every_n_steps=1")  # the monitor exists; Toggle drives it
        results = [monitor_run(cfg, every, 100, steps // q, block) for _ in range(max(1, runs // q))]
        ratios = [r for pairs, _ in results for r in pairs]
        out["pairs"][name] = [round(r, 4) for r in ratios]
        out[f"overhead_{name}"] = med(ratios) - 1
        out[f"inside_hooks_{name}"] = med([inside for _, inside in results])
    return out


# ---------------------------------------------------------------- report


def table(r: dict[str, Any]) -> str:
    rows = [
        "| measurement | raw PyTorch | deepnets | Lightning bare | deepnets vs raw | target |",
        "|---|---|---|---|---|---|",
    ]
    targets = {"a": "ratio <= 1.05", "b": "<= +0.2 ms/step", "c": "ratio <= 1.05"}
    for key, t in r["training"].items():
        ms = t["ms_per_step"]
        cmp = f"x{t['ratio_deepnets_raw']:.3f}, {t['extra_ms_deepnets_vs_raw']:+.2f} ms/step"
        check = "loss match" if t["loss_match"] else "LOSS MISMATCH"
        rows.append(
            f"| {t['case']} steps/s ({check}) | {1e3 / ms['raw']:.1f} ({ms['raw']:.2f} ms) "
            f"| {1e3 / ms['deepnets']:.1f} ({ms['deepnets']:.2f} ms) "
            f"| {1e3 / ms['lightning_bare']:.1f} ({ms['lightning_bare']:.2f} ms) | {cmp} | {targets[key]} |"
        )
    ld = r["loader"]
    rows.append(
        f"| one epoch, {ld['samples']} x 784, batch {ld['batch']}: TensorBatches vs DataLoader(TensorDataset) "
        f"| {ld['epoch_s']['dataloader'] * 1e3:.0f} ms (DataLoader) | {ld['epoch_s']['tensor_batches'] * 1e3:.1f} ms "
        f"| | {ld['speedup']:.1f}x faster (median of {len(ld['speedups'])} paired rounds) | >= 10x |"
    )
    m = r["monitor"]
    rows.append(
        f"| gradient monitor, {m['case']}: every 50 steps / every step, on vs off in adjacent blocks "
        f"of one run ({len(m['pairs']['every_50'])} / {len(m['pairs']['every_step'])} pairs) "
        f"| | | | every 50: {m['overhead_every_50']:+.1%}, every step: {m['overhead_every_step']:+.1%} "
        f"(time inside its hooks: {m['inside_hooks_every_50']:.2%} / {m['inside_hooks_every_step']:.1%}) "
        f"| <= 1% / <= 5% |"
    )
    a = r["training"].get("a", {})
    if "matmul_gflops" in a:
        rows.append(
            f"| training GFLOP/s, {a['case']} (6 x weights x batch) vs fp32 matmul 1024^3 "
            f"| {a['achieved_gflops']['raw']:.1f} | {a['achieved_gflops']['deepnets']:.1f} | "
            f"| {a['fraction_of_matmul_peak']:.0%} of {a['matmul_gflops']:.1f} GFLOP/s | >= 50% |"
        )
    return "\n".join(rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, help="write the results here")
    ap.add_argument("--quick", action="store_true", help="fewer steps and repeats (a smoke run)")
    ap.add_argument(
        "--threads", type=int, default=1, help="torch intra-op threads for every contender (default 1: see README)"
    )
    ap.add_argument("--only", default="abclm", help="subset of a b c (training), l (loader), m (monitor)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    result: dict[str, Any] = {
        "machine": {
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "torch": torch.__version__,
            "lightning": L.__version__,
            "python": platform.python_version(),
            "processor": platform.processor() or platform.machine(),
            "loadavg_before": os.getloadavg(),
        },
        "training": {},
    }
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        for case in cases(args.quick):
            if case.key in args.only:
                print(f"... {case.label}", file=sys.stderr, flush=True)
                result["training"][case.key] = bench_training(case, tmp, peak=case.key == "a")
        if "l" in args.only:
            print("... loader", file=sys.stderr, flush=True)
            result["loader"] = bench_loader(args.quick)
        if "m" in args.only:
            print("... gradient monitor", file=sys.stderr, flush=True)
            result["monitor"] = bench_monitor(tmp, args.quick)
    result["machine"]["loadavg_after"] = os.getloadavg()
    result["seconds"] = round(time.perf_counter() - t0, 1)
    if {"loader", "monitor"} <= result.keys() and result["training"]:
        result["table"] = table(result)
        print(result["table"])
    else:
        print(json.dumps(result, indent=2))
    mc = result["machine"]
    print(
        f"\n{mc['cpus']} CPUs, {mc['torch_threads']} torch threads, torch {mc['torch']}, lightning {mc['lightning']}; "
        f"load average {mc['loadavg_before'][0]:.1f} -> {mc['loadavg_after'][0]:.1f}; {result['seconds']} s"
    )
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
