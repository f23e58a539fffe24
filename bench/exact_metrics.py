"""Exact metrics on a device: a short run through deepnets' `train()`, checked against the model applied by hand.

    python bench/exact_metrics.py --device cuda            # precision 32, and bf16-mixed where the GPU has it
    python bench/exact_metrics.py --device cpu             # the same check on the CPU (precision 32)
    python bench/exact_metrics.py --device cpu --precision 32 bf16-mixed

Trains a tiny MLP on digits (sklearn's 8x8, standardized) for a few epochs on `--device`, batch sizes chosen
so the last batch of every split is smaller (train 1294 = 20 x 64 + 14, val 144 = 100 + 44,
test 359 = 3 x 100 + 59: a mean of batch means is not the per-sample mean there). Then it loads the saved
weights (val: checkpoints/last.ckpt, the weights the last validation saw; test: the best checkpoint that
metrics.json names, which `train()` tested and `--export` takes) and applies them by hand
(deepnets.handeval.by_hand: per-sample losses, float64 sums) to the same splits. It compares with that:

- `callback`: trainer.callback_metrics as `train()` returns them (train/val/test),
- `metrics.json`: what the run directory records,
- `per-epoch`: every epoch's logged train and val loss and accuracy (`train/loss@2`: epoch 2), against the
  model applied by hand to each training batch at the weights its step used, and to the val split at the
  weights each validation saw (a callback records both during the run),
- `evaluate()`: deepnets.export.evaluate of the run's export (what `--evaluate` runs, plain PyTorch on the CPU),
- `--evaluate`: the CLI `deepnets --evaluate EXPORT_DIR` in a subprocess (prints 4 decimals).

One PASS/FAIL row per metric and source; exit 1 on any FAIL, 2 on bad arguments (one `error:` line).

Tolerances (the reference is float64; the run reduces in float32):
- precision 32, loss: rtol 1e-4. The run's forward is float32 (unit roundoff u = 6e-8; TF32 stays off, torch's
  default, and deepnets never turns it on: the script checks). A logit's error is ~ sqrt(fan-in) u |logit|
  <= 1e-5 relative for fan-in <= 64; the per-batch loss sums (<= 100 terms, tree reductions) and the
  RunningMean over <= 21 batches add ~ log2(100) u + 21 u < 2e-6. Measured gap on the CPU: ~1e-7; rtol 1e-4
  leaves a margin of 100 for GPU kernels and is still far below the error it must catch (the script checks
  that the mean of batch means misses by > 10 x the tolerance, else the check is blind: FAIL).
- precision 32, accuracy: exact (abs 1e-6, the float32 rounding of k/n): an argmax flips only where the top two
  logits are within ~1e-5, which a trained digits MLP does not produce on 503 samples (a flip is a FAIL to look
  at, not noise to hide).
- bf16-mixed: the forward is bf16 (u = 2^-8 = 4e-3), so the float64 model is no reference for it. The reference
  is the same weights applied by hand under the same autocast on the same device with the eval loader's batch
  size (the same kernels), logits taken to float64 and reduced by hand: that checks the reduction, with the
  float32 tolerances above. The gap between bf16 and the float64 model is printed as INFO rows, not judged.
- evaluate() / --evaluate: the CPU float32 forward vs float64: the float32 tolerances; `--evaluate` prints
  4 decimals, so abs 5e-5 more.

`--fault drop-batch-weights` (for tests/test_exact_metrics_script.py) makes deepnets' epoch means ignore the
batch sizes, as MeanMetric(nan_strategy="disable") did in torchmetrics 1.9: the callback, metrics.json and
evaluate() rows must then FAIL.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # deepnets from this checkout, installed or not

import torch  # noqa: E402
from torch import nn  # noqa: E402

TRAIN_BATCH, EVAL_BATCH, EPOCHS = 64, 100, 3
LOSS_RTOL, ACC_ATOL, PRINT_ATOL = 1e-4, 1e-6, 5e-5
BLIND_FACTOR = 10  # the wrong (mean of batch means) loss must miss by this many tolerances
EVAL_METRICS = ("val/loss", "val/acc", "test/loss", "test/acc")
METRICS = ("train/loss", "train/acc", *EVAL_METRICS)


@dataclass
class Row:
    precision: str
    metric: str
    source: str
    got: float
    want: float
    tol: str
    ok: bool | None  # None: INFO

    def line(self) -> str:
        verdict = "INFO" if self.ok is None else "PASS" if self.ok else "FAIL"
        diff = self.got - self.want
        return (
            f"| {verdict} | {self.precision:<10} | {self.metric:<9} | {self.source:<12} | {self.got:.8f} "
            f"| {self.want:.8f} | {diff:+.2e} | {self.tol} |"
        )


def close(metric: str, got: float, want: float, extra_atol: float = 0.0) -> tuple[bool, str]:
    if metric.endswith("/acc"):
        atol = ACC_ATOL + extra_atol
        return abs(got - want) <= atol, f"abs {atol:.0e}"
    return abs(got - want) <= LOSS_RTOL * abs(want) + extra_atol, f"rtol {LOSS_RTOL:.0e}" + (
        f" + abs {extra_atol:.0e}" if extra_atol else ""
    )


def drop_batch_weights() -> None:
    """The fault the check must catch: every batch counts once in an epoch mean, whatever its size."""
    from deepnets import module

    cls = getattr(module, "RunningMean", None)
    if cls is None:
        raise SystemExit("error: --fault drop-batch-weights: deepnets.module has no RunningMean to patch")

    def _add(self: nn.Module, total: torch.Tensor, weight: torch.Tensor | float) -> None:
        self.total.add_(total / weight)  # the batch mean
        self.weight.add_(1)  # one per batch
        if not self._update_count:
            self._update_count = 1
        self._computed = None

    cls._add = _add


def run_config(out: Path, device: str, precision: str, seed: int):  # -> Config
    from deepnets.config import load_config

    return load_config(
        None,
        [
            f"name=exact_{precision}",
            f"output_dir={out}",
            f"seed={seed}",
            "model.arch=mlp",  # no BatchNorm, no dropout: the eval forward is a plain function of the weights
            "model.depth=2",
            "model.width=32",
            "data.name=digits",
            f"data.batch_size={TRAIN_BATCH}",
            f"data.eval_batch_size={EVAL_BATCH}",
            "optim.name=sgd",
            "optim.lr=0.05",
            f"trainer.accelerator={device}",
            "trainer.devices=1",
            f"trainer.precision={precision}",
            f"trainer.max_epochs={EPOCHS}",
            "trainer.progress_bar=false",
            "logging.grad_norm_every_n_steps=0",
        ],
    )


def recorder(autocast: torch.dtype | None):  # -> lightning.Callback
    """A callback keeping what the run's own numbers must equal, per epoch: the training loss and accuracy of
    the model applied by hand to each batch at the weights that step's forward used (float64 sums), the weights
    each validation saw, and what the run logged for both (trainer.callback_metrics once they are final)."""
    import copy

    import lightning as L

    from deepnets.handeval import by_hand

    class Record(L.Callback):
        def __init__(self) -> None:
            self.train: list[list[float]] = []  # per epoch: [loss sum, correct, n] by hand
            self.logged_train: list[tuple[float, float]] = []
            self.val_states: list[dict[str, torch.Tensor]] = []
            self.logged_val: list[tuple[float, float]] = []

        def _logged_train(self, trainer: L.Trainer) -> None:
            m = trainer.callback_metrics  # the last epoch's epoch-level values, final after its end hooks
            self.logged_train.append((float(m["train/loss"]), float(m["train/acc"])))

        def on_train_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            if self.train:
                self._logged_train(trainer)
            self.train.append([0.0, 0.0, 0.0])

        def on_train_end(self, trainer: L.Trainer, pl_module: Any) -> None:
            self._logged_train(trainer)

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int) -> None:
            x, y = batch  # the weights this step's forward uses, under the run's autocast
            loss, acc = by_hand(pl_module.model, x, y, autocast=autocast)
            self.train[-1][0] += loss * len(y)
            self.train[-1][1] += acc * len(y)
            self.train[-1][2] += len(y)

        def on_validation_epoch_start(self, trainer: L.Trainer, pl_module: Any) -> None:
            self.val_states.append(copy.deepcopy(pl_module.model.state_dict()))

        def on_validation_end(self, trainer: L.Trainer, pl_module: Any) -> None:
            m = trainer.callback_metrics
            self.logged_val.append((float(m["val/loss"]), float(m["val/acc"])))

    return Record()


def check_precision(out: Path, device: str, precision: str, seed: int, cli: bool) -> list[Row]:
    from deepnets.checkpoint import load_checkpoint
    from deepnets.data import load_splits
    from deepnets.export import best_checkpoint, evaluate, export_run
    from deepnets.handeval import by_hand, mean_of_batch_means
    from deepnets.models import build_model
    from deepnets.run import train

    cfg = run_config(out, device, precision, seed)
    record = recorder(torch.bfloat16 if precision == "bf16-mixed" else None)
    result = train(cfg, callbacks=[record])
    if not result.ok:
        raise RuntimeError(f"precision {precision}: the run ended {result.status}: {result.error}")
    run_dir = result.run_dir
    s = load_splits(cfg.data, cfg.seed)  # what the run's data module reads, standardized the same way
    sizes = {
        "train": (len(s.y_train), TRAIN_BATCH),
        "val": (len(s.y_val), EVAL_BATCH),
        "test": (len(s.y_test), EVAL_BATCH),
    }
    for split, (n, b) in sizes.items():
        if n % b == 0 or n < b:  # the check would not see a dropped batch weight there
            raise RuntimeError(f"{split} split: {n} samples in batches of {b} leave no smaller last batch")
    num_classes = int(s.y_train.max()) + 1

    def model_with(state: dict[str, torch.Tensor]) -> nn.Module:
        model = build_model(cfg.model, tuple(s.x_train.shape[1:]), num_classes)
        model.load_state_dict(state)
        return model.eval()

    def model_from(ckpt: Path) -> nn.Module:
        state = load_checkpoint(ckpt)["state_dict"]
        return model_with({k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")})

    def bf16_reference(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> tuple[float, float]:
        """The same weights under the same autocast on the device, with the eval loader's batches (its kernels),
        reduced by hand: what a bf16 run's numbers are judged against."""
        dev = torch.device(device)
        return by_hand(model.float().to(dev), x.to(dev), y.to(dev), batch_size=EVAL_BATCH, autocast=torch.bfloat16)

    models = {"val": model_from(run_dir / "checkpoints" / "last.ckpt"), "test": model_from(best_checkpoint(run_dir))}
    data = {"val": (s.x_val, s.y_val), "test": (s.x_test, s.y_test)}
    exact: dict[str, float] = {}  # float64 model, float64 sums
    ref: dict[str, float] = {}  # the reference each source is judged against
    rows: list[Row] = []
    for split in ("val", "test"):
        x, y = data[split]
        exact[f"{split}/loss"], exact[f"{split}/acc"] = by_hand(models[split].double(), x.double(), y)
        wrong = mean_of_batch_means(models[split], x.double(), y, EVAL_BATCH)
        gap, tol = abs(wrong - exact[f"{split}/loss"]), LOSS_RTOL * exact[f"{split}/loss"]
        rows.append(
            Row(
                precision,
                f"{split}/loss",
                "blind?",
                wrong,
                exact[f"{split}/loss"],
                f"miss > {BLIND_FACTOR} x tol",
                gap > BLIND_FACTOR * tol,
            )
        )
        if precision == "bf16-mixed":
            ref[f"{split}/loss"], ref[f"{split}/acc"] = bf16_reference(models[split], x, y)
        else:
            ref[f"{split}/loss"], ref[f"{split}/acc"] = exact[f"{split}/loss"], exact[f"{split}/acc"]
    # training: every epoch's logged loss and accuracy, and the final ones in callback / metrics.json, against the
    # model applied by hand to each batch at its step's weights (for bf16 under the same autocast: that checks
    # the reduction); validation: every epoch's against the weights that validation saw
    loss_sum, correct, n = record.train[-1]
    ref["train/loss"], ref["train/acc"] = loss_sum / n, correct / n
    for e, ((lsum, corr, count), (loss, acc)) in enumerate(zip(record.train, record.logged_train, strict=True), 1):
        for metric, got, want in (("train/loss", loss, lsum / count), ("train/acc", acc, corr / count)):
            ok, tol = close(metric, got, want)
            rows.append(Row(precision, f"{metric}@{e}", "per-epoch", got, want, tol, ok))
    x, y = data["val"]
    for e, (state, (loss, acc)) in enumerate(zip(record.val_states, record.logged_val, strict=True), 1):
        model = model_with(state)
        want = bf16_reference(model, x, y) if precision == "bf16-mixed" else by_hand(model.double(), x.double(), y)
        for metric, got, w in (("val/loss", loss, want[0]), ("val/acc", acc, want[1])):
            ok, tol = close(metric, got, w)
            rows.append(Row(precision, f"{metric}@{e}", "per-epoch", got, w, tol, ok))
    if len(record.val_states) != EPOCHS or len(record.train) != EPOCHS:
        rows.append(Row(precision, "epochs", "per-epoch", len(record.val_states), EPOCHS, "count", False))
    on_disk = json.loads((run_dir / "metrics.json").read_text())["metrics"]
    for source, metrics in (("callback", result.metrics), ("metrics.json", on_disk)):
        for metric in METRICS:
            if metric not in metrics:
                rows.append(Row(precision, metric, source, float("nan"), ref[metric], "missing", False))
                continue
            ok, tol = close(metric, float(metrics[metric]), ref[metric])
            rows.append(Row(precision, metric, source, float(metrics[metric]), ref[metric], tol, ok))
    if precision == "bf16-mixed":
        for metric in EVAL_METRICS:
            rows.append(Row(precision, metric, "bf16-vs-f64", ref[metric], exact[metric], "not judged", None))
    export = export_run(run_dir)
    evaluated = evaluate(export)  # the CPU float32 model, the float64 test reference
    for metric in ("test/loss", "test/acc"):
        ok, tol = close(metric, evaluated[metric], exact[metric])
        rows.append(Row(precision, metric, "evaluate()", evaluated[metric], exact[metric], tol, ok))
    if cli:
        proc = subprocess.run(
            [sys.executable, "-m", "deepnets.cli", "--evaluate", str(export)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        printed = dict(kv.split("=", 1) for kv in proc.stdout.split() if "=" in kv)
        for metric in ("test/loss", "test/acc"):
            if proc.returncode != 0 or metric not in printed:
                why = (proc.stderr.strip().splitlines() or [f"rc {proc.returncode}"])[-1]
                rows.append(Row(precision, metric, "--evaluate", float("nan"), exact[metric], why[:40], False))
                continue
            ok, tol = close(metric, float(printed[metric]), exact[metric], PRINT_ATOL)
            rows.append(Row(precision, metric, "--evaluate", float(printed[metric]), exact[metric], tol, ok))
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", choices=("cuda", "cpu"), required=True)
    p.add_argument(
        "--precision", nargs="+", choices=("32", "bf16-mixed"), help="default: 32, and bf16-mixed on a GPU that has it"
    )
    p.add_argument("--out", help="folder for the run directories (default: a temporary one, removed)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-cli", action="store_true", help="skip the `deepnets --evaluate` subprocess rows")
    p.add_argument("--fault", choices=("drop-batch-weights",), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("error: --device cuda: no GPU visible to torch", file=sys.stderr)
        return 2
    precisions = args.precision or ["32"]
    if args.precision is None and args.device == "cuda" and torch.cuda.is_bf16_supported():
        precisions.append("bf16-mixed")
    if args.device == "cuda" and torch.backends.cuda.matmul.allow_tf32:  # the float32 tolerance assumes no TF32
        print("error: torch.backends.cuda.matmul.allow_tf32 is on: float32 matmuls are TF32", file=sys.stderr)
        return 2
    if args.fault == "drop-batch-weights":
        drop_batch_weights()
    warnings.filterwarnings("ignore", module="lightning")  # Lightning's hints; the rows are the output
    name = torch.cuda.get_device_name() if args.device == "cuda" else "cpu"
    print(f"exact_metrics: device {name}, torch {torch.__version__}, precisions {' '.join(precisions)}")
    print("| verdict | precision  | metric    | source       | got        | hand       | diff      | tolerance |")
    print("|---|---|---|---|---|---|---|---|")
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="deepnets_exact_") as tmp:
        out = Path(args.out) if args.out else Path(tmp)
        for precision in precisions:
            try:
                got = check_precision(out, args.device, precision, args.seed, cli=not args.no_cli)
            except Exception as e:  # one precision failing leaves the other's rows standing
                got = [
                    Row(
                        precision,
                        "run",
                        "train()",
                        float("nan"),
                        float("nan"),
                        f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:80],
                        False,
                    )
                ]
            for row in got:
                print(row.line(), flush=True)
            rows += got
    failed = [r for r in rows if r.ok is False]
    judged = sum(r.ok is not None for r in rows)
    if args.device == "cuda":  # what the float32 rows ran under (TF32 would loosen them: "high"/"medium")
        print(f"exact_metrics: float32 matmul precision after the runs: {torch.get_float32_matmul_precision()}")
    print(f"exact_metrics: {'FAIL' if failed else 'PASS'} ({len(failed)} of {judged} rows failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
