"""Initialisation, "small but different": what identical, zero, too large and sensible initial weights do.

One zoo MLP (4 hidden layers of width 64, ReLU unless noted) on digits, the same
data order and optimiser (SGD, momentum 0.9) for each initial state:

- zoo default (PyTorch's Linear init) and kaiming (He et al. 2015): train;
- identical: every weight of a layer the same number. Each unit of a layer then
  computes the same function and, since its outgoing weights are identical too,
  receives the same gradient: the units stay copies of each other for ever and
  the layer's weight matrix keeps rank 1 (measured by its singular values
  during training). The net is as good as one of width 1;
- all zero: every hidden activation is relu(0) = 0 and every hidden weight's
  gradient is 0 (it is the product of a zero activation or a zero weight), so
  only the head's bias learns: the class frequencies, ~10% accuracy;
- too large, ReLU (weights N(0, 1), ~6x kaiming's std at width 64): the
  logits grow ~6x per layer, the first loss is huge and SGD explodes;
- too large, tanh (N(0, 1)): the units saturate at +-1, tanh' ~ 0 there, and
  the gradient through them vanishes.

    python -m deepnets.experiments init [--steps 600] [--quick]

Hand-written loop rather than the Lightning trainer: every step's loss and
every layer's rank are recorded, for six tiny nets, and Lightning's start-up
would cost more than the training.

Writes into `<out>/init/version_<n>/`: `init.png` (training-loss curves and
the rank of the first hidden layer's weights), `init.{csv,md}` (one row per
initialisation, with whether it agrees with the lecture) and `curves.csv`;
prints the table.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepnets.config import DataConfig
from deepnets.data import load_splits
from deepnets.errors import UserError
from deepnets.experiments.common import base_parser, new_run_dir, plt, save_figure, torch_threads, verdict, write_table
from deepnets.models import build_model, depth_ordered_layers

RANK_RTOL = 1e-4  # singular values below this times the largest count as 0 (float32 rounding sits at ~1e-7)
SATURATED = 0.99  # |tanh| above this: tanh' < 0.02


@dataclass(frozen=True)
class Init:
    """One initial state: a label, the zoo's `model:` section and an optional in-place edit of the weights."""

    label: str
    model: dict[str, Any]
    edit: Callable[[nn.Module], None] | None = None


def _identical(model: nn.Module) -> None:
    """Make every unit of every hidden layer a copy of the first, keeping the default init's scale.

    W1's rows all become its first row (one random vector over the inputs).
    Identical incoming weights are not enough: a unit's gradient also depends
    on its outgoing weights, so those must agree across the layer's units too.
    Hence every later hidden W is one constant, 1 / width (the layer averages
    its identical inputs), and the head's row for class j is v_j / width.
    """
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    with torch.no_grad():
        first = linears[0]
        first.weight.copy_(first.weight[:1].expand_as(first.weight))
        if first.bias is not None:
            first.bias.fill_(float(first.bias[0]))
        for m in linears[1:-1]:
            m.weight.fill_(1 / m.in_features)
            if m.bias is not None:
                m.bias.zero_()
        head = linears[-1]
        head.weight.copy_(head.weight[:, :1].expand_as(head.weight) * math.sqrt(3 / head.in_features))


