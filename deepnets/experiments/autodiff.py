"""What automatic differentiation does, what it costs, and where it is (silently) wrong.

Six measurements:

(a) ReLU at 0: AD applies the chain rule to whatever convention each primitive
    uses at a kink (PyTorch: relu'(0) = 0), so functions that all equal x get
    different "derivatives" at 0 (Kakade & Lee, 2018, "Provably correct
    automatic sub-differentiation").
(b) Forward vs reverse mode: a full Jacobian of f: R^n -> R^m costs n JVPs
    (`jacfwd`) or m VJPs (`jacrev`); the cheaper mode depends on n vs m.
(c) Memory vs compute: activation checkpointing (Chen et al., 2016) keeps only
    segment inputs and recomputes the rest in the backward pass.
(d) Correctness: `torch.autograd.gradcheck` in float64 on every block of the
    model zoo, and the truncation-vs-rounding error of finite differences
    (the V-shaped curve) that AD does not have.
(e) Gradients of samples: AD cannot differentiate through a random draw.
    `Normal(mu, 1).sample()` carries no gradient at all; `rsample()` (the
    reparameterisation x = mu + z) and the score-function estimator
    f(x) d/dmu log p(x; mu) (Williams 1992, REINFORCE) both estimate
    d/dmu E[x^2] = 2 mu without bias, with per-sample variances 4 and
    mu^4 + 14 mu^2 + 15.
(f) The cheap gradient principle: reverse mode computes the whole gradient of a
    scalar for a small constant times the cost of the function itself (Baur &
    Strassen 1983; Griewank & Walther 2008, "Evaluating Derivatives": "often
    within a factor of 5", as Kakade & Lee 2018 quote it; a matrix product
    costs exactly 3x, one product forward and two backward). Measured as
    (forward + backward) / forward for every block of the zoo on the CPU (and
    the GPU with --device cuda), alternating the two.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd import DeviceType
from torch.distributions import Normal
from torch.func import functional_call, jacfwd, jacrev
from torch.utils.checkpoint import checkpoint_sequential
from torch.utils.flop_counter import FlopCounterMode

from deepnets.experiments.common import base_parser, new_run_dir, plt, save_figure, torch_threads, verdict, write_table
from deepnets.models import build_model


@dataclass
class Sizes:
    """Problem sizes of one run (`--quick` shrinks them)."""

    jac_dims: tuple[int, ...] = (4, 16, 64, 256, 1024)
    jac_hidden: int = 512
    jac_min_time: float = 0.2  # seconds of timing per measurement
    ckpt_depth: int = 32
    ckpt_width: int = 256
    ckpt_batch: int = 2048
    ckpt_segments: tuple[int, ...] = (2, 4, 8, 16)
    ckpt_reps: int = 5
    gradcheck_fast: bool = False
    gradcheck_models: tuple[str, ...] | None = None  # keys of GRADCHECK_MODELS; None = all
    sample_sizes: tuple[int, ...] = (1, 10, 100, 1000)
    sample_repeats: int = 2000
    cheap_rounds: int = 30  # alternating forward / forward+backward timings per block
    cheap_fc_batch: int = 256
    cheap_conv_batch: int = 16
    cheap_models: tuple[str, ...] | None = None  # keys of CHEAP_MODELS; None = all


QUICK = Sizes(
    jac_dims=(4, 64),
    jac_hidden=32,
    jac_min_time=0.02,
    ckpt_depth=8,
    ckpt_width=64,
    ckpt_batch=256,
    ckpt_segments=(2, 4),
    ckpt_reps=2,
    gradcheck_fast=True,
    sample_sizes=(1, 10, 100),
    sample_repeats=500,
    cheap_rounds=3,
    cheap_fc_batch=64,
    cheap_conv_batch=4,
)


# ---------------------------------------------------------------- (a) ReLU at 0


def relu_functions() -> dict[str, tuple[str, Callable[[Tensor], Tensor]]]:
    """Four functions that all equal x, so all have derivative 1 everywhere."""
    relu = torch.relu

    def f1(x: Tensor) -> Tensor:
        return x

    def f2(x: Tensor) -> Tensor:
        return relu(x) - relu(-x)

    def f3(x: Tensor) -> Tensor:
        return 10 * f1(x) - 9 * f2(x)

    def f4(x: Tensor) -> Tensor:
        return relu(relu(x)) - relu(-x)

    return {
        "f1": ("x", f1),
        "f2": ("relu(x) - relu(-x)", f2),
        "f3": ("10 f1 - 9 f2", f3),
        "f4": ("relu(relu(x)) - relu(-x)", f4),
    }


def relu_table(x0: float = 0.0) -> list[dict[str, Any]]:
    """What reverse mode, forward mode and a central difference return for each f'(x0)."""
    rows = []
    for name, (expr, f) in relu_functions().items():
        x = torch.tensor(x0, dtype=torch.float64, requires_grad=True)
        (rev,) = torch.autograd.grad(f(x), x)
        fwd = jacfwd(f)(torch.tensor(x0, dtype=torch.float64))
        h = 1e-6
        fd = (f(torch.tensor(x0 + h, dtype=torch.float64)) - f(torch.tensor(x0 - h, dtype=torch.float64))) / (2 * h)
        rows.append(
            {
                "f": name,
                "definition": expr,
                "f(x) for x != 0": "x",
                "true f'(0)": 1.0,
                "autograd (reverse)": rev.item(),
                "jacfwd (forward)": fwd.item(),
                "central difference": fd.item(),
            }
        )
    return rows


