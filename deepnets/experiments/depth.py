"""Depth efficiency: a depth-k ReLU net of width 2 is a sawtooth that one hidden layer needs ~2^k units for.

The tent map t(x) = 2x on [0, 1/2], 2(1 - x) on [1/2, 1] is a width-2 ReLU layer,
t(x) = 2 relu(x) - 4 relu(x - 1/2), so its k-fold composition t^k, a sawtooth
with 2^k linear pieces, is exactly a ReLU net with k hidden layers of width 2
(6k + 1 parameters). A net with one hidden layer of width m on a 1-D input is
piecewise linear with at most m + 1 pieces, so it needs m >= 2^k - 1 units to be
t^k, and far from that its error stays near the error of a constant
(Telgarsky 2016, "Benefits of depth in neural networks").

Measured for k = 2..8 on [0, 1] (test: mean squared error on fresh uniform points;
predicting the mean 1/2 everywhere scores Var(t^k) = 1/12 = 0.083):

- deep, exact: the construction above, checked in float64;
- shallow, exact: m = 2^k units with breakpoints at j / 2^k (3 * 2^k + 1 parameters);
- shallow, trained: m random breakpoints (uniform in [0, 1]) and the output layer
  fitted by least squares, the global optimum of the convex part, at growing m
  (in a prototype, Adam on all parameters stayed near the constant's error
  from k = 4 on: the head must reach slopes of +-2^k; so this is the shallow
  net's best showing, not a straw man);
- deep, trained: nets of the exact construction's shape (k hidden layers of width
  2) from PyTorch's default init, trained by Adam and by SGD with momentum on
  the same training points. In our runs they all fail, ending near the
  constant's error (a likely reason: once a unit of a width-2 layer is dead on
  all of [0, 1], the layer passes on one linear piece). The function class
  holds t^k; gradient descent from a random init does not find it.

    python -m deepnets.experiments depth [--quick] [--seeds 3]

Writes into `<out>/depth/version_<n>/`: `depth.png` (test error vs parameters,
one panel per k, and the parameters each family needs per k), `depth.{csv,md}`
(every net), `summary.{csv,md}` (one row per k, with whether it agrees with the
lecture); prints the summary.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from deepnets.errors import UserError
from deepnets.experiments.common import base_parser, new_run_dir, plt, save_figure, torch_threads, verdict, write_table

DTYPE = torch.float64  # the exact construction's error is rounding only: show it at float64's level
BASELINE = 1 / 12  # test MSE of the constant 1/2: Var(t^k(U)) for U uniform on [0, 1]
EXACT_TOL = 1e-10  # "represents t^k exactly": max |error| below this
GOOD = 0.1 * BASELINE  # "fits t^k": test mse below a tenth of the constant's


@dataclass
class Sizes:
    """Problem sizes of one run (`--quick` shrinks them)."""

    ks: tuple[int, ...] = (2, 3, 4, 5, 6, 7, 8)
    points_per_piece: int = 32  # training points per linear piece of t^k
    test_points: int = 8192
    max_width_factor: int = 4  # shallow widths 2, 4, ..., max_width_factor * 2^k
    deep_steps: int = 2000
    deep_seeds: int = 3


QUICK = Sizes(ks=(2, 3, 4), points_per_piece=16, test_points=2048, max_width_factor=2, deep_steps=300, deep_seeds=1)


def tent_power(x: Tensor, k: int) -> Tensor:
    """t^k(x) by direct iteration of the tent map (the reference, no net involved)."""
    for _ in range(k):
        x = torch.where(x <= 0.5, 2 * x, 2 * (1 - x))
    return x


def deep_net(k: int) -> nn.Sequential:
    """An MLP with k hidden ReLU layers of width 2 and a linear head (6k + 1 parameters)."""
    layers: list[nn.Module] = []
    for i in range(k):
        layers += [nn.Linear(1 if i == 0 else 2, 2), nn.ReLU()]
    return nn.Sequential(*layers, nn.Linear(2, 1)).to(DTYPE)


def exact_deep_net(k: int) -> nn.Sequential:
    """Telgarsky's construction: layer i computes (relu(y), relu(y - 1/2)) of y = t^(i-1)(x).

    y = 2 h_1 - 4 h_2 of the previous layer's units is folded into the next
    layer's weights, so each layer after the first has W = [[2, -4], [2, -4]].
    """
    net = deep_net(k)
    linears = [m for m in net if isinstance(m, nn.Linear)]
    with torch.no_grad():
        linears[0].weight.copy_(torch.tensor([[1.0], [1.0]]))
        for lin in linears[1:-1]:
            lin.weight.copy_(torch.tensor([[2.0, -4.0], [2.0, -4.0]]))
        for lin in linears[:-1]:
            lin.bias.copy_(torch.tensor([0.0, -0.5]))
        linears[-1].weight.copy_(torch.tensor([[2.0, -4.0]]))
        linears[-1].bias.zero_()
    return net


def shallow_net(breakpoints: Tensor, signs: Tensor) -> nn.Sequential:
    """One hidden layer: unit j is relu(s_j (x - b_j)), a kink at b_j; the head is left to fit."""
    m = len(breakpoints)
    net = nn.Sequential(nn.Linear(1, m), nn.ReLU(), nn.Linear(m, 1)).to(DTYPE)
    with torch.no_grad():
        net[0].weight.copy_(signs[:, None])
        net[0].bias.copy_(-signs * breakpoints)
    return net


def fit_head(net: nn.Sequential, x: Tensor, y: Tensor) -> None:
    """Set the output layer to the least-squares optimum for the fixed hidden layer (convex in the head)."""
    with torch.no_grad():
        H = torch.cat([net[:2](x), torch.ones_like(x)], 1)  # (n, m + 1): features and the bias column
        sol = torch.linalg.lstsq(H, y, driver="gelsd").solution  # (m + 1, 1); gelsd: rank-deficient H is fine
        net[2].weight.copy_(sol[:-1].T)
        net[2].bias.copy_(sol[-1])


def exact_shallow_net(k: int, x: Tensor, y: Tensor) -> nn.Sequential:
    """2^k units with kinks at j / 2^k (j = 0 .. 2^k - 1): t^k is exactly their combination."""
    m = 2**k
    net = shallow_net(torch.arange(m, dtype=DTYPE) / m, torch.ones(m, dtype=DTYPE))
    fit_head(net, x, y)
    return net


def params(net: nn.Module) -> int:
    return sum(p.numel() for p in net.parameters())


def test_mse(net: nn.Module, x: Tensor, y: Tensor) -> tuple[float, float]:
    """(mean squared error, max absolute error) of `net` on (x, y)."""
    with torch.no_grad():
        err = net(x) - y  # (n, 1)
    return float((err**2).mean()), float(err.abs().max())


def train_deep(k: int, x: Tensor, y: Tensor, optimizer: str, steps: int, seed: int) -> nn.Sequential:
    """The exact construction's shape from PyTorch's default init, full-batch, cosine-annealed lr."""
    torch.manual_seed(seed)
    net = deep_net(k)
    if optimizer == "adam":
        opt: torch.optim.Optimizer = torch.optim.Adam(net.parameters(), lr=1e-2)
    else:
        opt = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps)
    for _ in range(steps):
        opt.zero_grad()
        loss = ((net(x) - y) ** 2).mean()
        loss.backward()
        opt.step()
        sched.step()
    return net


def run_k(k: int, s: Sizes, seed: int) -> list[dict[str, Any]]:
    """Every net for one k: deep exact, shallow exact, shallow trained at each width, deep trained."""
    g = torch.Generator().manual_seed(seed + 1000 * k)
    n = s.points_per_piece * 2**k
    x = ((torch.arange(n) + torch.rand(n, generator=g)) / n).to(DTYPE)[:, None]  # (n, 1): one per cell
    y = tent_power(x, k)
    xt = torch.rand(s.test_points, 1, generator=g, dtype=DTYPE)  # (n_test, 1), fresh points
    yt = tent_power(xt, k)
    rows = []

    def row(family: str, net: nn.Module, width: int | str, note: str = "") -> None:
        mse, worst = test_mse(net, xt, yt)
        rows.append(
            {
                "k": k,
                "pieces": 2**k,
                "family": family,
                "width": width,
                "params": params(net),
                "test mse": mse,
                "max abs error": worst,
                "note": note,
            }
        )

    row("deep, exact", exact_deep_net(k), 2, f"{k} hidden layers")
    row("shallow, exact", exact_shallow_net(k, x, y), 2**k, "kinks at j / 2^k")
    m = 2
    while m <= s.max_width_factor * 2**k:
        b = torch.rand(m, generator=g, dtype=DTYPE)
        sign = torch.where(torch.rand(m, generator=g) < 0.5, -1.0, 1.0).to(DTYPE)
        net = shallow_net(b, sign)
        fit_head(net, x, y)
        row("shallow, trained", net, m, "random kinks, least-squares head")
        m *= 2
    for opt in ("adam", "sgd"):
        for i in range(s.deep_seeds):
            net = train_deep(k, x, y, opt, s.deep_steps, seed + i)
            row(f"deep, trained ({opt})", net, 2, f"seed {seed + i}, {s.deep_steps} steps")
    return rows


def summarise(rows: list[dict[str, Any]], ks: tuple[int, ...]) -> list[dict[str, Any]]:
    """One row per k: the deep exact net's error and size, what the shallow nets need, the deep trained nets."""
    out = []
    for k in ks:
        rk = [r for r in rows if r["k"] == k]
        deep = next(r for r in rk if r["family"] == "deep, exact")
        sh_exact = next(r for r in rk if r["family"] == "shallow, exact")
        shallow = [r for r in rk if r["family"] == "shallow, trained"]
        # the shallow net closest in size to the deep construction (from above): same budget, how far off?
        same = min((r for r in shallow if r["params"] >= deep["params"]), key=lambda r: r["params"], default=None)
        good = [r for r in shallow if r["test mse"] < GOOD]
        trained = [r for r in rk if r["family"].startswith("deep, trained")]
        best = min(trained, key=lambda r: r["test mse"])
        found = sum(r["test mse"] < GOOD for r in trained)
        exact_ok = deep["max abs error"] < EXACT_TOL
        lower = 3 * (2**k - 1) + 1  # parameters of the narrowest one-hidden-layer net with 2^k pieces
        out.append(
            {
                "k": k,
                "pieces 2^k": 2**k,
                "deep exact: params": deep["params"],
                "deep exact: max abs error": deep["max abs error"],
                "shallow: params at least": lower,
                "shallow exact: params": sh_exact["params"],
                "shallow trained, deep's budget: params": same["params"] if same else "",
                "shallow trained, deep's budget: test mse": same["test mse"] if same else "",
                "shallow trained: params for mse < 10% of 1/12": min(r["params"] for r in good) if good else "none",
                "deep trained: best test mse": best["test mse"],
                "deep trained: runs that found it": f"{found} of {len(trained)}",
                "agrees with the lecture?": verdict(
                    exact_ok and lower >= deep["params"],
                    f"{k} layers of width 2 ({deep['params']} parameters) give t^k exactly "
                    f"(max error {deep['max abs error']:.0e}); one hidden layer needs >= {2**k - 1} units, "
                    f">= {lower} parameters ({lower / deep['params']:.1f}x)"
                    + (f"; with the deep net's budget its mse is {same['test mse']:.3f}" if same else "")
                    + (
                        ""
                        if lower >= deep["params"]
                        else "; at this k one layer is no bigger: the gap grows like 2^k / k"
                    ),
                ),
                "does SGD/Adam find the deep net?": verdict(
                    found > 0,
                    f"{found} of {len(trained)} trained runs of that shape got below 10% of the constant's error; "
                    f"best mse {best['test mse']:.3g} (constant: {BASELINE:.3f})",
                ),
            }
        )
    return out