def _zero(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


def inits(depth: int, width: int) -> list[Init]:
    base = {"arch": "mlp", "depth": depth, "width": width, "activation": "relu"}
    return [
        Init("zoo default", base),
        Init("kaiming", {**base, "init": "kaiming"}),
        Init("identical units", base, _identical),
        Init("all zero", base, _zero),
        Init("too large, relu: N(0, 1)", {**base, "init": "normal", "init_std": 1.0}),
        Init("too large, tanh: N(0, 1)", {**base, "activation": "tanh", "init": "normal", "init_std": 1.0}),
    ]


def layer_ranks(model: nn.Module) -> list[int]:
    """Numerical rank of each hidden layer's weight matrix (the head excluded)."""
    out = []
    for _, w in depth_ordered_layers(model)[:-1]:
        s = torch.linalg.svdvals(w.detach().double())
        out.append(int((s > RANK_RTOL * s[0]).sum()) if s[0] > 0 else 0)
    return out


def saturation(model: nn.Module, x: Tensor) -> float:
    """Fraction of hidden tanh/sigmoid-like activations with |h| > SATURATED on x (0 for ReLU nets)."""
    acts: list[Tensor] = []
    hooks = [
        m.register_forward_hook(lambda _m, _i, o: acts.append(o)) for m in model.modules() if isinstance(m, nn.Tanh)
    ]
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    if not acts:
        return 0.0
    return float(torch.cat([a.flatten() for a in acts]).abs().gt(SATURATED).float().mean())


def train_one(
    init: Init, x: Tensor, y: Tensor, xt: Tensor, yt: Tensor, steps: int, every: int, lr: float, seed: int
) -> dict[str, Any]:
    """Train one initial state; the curves every `every` steps and the final numbers."""
    torch.manual_seed(seed)
    model = build_model(init.model, tuple(x.shape[1:]), 10)
    if init.edit is not None:
        init.edit(model)
    hidden0 = [w.detach().clone() for _, w in depth_ordered_layers(model)[:-1]]
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    g = torch.Generator().manual_seed(seed)  # the same batches for every initialisation
    curve: list[dict[str, Any]] = []
    sat0 = saturation(model, x)
    diverged_at: int | None = None
    for step in range(steps + 1):
        if step % every == 0 or step == steps:
            with torch.no_grad():
                loss = F.cross_entropy(model(x), y).item()
            ranks = layer_ranks(model) if math.isfinite(loss) else []
            curve.append(
                {
                    "init": init.label,
                    "step": step,
                    "train loss": loss,
                    "rank W1": ranks[0] if ranks else "",
                    "max rank, hidden layers": max(ranks, default=""),
                }
            )
            if not math.isfinite(loss):
                diverged_at = step
                break
        if step == steps:
            break
        idx = torch.randint(0, len(x), (64,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x[idx]), y[idx]).backward()
        opt.step()
    with torch.no_grad():
        acc = float((model(xt).argmax(1) == yt).float().mean()) if diverged_at is None else math.nan
    moved = max(
        float((w.detach() - w0).abs().max())
        for (_, w), w0 in zip(depth_ordered_layers(model)[:-1], hidden0, strict=True)
    )
    return {
        "curve": curve,
        "loss0": curve[0]["train loss"],
        "loss": curve[-1]["train loss"],
        "acc": acc,
        "diverged_at": diverged_at,
        "rank0": layer_ranks_from(curve[0]),
        "max_rank": max((c["max rank, hidden layers"] for c in curve if c["max rank, hidden layers"] != ""), default=0),
        "moved": moved,
        "saturation0": sat0,
        "saturation": saturation(model, x) if diverged_at is None else math.nan,
    }


def layer_ranks_from(point: dict[str, Any]) -> Any:
    return point["rank W1"]


def judge(label: str, r: dict[str, Any], width: int, ref_loss: float) -> str:
    """Does this run show what the lecture says about its initialisation? In words."""
    ln10 = math.log(10)
    if label in ("zoo default", "kaiming"):
        ok = r["diverged_at"] is None and r["loss"] < 0.5 * ln10 and r["acc"] > 0.5  # well below chance
        return verdict(ok, f"trains: loss {r['loss0']:.2f} -> {r['loss']:.3g}, test accuracy {r['acc']:.3f}")
    if label.startswith("identical"):
        ok = r["max_rank"] == 1
        return verdict(
            ok,
            f"every hidden weight matrix keeps rank {r['max_rank']} (of {width}) throughout: the units stay copies, "
            f"test accuracy {r['acc']:.3f}",
        )
    if label == "all zero":
        ok = r["moved"] == 0 and r["loss"] > 0.9 * ln10 * 0.95 and r["acc"] < 0.25
        return verdict(
            ok,
            f"hidden weights moved by {r['moved']:.1g}; loss {r['loss0']:.3f} -> {r['loss']:.3f} (ln 10 = {ln10:.3f}), "
            f"test accuracy {r['acc']:.3f}: only the class frequencies are learnt",
        )
    if "relu" in label:
        ok = r["diverged_at"] is not None or r["loss0"] > 10 * ln10
        end = (
            f"diverged (loss not finite) at step {r['diverged_at']}"
            if r["diverged_at"] is not None
            else (f"final loss {r['loss']:.3g}")
        )
        return verdict(ok, f"first loss {r['loss0']:.3g} (ln 10 = {ln10:.2f}); {end}")
    ok = r["saturation0"] > 0.5 and (r["diverged_at"] is not None or r["loss"] > 2 * ref_loss)
    return verdict(
        ok,
        f"{r['saturation0']:.0%} of hidden units saturated (|h| > {SATURATED}) at the start, {r['saturation']:.0%} "
        f"at the end; final loss {r['loss']:.3f} vs {ref_loss:.3f} for kaiming",
    )


def plot(results: dict[str, dict[str, Any]], path: Path) -> Path:
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.6))
    for label, r in results.items():
        pts = r["curve"]
        (line,) = a.semilogy([p["step"] for p in pts], [p["train loss"] for p in pts], "-", label=label)
        if r["diverged_at"] is not None:
            a.annotate(
                "not finite",
                (pts[-1]["step"], pts[-2]["train loss"] if len(pts) > 1 else 1.0),
                color=line.get_color(),
                fontsize=8,
            )
        ranked = [p for p in pts if p["rank W1"] != ""]
        b.plot([p["step"] for p in ranked], [p["rank W1"] for p in ranked], "-", color=line.get_color(), label=label)
    a.axhline(math.log(10), color="gray", ls=":", lw=1)
    a.set(xlabel="SGD step", ylabel="training loss (whole training split)", title="loss curves (gray: ln 10, chance)")
    a.legend(fontsize=8)
    a.grid(True, which="both", alpha=0.3)
    b.set(
        xlabel="SGD step",
        ylabel=f"rank of W1 (singular values > {RANK_RTOL:g} x largest)",
        title="first hidden layer's weight matrix: rank",
    )
    b.grid(True, alpha=0.3)
    return save_figure(fig, path)