# ---------------------------------------------------------------- (b) forward vs reverse mode


def median_time(fn: Callable[[], Any], min_time: float) -> float:
    """Median seconds per call of `fn` over at least `min_time` seconds (after one warm-up call)."""
    fn()
    times: list[float] = []
    while sum(times) < min_time or len(times) < 3:
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return float(np.median(times))


def jacobian_timing(dims: tuple[int, ...], hidden: int, min_time: float, seed: int) -> list[dict[str, Any]]:
    """Time jacfwd and jacrev for the full Jacobian of f(x) = W3 tanh(W2 tanh(W1 x)), R^n -> R^m.

    Single-threaded: the cost of n JVPs vs m VJPs, not how well a thread pool
    hides small matrix products.
    """
    with torch_threads(1):
        return _jacobian_timing(dims, hidden, min_time, seed)


def _jacobian_timing(dims: tuple[int, ...], hidden: int, min_time: float, seed: int) -> list[dict[str, Any]]:
    g = torch.Generator().manual_seed(seed)
    rows = []
    for n in dims:
        for m in dims:
            W1 = torch.randn(hidden, n, generator=g) / math.sqrt(n)
            W2 = torch.randn(hidden, hidden, generator=g) / math.sqrt(hidden)
            W3 = torch.randn(m, hidden, generator=g) / math.sqrt(hidden)
            x = torch.randn(n, generator=g)

            def f(x: Tensor, W1: Tensor = W1, W2: Tensor = W2, W3: Tensor = W3) -> Tensor:
                return W3 @ torch.tanh(W2 @ torch.tanh(W1 @ x))  # (m,)

            J_fwd, J_rev = jacfwd(f)(x), jacrev(f)(x)  # (m, n) each
            torch.testing.assert_close(J_fwd, J_rev)  # same numbers, different cost
            t = {
                mode: median_time(lambda j=j, x=x: j(x), min_time)
                for mode, j in (("jacfwd", jacfwd(f)), ("jacrev", jacrev(f)))
            }
            rows.append(
                {
                    "n (inputs)": n,
                    "m (outputs)": m,
                    "jacfwd ms": 1e3 * t["jacfwd"],
                    "jacrev ms": 1e3 * t["jacrev"],
                    "fwd / rev": t["jacfwd"] / t["jacrev"],
                    "faster": "jacfwd" if t["jacfwd"] < t["jacrev"] else "jacrev",
                }
            )
    return rows