def plot(rows: list[dict[str, Any]], ks: tuple[int, ...], path: Path) -> Path:
    n = len(ks) + 1
    cols = min(4, n)
    nrows = -(-n // cols)
    fig, axes = plt.subplots(nrows, cols, figsize=(4 * cols, 3.4 * nrows), squeeze=False)
    floor = 1e-8  # exact nets (0 or rounding, < 1e-25) have no useful log: draw them at the bottom
    style = {
        "deep, exact": ("*", "tab:red", 12),
        "shallow, exact": ("D", "tab:blue", 7),
        "deep, trained (adam)": ("^", "tab:orange", 6),
        "deep, trained (sgd)": ("v", "tab:brown", 6),
    }
    for ax, k in zip(axes.flat, ks, strict=False):
        rk = [r for r in rows if r["k"] == k]
        sh = [r for r in rk if r["family"] == "shallow, trained"]
        ax.loglog(
            [r["params"] for r in sh],
            [max(r["test mse"], floor) for r in sh],
            "o-",
            color="tab:blue",
            ms=4,
            label="shallow, trained",
        )
        for fam, (marker, color, ms) in style.items():
            pts = [r for r in rk if r["family"] == fam]
            ax.loglog(
                [r["params"] for r in pts],
                [max(r["test mse"], floor) for r in pts],
                marker,
                color=color,
                ms=ms,
                ls="none",
                label=fam,
            )
        ax.axhline(BASELINE, color="gray", ls=":", lw=1)
        ax.set_title(f"k = {k}: 2^k = {2**k} pieces", fontsize=9)
        ax.set_ylim(floor / 10, 1)
        ax.grid(True, which="both", alpha=0.3)
        ax.set_xlabel("parameters", fontsize=8)
        ax.set_ylabel("test mse", fontsize=8)
    axes.flat[0].legend(fontsize=6, loc="center left")  # the empty band between fitted and exact nets
    ax = axes.flat[len(ks)]
    summ = summarise(rows, ks)
    ax.semilogy(ks, [r["deep exact: params"] for r in summ], "*-", color="tab:red", ms=10, label="deep exact: 6k + 1")
    ax.semilogy(
        ks, [r["shallow exact: params"] for r in summ], "D-", color="tab:blue", label="shallow exact: 3 2^k + 1"
    )
    ax.set(xlabel="k", ylabel="parameters to represent t^k", title="parameters needed (exact nets)")
    ax.legend(fontsize=7)
    ax.grid(True, which="both", alpha=0.3)
    for extra in list(axes.flat)[len(ks) + 1 :]:
        extra.axis("off")
    fig.suptitle(
        "Sawtooth t^k: test mse vs parameters (gray: predicting the mean, 1/12; exact nets drawn at 1e-8)", fontsize=10
    )
    return save_figure(fig, path)


def run(out: Path, sizes: Sizes, seed: int = 0) -> dict[str, Any]:
    rows = [r for k in sizes.ks for r in run_k(k, sizes, seed)]
    write_table(rows, out / "depth")
    plot(rows, sizes.ks, out / "depth.png")
    summ = summarise(rows, sizes.ks)
    return {"rows": rows, "summary_rows": summ, "summary": write_table(summ, out / "summary")}


def main(argv: list[str] | None = None) -> int:
    p = base_parser("depth", __doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, default=None, help="random inits per deep trained net (default 3)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: these nets are tiny)")
    args = p.parse_args(argv)
    if args.threads < 1:
        raise UserError(f"--threads: must be >= 1, got {args.threads}")
    sizes = QUICK if args.quick else Sizes()
    if args.seeds is not None:
        sizes = Sizes(**{**sizes.__dict__, "deep_seeds": max(1, args.seeds)})
    out = new_run_dir(args.out, "depth")
    print(f"depth efficiency: k = {', '.join(map(str, sizes.ks))}; run directory {out}")
    with torch_threads(args.threads):
        res = run(out, sizes, args.seed)
    print(res["summary"])
    print(f"figure: {out / 'depth.png'}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