def run(out: Path, steps: int, every: int, lr: float, depth: int, width: int, seed: int = 0) -> dict[str, Any]:
    s = load_splits(DataConfig(name="digits", standardize=True), seed=0)
    results: dict[str, dict[str, Any]] = {}
    for init in inits(depth, width):
        results[init.label] = train_one(init, s.x_train, s.y_train, s.x_test, s.y_test, steps, every, lr, seed)
    ref = results["kaiming"]["loss"]
    rows = []
    for label, r in results.items():
        rows.append(
            {
                "init": label,
                "train loss @ 0": r["loss0"],
                "train loss, end": r["loss"],
                "test acc": r["acc"],
                "rank W1 @ 0": r["rank0"],
                "max rank of a hidden W": r["max_rank"],
                "hidden weights moved (max abs)": r["moved"],
                "saturated @ 0": r["saturation0"],
                "agrees with the lecture?": judge(label, r, width, ref),
            }
        )
    write_table([p for r in results.values() for p in r["curve"]], out / "curves")
    plot(results, out / "init.png")
    return {"rows": rows, "results": results, "summary": write_table(rows, out / "init")}


def main(argv: list[str] | None = None) -> int:
    p = base_parser("init", __doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=600, help="SGD steps per net (default 600)")
    p.add_argument("--every", type=int, default=10, help="record loss and rank every N steps (default 10)")
    p.add_argument("--lr", type=float, default=0.05, help="SGD learning rate, momentum 0.9 (default 0.05)")
    p.add_argument("--depth", type=int, default=4, help="hidden layers (default 4)")
    p.add_argument("--width", type=int, default=64, help="hidden width (default 64)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these nets are tiny)")
    args = p.parse_args(argv)
    for flag in ("steps", "every", "depth", "width", "threads"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag}: must be >= 1, got {getattr(args, flag)}")
    if not args.lr > 0:
        raise UserError(f"--lr: must be > 0, got {args.lr}")
    if args.quick:
        args.steps, args.every = min(args.steps, 80), min(args.every, 10)
    out = new_run_dir(args.out, "init")
    print(f"initialisation: mlp depth {args.depth}, width {args.width}, {args.steps} SGD steps; run directory {out}")
    with torch_threads(args.threads):
        res = run(out, args.steps, args.every, args.lr, args.depth, args.width, args.seed)
    print(res["summary"])
    print(f"figure: {out / 'init.png'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