def plot_jacobian(rows: list[dict[str, Any]], dims: tuple[int, ...], path: Path) -> Path:
    k = len(dims)
    ratio = np.array([r["fwd / rev"] for r in rows]).reshape(k, k)  # [i_n, i_m]
    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.8))
    lim = max(abs(np.log2(ratio)).max(), 1.0)
    im = a.imshow(np.log2(ratio), cmap="RdBu_r", vmin=-lim, vmax=lim, origin="lower")
    a.set_xticks(range(k), [str(d) for d in dims])
    a.set_yticks(range(k), [str(d) for d in dims])
    a.set(xlabel="m (outputs)", ylabel="n (inputs)", title="time jacfwd / jacrev, 1 thread (blue: forward wins)")
    for i in range(k):
        for j in range(k):
            a.text(j, i, f"{ratio[i, j]:.2g}", ha="center", va="center", fontsize=8)
    fig.colorbar(im, ax=a, label="log2(jacfwd / jacrev)")
    mid = dims[k // 2]
    for mode, style in (("jacfwd", "o-"), ("jacrev", "s-")):
        by_n = [r[f"{mode} ms"] for r in rows if r["m (outputs)"] == mid]
        by_m = [r[f"{mode} ms"] for r in rows if r["n (inputs)"] == mid]
        b.loglog(dims, by_n, style, label=f"{mode}, vary n (m = {mid})")
        b.loglog(dims, by_m, style.replace("-", "--"), label=f"{mode}, vary m (n = {mid})")
    b.set(xlabel="n or m", ylabel="ms per full Jacobian", title="Forward mode scales with n, reverse with m")
    b.legend(fontsize=8)
    b.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- (c) memory vs compute


@contextlib.contextmanager
def _quiet_stderr() -> Iterator[None]:
    """Silence fd 2: kineto logs profiler start/stop from C++ with no off switch."""
    sys.stderr.flush()
    saved = os.dup(2)
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(devnull)
        os.close(saved)


def _peak_from_profile(prof: torch.profiler.profile) -> tuple[int, int]:
    """(peak, final) bytes allocated minus freed on the CPU, over the profiled region."""
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())
    cur = peak = 0
    for e in events:
        cur += e.nbytes()  # negative for frees
        peak = max(peak, cur)
    return peak, cur


def measure_memory(step_fwd: Callable[[], Tensor], device: torch.device) -> dict[str, float]:
    """Activation memory held after the forward pass and peak memory of forward + backward, in MiB.

    CUDA: the caching allocator's counters. CPU: the profiler's allocation events.
    """
    mib = 2.0**20
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        loss = step_fwd()
        held = torch.cuda.memory_allocated() - base
        loss.backward()
        torch.cuda.synchronize()
        return {"held after forward MiB": held / mib, "peak MiB": (torch.cuda.max_memory_allocated() - base) / mib}
    act = torch.profiler.ProfilerActivity.CPU
    with _quiet_stderr():
        with torch.profiler.profile(activities=[act], profile_memory=True) as prof:
            loss = step_fwd()
        fwd_peak, held = _peak_from_profile(prof)
        with torch.profiler.profile(activities=[act], profile_memory=True) as prof:
            loss.backward()
        bwd_peak, _ = _peak_from_profile(prof)
    return {"held after forward MiB": held / mib, "peak MiB": max(fwd_peak, held + bwd_peak) / mib}


def checkpointing_memory(
    depth: int, width: int, batch: int, segments: tuple[int, ...], reps: int, device: torch.device, seed: int
) -> list[dict[str, Any]]:
    """Memory and step time of a deep MLP (Linear-BN-ReLU layers) without and with checkpointing.

    Variants: none; the zoo's `model.checkpointing` (every layer recomputed from
    its input); `checkpoint_sequential` with k segments (only k segment inputs
    kept; k ~ sqrt(depth) is Chen et al.'s O(sqrt(L)) memory schedule).
    """
    torch.manual_seed(seed)
    cfg = {"arch": "mlp", "depth": depth, "width": width, "batch_norm": True}
    x = torch.randn(batch, width, device=device)  # (B, D)
    y = torch.randint(0, 10, (batch,), device=device)
    plain = build_model(cfg, (width,), 10).to(device)
    per_layer = build_model({**cfg, "checkpointing": True}, (width,), 10).to(device)

    def sequential(k: int) -> Callable[[], Tensor]:
        def fwd() -> Tensor:
            h = checkpoint_sequential(plain.layers, k, x, use_reentrant=False)  # (B, width)
            return F.cross_entropy(plain.head(h), y)

        return fwd

    variants: list[tuple[str, nn.Module, Callable[[], Tensor]]] = [
        ("none", plain, lambda: F.cross_entropy(plain(x), y)),
        ("model.checkpointing (per layer)", per_layer, lambda: F.cross_entropy(per_layer(x), y)),
        *((f"checkpoint_sequential, {k} segments", plain, sequential(k)) for k in segments),
    ]
    steps = []
    for _, model, fwd in variants:
        opt = torch.optim.SGD(model.parameters(), lr=1e-3)

        def step(fwd: Callable[[], Tensor] = fwd, opt: torch.optim.Optimizer = opt) -> None:
            opt.zero_grad(set_to_none=False)  # grads stay allocated: memory below is activations
            fwd().backward()
            opt.step()

        step()  # warm-up: allocates grads, optimizer state, lazy init
        steps.append(step)
    times: list[list[float]] = [[] for _ in variants]
    for _ in range(reps):  # round-robin, so drift in machine load hits every variant alike
        for i, step in enumerate(steps):
            if device.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            step()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times[i].append(time.perf_counter() - t0)
    rows = []
    for (name, model, fwd), ts in zip(variants, times, strict=True):
        model.zero_grad(set_to_none=False)
        rows.append({"variant": name, **measure_memory(fwd, device), "step ms (median)": 1e3 * float(np.median(ts))})
    base = rows[0]
    for r in rows:
        r["memory vs none"] = r["held after forward MiB"] / base["held after forward MiB"]
        r["time vs none"] = r["step ms (median)"] / base["step ms (median)"]
    return rows


def plot_checkpointing(rows: list[dict[str, Any]], title: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for i, r in enumerate(rows):
        label = r["variant"].replace("checkpoint_sequential, ", "sequential: ")
        ax.scatter(r["step ms (median)"], r["held after forward MiB"], s=40, label=label)
        ax.annotate(
            label,
            (r["step ms (median)"], r["held after forward MiB"]),
            fontsize=8,
            xytext=(6, 8 if i % 2 else -12),
            textcoords="offset points",
        )  # alternate: neighbours overlap
    ax.set(xlabel="training step time, ms (median)", ylabel="activation memory held after forward, MiB", title=title)
    ax.set_ylim(bottom=0)
    ax.set_xlim(right=ax.get_xlim()[1] * 1.15)  # room for the labels
    ax.grid(True, alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- (d) gradcheck and finite differences

# Smallest instance of every block type of the zoo. tanh instead of ReLU: the
# finite differences gradcheck compares against are wrong across a kink.
GRADCHECK_MODELS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "mlp (Linear-BN-act)": ({"arch": "mlp", "depth": 2, "width": 5, "batch_norm": True}, (6,)),
    "skipnet": ({"arch": "skipnet", "depth": 3, "width": 5, "skip_from": "all"}, (6,)),
    "resmlp": ({"arch": "resmlp", "depth": 2, "width": 5, "batch_norm": True}, (6,)),
    "resmlp preact": ({"arch": "resmlp", "depth": 2, "width": 5, "batch_norm": True, "preact": True}, (6,)),
    "densemlp": ({"arch": "densemlp", "width": 4, "growth_rate": 3, "layers_per_block": 2, "num_blocks": 2}, (6,)),
    "resnet basic": ({"arch": "resnet", "stage_depths": [1, 1], "width": 4}, (3, 6, 6)),
    "resnet bottleneck": ({"arch": "resnet", "block": "bottleneck", "stage_depths": [1], "width": 2}, (3, 6, 6)),
    "resnet preact": ({"arch": "resnet", "preact": True, "stage_depths": [1, 1], "width": 4}, (3, 6, 6)),
    "densenet": (
        {"arch": "densenet", "stage_depths": [2, 2], "growth_rate": 2, "num_init_features": 4, "bn_size": 2},
        (3, 6, 6),
    ),
}


def gradcheck_block(name: str, fast: bool, seed: int) -> dict[str, Any]:
    """`torch.autograd.gradcheck` (float64) of the tiny `GRADCHECK_MODELS[name]` w.r.t. input and parameters."""
    cfg, shape = GRADCHECK_MODELS[name]
    torch.manual_seed(seed)
    model = build_model({**cfg, "activation": "tanh"}, shape, 3).double()
    names = [k for k, _ in model.named_parameters()]
    params = [p.detach().clone().requires_grad_() for p in model.parameters()]
    x = torch.randn(4, *shape, dtype=torch.float64, requires_grad=True)  # (B, *shape); B > 1 for BN

    def f(x: Tensor, *ps: Tensor) -> Tensor:
        return functional_call(model, dict(zip(names, ps, strict=True)), (x,))  # (B, 3)

    t0 = time.perf_counter()
    ok = torch.autograd.gradcheck(f, (x, *params), fast_mode=fast, raise_exception=False)
    return {
        "block": name,
        "parameters": sum(p.numel() for p in params),
        "inputs checked": x.numel() + sum(p.numel() for p in params),
        "gradcheck": "pass" if ok else "FAIL",
        "mode": "fast (random projection)" if fast else "full Jacobian",
        "seconds": time.perf_counter() - t0,
    }


def gradcheck_zoo(names: tuple[str, ...] | None, fast: bool, seed: int) -> list[dict[str, Any]]:
    return [gradcheck_block(n, fast, seed) for n in (names or tuple(GRADCHECK_MODELS))]


def finite_difference_errors(seed: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Relative error of forward / central differences vs step h, float32 and float64.

    f is a small tanh MLP R^8 -> R; the reference is the float64 AD directional
    derivative. Truncation error falls with h (h, h^2), rounding error grows
    like eps / h: a V whose bottom is at h ~ sqrt(eps) (forward) or eps^(1/3)
    (central). AD has only rounding error of the order of eps.
    """
    g = torch.Generator().manual_seed(seed)
    W1 = torch.randn(16, 8, generator=g, dtype=torch.float64) / math.sqrt(8)
    w2 = torch.randn(16, generator=g, dtype=torch.float64) / 4
    x0 = torch.randn(8, generator=g, dtype=torch.float64)
    v = torch.randn(8, generator=g, dtype=torch.float64)
    v /= v.norm()

    def f(x: Tensor, W1: Tensor, w2: Tensor) -> Tensor:
        return w2 @ torch.tanh(W1 @ x)  # scalar

    _, ref = torch.func.jvp(partial(f, W1=W1, w2=w2), (x0,), (v,))  # float64 AD: the reference
    hs = np.logspace(-16, 0, 65)
    curve, best = [], []
    for dtype in (torch.float32, torch.float64):
        W1d, w2d, xd, vd = (t.to(dtype) for t in (W1, w2, x0, v))
        _, ad = torch.func.jvp(partial(f, W1=W1d, w2=w2d), (xd,), (vd,))
        ad_err = abs(ad.item() - ref.item()) / abs(ref.item())
        errs: dict[str, list[float]] = {"forward": [], "central": []}
        for h in hs:
            fp, f0, fm = (f(xd + s * h * vd, W1d, w2d).item() for s in (1, 0, -1))
            errs["forward"].append(abs((fp - f0) / h - ref.item()) / abs(ref.item()))
            errs["central"].append(abs((fp - fm) / (2 * h) - ref.item()) / abs(ref.item()))
        eps = torch.finfo(dtype).eps
        for scheme, e in errs.items():
            i = int(np.argmin(e))
            best.append(
                {
                    "dtype": str(dtype).removeprefix("torch."),
                    "scheme": scheme,
                    "best h": float(hs[i]),
                    "min rel error": e[i],
                    "theory best h": eps ** (1 / 2 if scheme == "forward" else 1 / 3),
                    "AD rel error": ad_err,
                }
            )
            curve += [
                {"dtype": str(dtype).removeprefix("torch."), "scheme": scheme, "h": float(h), "rel error": err}
                for h, err in zip(hs, e, strict=True)
            ]
        curve += [{"dtype": str(dtype).removeprefix("torch."), "scheme": "AD (jvp)", "h": "", "rel error": ad_err}]
    return curve, best


def plot_finite_differences(curve: list[dict[str, Any]], path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    colors = {"float32": "C0", "float64": "C1"}
    floor = 1e-17  # an exact 0 error has no log; show it at the bottom
    for dtype, color in colors.items():
        for scheme, style in (("forward", "o-"), ("central", "s--")):
            pts = [r for r in curve if r["dtype"] == dtype and r["scheme"] == scheme]
            ax.loglog(
                [r["h"] for r in pts],
                [max(r["rel error"], floor) for r in pts],
                style,
                color=color,
                ms=3,
                label=f"{scheme} difference, {dtype}",
            )
        ad = next(r["rel error"] for r in curve if r["dtype"] == dtype and r["scheme"] == "AD (jvp)")
        ad_label = f"AD, {dtype}" + (": error exactly 0 (drawn at 1e-17)" if ad == 0 else "")
        ax.axhline(max(ad, floor), color=color, ls=":", label=ad_label)
    ax.set(xlabel="step h", ylabel="relative error of f'(x) v", title="Finite differences: truncation vs rounding")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return save_figure(fig, path)


# ---------------------------------------------------------------- (e) gradients of samples

CHEAP_BOUND = 5.0  # "often within a factor of 5" (Griewank & Walther 2008, quoted by Kakade & Lee 2018)


def sample_gradient(mu: float) -> dict[str, Any]:
    """What autograd gives for d/dmu of a plain `sample()`: nothing (the draw is outside the graph)."""
    m = torch.tensor(mu, dtype=torch.float64, requires_grad=True)
    x = Normal(m, 1.0).sample()
    try:
        torch.autograd.grad(x**2, m)
        outcome = "a gradient (unexpected)"
    except RuntimeError as e:
        outcome = f"RuntimeError: {str(e).splitlines()[0]}"
    return {"requires_grad": x.requires_grad, "grad_fn": str(x.grad_fn), "autograd.grad": outcome}


def sample_estimators(mu: float, sizes: tuple[int, ...], repeats: int, seed: int) -> list[dict[str, Any]]:
    """Mean and variance over `repeats` runs of the rsample and score-function estimates of d/dmu E[x^2].

    One estimate is the mean over N samples; all repeats are one batched draw
    with mu repeated (R,), so autograd hands back each repeat's own estimate.
    """
    torch.manual_seed(seed)
    truth = 2 * mu
    per_sample_var = {"rsample (reparameterisation)": 4.0, "score function (REINFORCE)": mu**4 + 14 * mu**2 + 15}
    rows = []
    for n in sizes:
        m = torch.full((repeats,), mu, dtype=torch.float64, requires_grad=True)  # (R,)
        dist = Normal(m, 1.0)
        x = dist.rsample((n,))  # (N, R), x = mu + z: differentiable in mu
        (g_r,) = torch.autograd.grad((x**2).mean(0).sum(), m)  # (R,): 2 x averaged
        x = dist.sample((n,))  # (N, R), no gradient path
        surrogate = ((x**2) * dist.log_prob(x)).mean(0).sum()  # d/dmu: f(x) (x - mu)
        (g_s,) = torch.autograd.grad(surrogate, m)  # (R,)
        for name, g in (("rsample (reparameterisation)", g_r), ("score function (REINFORCE)", g_s)):
            mean, var = float(g.mean()), float(g.var())
            se = math.sqrt(var / repeats)
            rows.append(
                {
                    "N samples": n,
                    "estimator": name,
                    "truth 2 mu": truth,
                    f"mean of {repeats} estimates": mean,
                    "(mean - truth) / s.e.": (mean - truth) / se,
                    "variance of the estimate": var,
                    "theory: per-sample variance / N": per_sample_var[name] / n,
                    "unbiased?": verdict(abs(mean - truth) < 4 * se, f"mean within {abs(mean - truth) / se:.1f} s.e."),
                }
            )
    for n in sizes:  # lower variance for the reparameterisation, size by size
        r, sc = (r for r in rows if r["N samples"] == n)
        r["lower variance than score function?"] = verdict(
            r["variance of the estimate"] < sc["variance of the estimate"],
            f"{r['variance of the estimate']:.3g} vs {sc['variance of the estimate']:.3g}",
        )
    return rows


# ---------------------------------------------------------------- (f) the cheap gradient principle

# One moderate instance of every block type of the zoo: big enough that the
# arithmetic, not Python's per-op overhead, dominates the time.
CHEAP_MODELS: dict[str, tuple[dict[str, Any], tuple[int, ...]]] = {
    "mlp (Linear-BN-ReLU)": ({"arch": "mlp", "depth": 4, "width": 256, "batch_norm": True}, (256,)),
    "skipnet": ({"arch": "skipnet", "depth": 4, "width": 256, "skip_from": "all"}, (256,)),
    "resmlp": ({"arch": "resmlp", "depth": 2, "width": 256, "batch_norm": True}, (256,)),
    "resmlp preact": ({"arch": "resmlp", "depth": 2, "width": 256, "batch_norm": True, "preact": True}, (256,)),
    "densemlp": ({"arch": "densemlp", "width": 64, "growth_rate": 32, "layers_per_block": 4, "num_blocks": 2}, (256,)),
    "resnet basic": ({"arch": "resnet", "stage_depths": [1, 1], "width": 16}, (3, 32, 32)),
    "resnet bottleneck": ({"arch": "resnet", "block": "bottleneck", "stage_depths": [1, 1], "width": 16}, (3, 32, 32)),
    "resnet preact": ({"arch": "resnet", "preact": True, "stage_depths": [1, 1], "width": 16}, (3, 32, 32)),
    "densenet": (
        {"arch": "densenet", "stage_depths": [2, 2], "growth_rate": 8, "num_init_features": 16, "bn_size": 2},
        (3, 32, 32),
    ),
}


def cheap_gradient(
    name: str, fc_batch: int, conv_batch: int, rounds: int, device: torch.device, seed: int
) -> dict[str, Any]:
    """Median time of the loss alone (no graph) and of loss + gradient w.r.t. every parameter, alternated.

    Also the ratio of their floating-point operations in matrix products and
    convolutions (`FlopCounterMode`): the count the principle is about, free of
    timing noise (elementwise ops are not counted).
    """
    cfg, shape = CHEAP_MODELS[name]
    torch.manual_seed(seed)
    model = build_model(cfg, shape, 10).to(device).train()
    batch = fc_batch if len(shape) == 1 else conv_batch
    x = torch.randn(batch, *shape, device=device)  # (B, *shape)
    y = torch.randint(0, 10, (batch,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def forward() -> None:
        with torch.no_grad():
            F.cross_entropy(model(x), y)

    def forward_backward() -> None:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)  # every parameter's gradient, nothing kept

    def timed(fn: Callable[[], None]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t0

    forward(), forward_backward()  # warm-up: lazy init, allocator
    flops = []
    for fn in (forward, forward_backward):  # the op count, which machine load cannot touch
        with FlopCounterMode(display=False) as counter:
            fn()
        flops.append(counter.get_total_flops())
    tf, tfb = [], []
    for _ in range(rounds):  # alternating: a change in machine load hits both alike
        tf.append(timed(forward))
        tfb.append(timed(forward_backward))
    # the minimum, not the median: on a shared machine, preemption (~10 ms slices) only ever adds time, and a
    # 1 ms forward pass is hit in about every other call; the fastest round is the closest to the op cost
    f, fb = min(tf), min(tfb)
    ratio = fb / f
    return {
        "block": name,
        "device": device.type,
        "batch": batch,
        "parameters": sum(p.numel() for p in params),
        "forward ms": 1e3 * f,
        "forward + backward ms": 1e3 * fb,
        "ratio": ratio,
        "flop ratio (matmul + conv)": flops[1] / flops[0],
        "bound (Griewank & Walther)": f"<= ~{CHEAP_BOUND:g}",
        "agrees with the lecture?": verdict(
            ratio <= CHEAP_BOUND,
            f"the gradient costs {ratio:.1f}x the function" + ("" if ratio <= CHEAP_BOUND else ", above the bound"),
        ),
    }


def cheap_gradient_zoo(
    names: tuple[str, ...] | None, fc_batch: int, conv_batch: int, rounds: int, device: torch.device, seed: int
) -> list[dict[str, Any]]:
    """Single-threaded on the CPU (the existing parts' convention): the op count, not a thread pool's luck."""
    if device.type == "cpu":
        with torch_threads(1):
            return [
                cheap_gradient(n, fc_batch, conv_batch, rounds, device, seed) for n in (names or tuple(CHEAP_MODELS))
            ]
    return [cheap_gradient(n, fc_batch, conv_batch, rounds, device, seed) for n in (names or tuple(CHEAP_MODELS))]


# ---------------------------------------------------------------- entry point


CPU = torch.device("cpu")


def run(out: Path, sizes: Sizes, device: torch.device, seed: int = 0) -> dict[str, Any]:
    """All six parts into the run directory `out`; returns the tables."""
    s = sizes
    relu = relu_table()
    write_table(relu, out / "relu_at_zero")

    jac = jacobian_timing(s.jac_dims, s.jac_hidden, s.jac_min_time, seed)
    write_table(jac, out / "jacfwd_vs_jacrev")
    plot_jacobian(jac, s.jac_dims, out / "jacfwd_vs_jacrev.png")

    devices = [torch.device("cpu")] + ([device] if device.type == "cuda" else [])
    ckpt: dict[str, list[dict[str, Any]]] = {}
    for dev in devices:
        rows = checkpointing_memory(s.ckpt_depth, s.ckpt_width, s.ckpt_batch, s.ckpt_segments, s.ckpt_reps, dev, seed)
        ckpt[dev.type] = rows
        write_table(rows, out / f"checkpointing_{dev.type}")
        title = f"MLP depth {s.ckpt_depth}, width {s.ckpt_width}, batch {s.ckpt_batch} on {dev.type}"
        plot_checkpointing(rows, title, out / f"checkpointing_{dev.type}.png")

    grad = gradcheck_zoo(s.gradcheck_models, s.gradcheck_fast, seed)
    write_table(grad, out / "gradcheck")
    curve, fd_best = finite_difference_errors(seed)
    write_table(curve, out / "finite_differences_curve")
    write_table(fd_best, out / "finite_differences")
    plot_finite_differences(curve, out / "finite_differences.png")

    no_grad = sample_gradient(1.0)
    write_table([{"call": "Normal(mu, 1).sample()", **no_grad}], out / "sample_no_gradient")
    samples = sample_estimators(1.0, s.sample_sizes, s.sample_repeats, seed)
    write_table(samples, out / "sample_gradients")
    cheap = [  # the CPU always; the GPU too with --device cuda (ratios per device, never across)
        r
        for dev in devices
        for r in cheap_gradient_zoo(s.cheap_models, s.cheap_fc_batch, s.cheap_conv_batch, s.cheap_rounds, dev, seed)
    ]
    write_table(cheap, out / "cheap_gradient")

    jac_wins = {m: sum(r["faster"] == m for r in jac) for m in ("jacfwd", "jacrev")}
    n_big, m_small = max(s.jac_dims), min(s.jac_dims)
    tall = next(r["fwd / rev"] for r in jac if r["n (inputs)"] == n_big and r["m (outputs)"] == m_small)
    wide = next(r["fwd / rev"] for r in jac if r["n (inputs)"] == m_small and r["m (outputs)"] == n_big)
    summary = [
        {
            "part": "ReLU at 0",
            "measured": "; ".join(f"{r['f']}'(0) = {r['autograd (reverse)']:g}" for r in relu) + " (true: 1)",
        },
        {
            "part": "jacfwd vs jacrev",
            "measured": f"jacfwd faster in {jac_wins['jacfwd']} of {len(jac)} (n, m) cells, "
            f"jacrev in {jac_wins['jacrev']}; time fwd/rev = {tall:.2f} at (n={n_big}, m={m_small}), "
            f"{wide:.2f} at (n={m_small}, m={n_big})",
        },
        *(
            {
                "part": f"checkpointing ({dev})",
                "measured": "; ".join(
                    f"{r['variant']}: {r['held after forward MiB']:.1f} MiB, {r['step ms (median)']:.1f} ms"
                    for r in rows
                ),
            }
            for dev, rows in ckpt.items()
        ),
        {
            "part": "gradcheck (float64)",
            "measured": f"{sum(r['gradcheck'] == 'pass' for r in grad)} of {len(grad)} zoo blocks pass",
        },
        {
            "part": "finite differences",
            "measured": "; ".join(
                f"{r['scheme']} {r['dtype']}: best {r['min rel error']:.1e} at h={r['best h']:.0e} "
                f"(AD {r['AD rel error']:.0e})"
                for r in fd_best
            ),
        },
        {
            "part": "gradient of a sample",
            "measured": f"Normal(mu, 1).sample(): requires_grad = {no_grad['requires_grad']}, "
            f"autograd.grad gives {no_grad['autograd.grad'].split(':')[0]}; "
            + "; ".join(
                f"N={r['N samples']} {r['estimator'].split(' ')[0]}: {r[f'mean of {s.sample_repeats} estimates']:.3f} "
                f"(var {r['variance of the estimate']:.3g})"
                for r in samples
            )
            + " (truth 2.000)",
        },
        {
            "part": "cheap gradient (CPU: 1 thread)",
            "measured": "(forward + backward) / forward: "
            + ", ".join(f"{r['block']} ({r['device']}) {r['ratio']:.2f}" for r in cheap)
            + f"; bound ~{CHEAP_BOUND:g} (Griewank & Walther)",
        },
    ]
    return {
        "summary": write_table(summary, out / "summary"),
        "relu": relu,
        "jacobian": jac,
        "checkpointing": ckpt,
        "gradcheck": grad,
        "finite_differences": fd_best,
        "sample_no_gradient": no_grad,
        "sample_gradients": samples,
        "cheap_gradient": cheap,
    }


def main(argv: list[str] | None = None) -> int:
    p = base_parser("autodiff", __doc__.splitlines()[0])
    p.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu", "cuda"],
        help="checkpointing and the cheap gradient are always measured on CPU, and also here when cuda",
    )
    args = p.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        from deepnets.errors import UserError

        raise UserError("--device: cuda requested but torch.cuda.is_available() is False")
    device = torch.device("cuda" if args.device != "cpu" and torch.cuda.is_available() else "cpu")
    out = new_run_dir(args.out, "autodiff")
    res = run(out, QUICK if args.quick else Sizes(), device, args.seed)
    print(res["summary"])
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
