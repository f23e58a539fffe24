"""A sweep's points trained together: many small MLPs in one Lightning run, one step for all (issue 20).

`train_stacked(cfgs)` takes the Configs of sweep points (members) and trains them as one stacked model:
members whose networks have the same shape form a *shape group*, run with batched matmuls
(`torch.baddbmm` over (M, B, in) x (M, in, out)); several shape groups (a width sweep) share the one
Lightning run and the one optimizer step. Each member keeps what a standalone `deepnets.run.train` of its
Config would have:

- its initial weights: `seed_everything(seed)` then `build_model`, in the order train() uses the RNG;
- its data order: epoch e visits `randperm(n, seed + e)`, as `TensorBatches` does;
- its dropout masks: standalone dropout draws from the global CPU generator right after the model is
  built, and F.dropout's CPU mask is `empty_like(x).bernoulli_(1 - p)`: each member draws the same from a
  generator holding that state (a test pins the identity);
- its BatchNorm statistics: over its own batch, running statistics per member;
- its optimizer: each member's parameters keep their own tensors and their own torch.optim param groups
  (its lr, momentum, betas, eps, weight decay, layer decay); groups of equal hyperparameters are merged
  (the fused / foreach updates are elementwise, so merging changes no bit) into one optimizer whose
  scheduler applies each group's own schedule;
- its loss: the stacked loss is the sum over members of each member's mean loss, so each member's
  gradient is its standalone gradient.

Why batched matmuls and not `torch.func.functional_call` + `vmap` (the model-ensembling tutorial):
vmap's `randomness="different"` draws dropout masks no standalone run can reproduce, and BatchNorm's
in-place running-stat update under vmap needs the stacked buffers to be the module's own; the MLP's
three ops (linear, norm, elementwise activation) are a few lines each by hand, exact and cheaper per step
on a CPU (no functorch dispatch). Each Linear's members are held as one stacked tensor whose slices the
members' parameters and gradients are views of (ShapeGroup), while the optimizer updates each member's own
tensor: torch.optim's per-parameter-group hyperparameters and each member's state_dict stay those of a
standalone run, and so does every bit (a fused update of the stacked tensor would not: build_stacked_optimizer).

What cannot be stacked exactly is refused by `check_vectorize`, one line naming the key.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import signal
import sys
import time
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from deepnets.config import Config, check_runtime, to_yaml
from deepnets.data import InMemoryDataModule
from deepnets.errors import UserError
from deepnets.models import build_model, depth_ordered_layers
from deepnets.models.mlp import MLP
from deepnets.module import _fast, build_scheduler, is_logging_step, param_groups
from deepnets.rundir import RunLock

# ---------------------------------------------------------------- what may differ between members

# Keys each member may set for itself inside one stacked run (everything else must agree).
_MEMBER_KEYS = {
    "seed",
    "name",
    "output_dir",
    "sweep",
    "model",  # shape groups: any mlp shape; dropout and init per member
    "optim.lr",
    "optim.momentum",
    "optim.nesterov",
    "optim.betas",
    "optim.eps",
    "optim.amsgrad",
    "optim.weight_decay",
    "optim.decay_bias_and_norm",
    "optim.layer_decay",
    "optim.l1",
    "data.label_noise",  # flips training labels only: the inputs stay shared
}
# model keys that do not change the network's shape (a member's own in a shape group)
_FREE_IN_GROUP = {"dropout", "init", "init_std", "init_gain", "checkpointing", "channels_last"}


def _drop(d: dict[str, Any], dotted: set[str], prefix: str = "") -> dict[str, Any]:
    return {
        k: (_drop(v, dotted, f"{prefix}{k}.") if isinstance(v, dict) else v)
        for k, v in d.items()
        if f"{prefix}{k}" not in dotted
    }


def run_key(cfg: Config) -> str:
    """Members with equal run keys train in one stacked run."""
    keys = set(_MEMBER_KEYS)
    if cfg.scheduler.name == "onecycle":  # OneCycleLR is built with one max_lr for every group
        keys.discard("optim.lr")
    d = _drop(cfg.to_dict(), keys)
    d["batch_norm"] = cfg.model.batch_norm  # BatchNorm may drop a last batch of 1: the step count differs
    return json.dumps(d, sort_keys=True, default=str)


def shape_key(cfg: Config) -> str:
    """Members with equal shape keys form one shape group (stacked tensors)."""
    return json.dumps(_drop(cfg.to_dict()["model"], _FREE_IN_GROUP), sort_keys=True, default=str)


_OPTIMIZERS = ("sgd", "adam", "adamw", "rmsprop", "adagrad")  # what _optimizers below builds per member


def check_vectorize(cfg: Config) -> None:
    """`sweep.vectorize: true` for this point's config, or one error line naming the key that prevents it."""

    def no(key: str, why: str, fix: str) -> UserError:
        return UserError(f"sweep.vectorize: {key} {why}; {fix}, or set sweep.vectorize: false")

    m, t, s = cfg.model, cfg.trainer, cfg.sweep
    if m.arch != "mlp" or m.preset is not None:
        raise no(f"model.arch={m.preset or m.arch}", "cannot be stacked (stacked runs are plain mlp nets)", "use mlp")
    if cfg.task != "classification":
        raise no(f"task={cfg.task}", "is not stacked (stacked members train with cross-entropy)", "use classification")
    if cfg.optim.name not in _OPTIMIZERS:
        raise no(
            f"optim.name={cfg.optim.name}", "is not a built-in optimizer stacked runs reproduce", "use sgd or adam"
        )
    if cfg.optim.loss not in ("auto", "cross_entropy"):
        raise no(f"optim.loss={cfg.optim.loss}", "is not stacked (members train with cross-entropy)", "use auto")
    if s.workers > 1:
        raise no(f"sweep.workers={s.workers}", "splits the points over processes; stacked points train in one", "set 1")
    if s.prune != "none":
        raise no(f"sweep.prune={s.prune}", "stops single runs early; stacked members run to the end", "set none")
    if cfg.optim.grad_clip_norm is not None:
        raise no("optim.grad_clip_norm", "clips the global norm, which couples stacked members", "set null")
    if t.lr_find or t.lr_probe:
        raise no("trainer.lr_find / trainer.lr_probe", "tunes each run's lr on its own", "unset them")
    if cfg.early_stopping.enabled:
        raise no("early_stopping.enabled", "stops members at different epochs", "set false")
    if cfg.scheduler.name == "plateau":
        raise no("scheduler.name=plateau", "follows each run's own val/loss", "use step, cosine or onecycle")
    if t.compile:
        raise no("trainer.compile", "compiles one model", "set false")
    if t.strategy != "auto" or t.devices not in ("auto", 1) or t.num_nodes != 1:
        raise no("trainer.strategy/devices/num_nodes", "spread one run over devices", "use one device")
    if t.overfit_batches:
        raise no("trainer.overfit_batches", "is a debugging mode", "set 0")
    if t.precision != "32":
        raise no(f"trainer.precision={t.precision}", "is only stacked in 32-bit", "set 32")
    if cfg.data.augment:
        raise no("data.augment", "draws crops per run", "set false")
    if cfg.checkpoint.enabled and cfg.early_stopping.restore_best:
        raise no(
            "checkpoint.enabled with early_stopping.restore_best",
            "tests a best checkpoint per member, which stacked runs do not select (they save last.ckpt)",
            "set early_stopping.restore_best: false or checkpoint.enabled: false",
        )


# ---------------------------------------------------------------- the stacked network


def _layers_of(model: MLP) -> list[list[nn.Module]]:
    """Each hidden MLPLayer's modules, then the head alone."""
    return [list(layer) for layer in model.layers] + [[model.head]]


def _alias(params: Sequence[nn.Parameter]) -> Tensor:
    """One leaf tensor (M, ...) holding the members' parameters, which become views of it (same values), and
    whose gradient the members' gradients are views of (`_alias_grads`)."""
    stacked = torch.stack([p.detach() for p in params]).requires_grad_(params[0].requires_grad)
    for m, p in enumerate(params):
        p.data = stacked.detach()[m]
    _alias_grads(stacked, params)
    return stacked


def _alias_grads(stacked: Tensor, params: Sequence[nn.Parameter]) -> None:
    """The members' gradients as views of the stacked one (zeros where it has none yet)."""
    if stacked.grad is None:
        stacked.grad = torch.zeros_like(stacked)
    for m, p in enumerate(params):
        p.grad = stacked.grad[m]


def cross_entropy(logits: Tensor, y: Tensor, label_smoothing: float = 0.0) -> Tensor:
    """Per-sample cross-entropy of (M, B, K) logits and (M, B) labels: (M, B), each value and gradient the one
    F.cross_entropy gives a member's own (B, K) batch.

    In torch's layout, rows of K: torch's CPU log_softmax over a leading class dimension, (1, K, M*B), runs
    ~9x faster for K = 10 but its gradients differ in the last bit for K >= 7 (and its values for K >= 16),
    which Adam makes visible in a Linear bias in front of BatchNorm.
    """
    M, B, K = logits.shape
    return F.cross_entropy(
        logits.reshape(M * B, K), y.reshape(-1), reduction="none", label_smoothing=label_smoothing
    ).view(M, B)


class ShapeGroup(nn.Module):
    """M MLPs of one shape, applied with batched matmuls: (M, B, D) -> (M, B, K).

    The members' own modules hold the parameters and buffers, so each member's state_dict and optimizer
    param groups are a standalone run's. Each Linear's weights are also held as one stacked leaf (M, out, in)
    whose slices the members' parameters alias (`p.data` is a view of it), and so are their gradients
    (`p.grad` is a view of the leaf's, which is zeroed rather than dropped: `stacked_grads`): the forward
    uses the stacked leaf as is and autograd accumulates into the members' gradients directly. Stacking
    the members' tensors in every forward instead (`torch.stack`, then its backward's unbind and one
    gradient accumulation per member tensor) took ~1.5 ms of a 13.5 ms double-descent step (36 members).
    """

    def __init__(self, members: Sequence[MLP], dropout: Sequence[float]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)
        self.dropout = list(dropout)
        layers = [_layers_of(m) for m in members]  # member -> layer -> modules
        # the forward, op by op (built once: no isinstance per step): ("linear", index into self.linears),
        # ("bn", the members' BatchNorm1d), ("act", the activation module), ("dropout", None)
        self.plan: list[tuple[str, Any]] = []
        self.linears: list[tuple[list[nn.Parameter], list[nn.Parameter] | None]] = []  # (weights, biases)
        for i, mods in enumerate(layers[0]):
            for j, mod in enumerate(mods):
                if isinstance(mod, nn.Linear):
                    weights = [ls[i][j].weight for ls in layers]
                    biases = [ls[i][j].bias for ls in layers] if mod.bias is not None else None
                    self.plan.append(("linear", len(self.linears)))
                    self.linears.append((weights, biases))
                elif isinstance(mod, nn.BatchNorm1d):
                    self.plan.append(("bn", [ls[i][j] for ls in layers]))
                elif isinstance(mod, nn.Dropout):
                    pass  # members differ in dropout (p = 0: no Dropout module): applied after the activation
                else:  # an elementwise activation without parameters (layers.ACTIVATIONS)
                    self.plan.append(("act", mod))
            if i < len(layers[0]) - 1 and any(p > 0 for p in self.dropout):
                self.plan.append(("dropout", None))
        self.stacked: list[tuple[Tensor, Tensor | None]] = []  # per Linear: (M, out, in), (M, out)
        self._bound_to: int | None = None

    def bind(self) -> None:
        """(Re)build the stacked leaves where the members' parameters no longer alias them: the first call, or
        after a move to another device replaced their `.data`."""
        first = self.linears[0][0][0]
        if self.stacked and first.data_ptr() == self._bound_to:
            return
        self.stacked = [(_alias(ws), _alias(bs) if bs is not None else None) for ws, bs in self.linears]
        self._bound_to = first.data_ptr()

    def stacked_grads(self) -> list[Tensor]:
        """The stacked gradients, with the members' gradients the views of them that `_alias` made; where
        something dropped the members' gradients (`Module.zero_grad()` sets them all to None), the views are
        made again. Zeroed in place rather than dropped (StackedClassifier._zero_grad), autograd adds into
        them: 0 + g is g bit for bit, and with the L1 penalty's gradient (which reaches the member's own
        tensor) 0 + a + b is a + b in either order, as in a standalone run."""
        if not self.stacked:
            return []
        first, leaf = self.linears[0][0][0], self.stacked[0][0]
        if first.grad is None or leaf.grad is None or first.grad.data_ptr() != leaf.grad.data_ptr():
            for (weights, biases), (w, b) in zip(self.linears, self.stacked, strict=True):
                _alias_grads(w, weights)
                if b is not None and biases is not None:
                    _alias_grads(b, biases)
        return [t.grad for pair in self.stacked for t in pair if t is not None]  # type: ignore[misc]

    def forward(self, x: Tensor, generators: Sequence[torch.Generator] | None) -> Tensor:
        self.bind()
        h = x.flatten(2)  # (M, B, D)
        for op, arg in self.plan:
            if op == "linear":
                w, b = self.stacked[arg]  # (M, out, in), (M, out)
                wt = w.transpose(1, 2)  # (M, in, out)
                h = torch.baddbmm(b.unsqueeze(1), h, wt) if b is not None else torch.bmm(h, wt)
            elif op == "bn":
                h = self._batch_norm(h, arg)
            elif op == "act":
                h = arg(h)
            elif self.training and generators is not None:
                h = self._dropout(h, generators)
        return h  # (M, B, K)

    def _dropout(self, h: Tensor, generators: Sequence[torch.Generator]) -> Tensor:
        """Each member's F.dropout mask, drawn from its own generator in the order its standalone run draws
        (in the plan only where some member has dropout)."""
        masks = []
        for p, g in zip(self.dropout, generators, strict=True):
            if p > 0:  # F.dropout on the CPU: noise = empty_like(x).bernoulli_(1 - p).div_(1 - p); x * noise
                masks.append(torch.empty(h.shape[1:], device=h.device).bernoulli_(1 - p, generator=g).div_(1 - p))
            else:
                masks.append(torch.ones(h.shape[1:], device=h.device))
        return h * torch.stack(masks)  # (M, B, C)

    def _batch_norm(self, h: Tensor, bns: list[nn.BatchNorm1d]) -> Tensor:
        """Per-member BatchNorm1d: one F.batch_norm per member on its (B, C) slice, as its standalone run.

        Not one call on the members side by side (B, M*C), which is the same arithmetic: a Linear bias
        in front of BatchNorm has a gradient that is zero up to rounding, and Adam scales that rounding
        noise up to full-size steps, so the bias and the running mean it feeds follow the rounding of the
        kernel call (rel. 0.1 apart after 20 steps); with the member's own call they match bitwise.
        """
        outs = []
        for k, bn in enumerate(bns):
            momentum = bn.momentum
            if self.training and bn.track_running_stats:
                bn.num_batches_tracked.add_(1)  # type: ignore[union-attr,operator]
                if momentum is None:  # cumulative moving average, as _BatchNorm.forward
                    momentum = 1.0 / float(bn.num_batches_tracked)  # type: ignore[arg-type]
            use_batch = self.training or not bn.track_running_stats
            outs.append(
                F.batch_norm(
                    h[k], bn.running_mean, bn.running_var, bn.weight, bn.bias, use_batch, momentum or 0.0, bn.eps
                )
            )  # (B, C)
        return torch.stack(outs)  # (M, B, C)


class StackedBatches:
    """Every member's training batch of the step, (M, B, ...) and (M, B): member m visits epoch e in
    `randperm(n, seed_m + e)` order, as its standalone `TensorBatches` would. Stateful for Lightning."""

    def __init__(self, x: Tensor, y: Tensor, seeds: Sequence[int], batch_size: int, drop_last: bool) -> None:
        self.x, self.y = x, y  # (N, ...), (M, N): the members share inputs, labels may differ (label noise)
        self.seeds, self.batch_size, self.drop_last = list(seeds), batch_size, drop_last
        self.epoch = 0
        self.position = 0

    def __len__(self) -> int:
        n = self.x.shape[0]
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def indices(self, epoch: int) -> Tensor:
        n = self.x.shape[0]
        order = {s: torch.randperm(n, generator=torch.Generator().manual_seed(s + epoch)) for s in set(self.seeds)}
        return torch.stack([order[s] for s in self.seeds])  # (M, N): members of one seed share their order

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        if self.position >= len(self):
            self.epoch, self.position = self.epoch + 1, 0
        epoch, start = self.epoch, self.position
        order = self.indices(epoch).to(self.x.device)  # (M, N)
        M = order.shape[0]
        for b in range(start, len(self)):
            idx = order[:, b * self.batch_size : (b + 1) * self.batch_size]  # (M, B)
            x = self.x.index_select(0, idx.reshape(-1)).view(M, idx.shape[1], *self.x.shape[1:])  # (M, B, ...)
            self.position = b + 1
            yield x, self.y.gather(1, idx)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["consumed"])


class _Eval:
    """The shared val/test split as batches (B, ...), (M, B) (labels per member)."""

    def __init__(self, x: Tensor, y: Tensor, batch_size: int) -> None:
        self.x, self.y, self.batch_size = x, y, batch_size  # (N, ...), (M, N)

    def __len__(self) -> int:
        return math.ceil(self.x.shape[0] / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        for b in range(len(self)):
            s = slice(b * self.batch_size, (b + 1) * self.batch_size)
            yield self.x[s], self.y[:, s]


class StackedClassifier(L.LightningModule):
    """Cross-entropy of every member at once; per-member sums of loss and correct predictions (M,).

    Metrics are kept per member by hand (one (M,) tensor each, read once per epoch), not with `self.log`:
    Lightning's logged values are scalars of one run.
    """

    def __init__(self, cfgs: Sequence[Config], models: Sequence[MLP], generators: Sequence[torch.Generator]) -> None:
        super().__init__()
        self.cfgs = list(cfgs)
        keys = [shape_key(c) for c in cfgs]
        # members in group order (train_stacked sorts them so): each group's inputs are a slice, a view
        self.bounds: list[tuple[int, int]] = []
        for i, k in enumerate(keys):
            if i == 0 or k != keys[i - 1]:
                self.bounds.append((i, i))
            self.bounds[-1] = (self.bounds[-1][0], i + 1)
        if len(self.bounds) != len(set(keys)):
            raise ValueError("StackedClassifier: members of one shape group must be adjacent (see train_stacked)")
        self.groups = nn.ModuleList(
            ShapeGroup(models[a:b], [c.model.dropout for c in cfgs[a:b]]) for a, b in self.bounds
        )
        self.models = list(models)
        aliased = {id(p) for g in self.groups for ws, bs in g.linears for p in [*ws, *(bs or [])]}
        self.unaliased = [p for m in models for p in m.parameters() if id(p) not in aliased]  # BatchNorm's
        self.generators = list(generators)
        self.smoothing = cfgs[0].optim.label_smoothing
        self.l1 = [c.optim.l1 for c in cfgs]
        M = len(cfgs)
        # per stage (train, val, test): (loss sum, correct, count) per member, float32 as RunningMean's
        self.register_buffer("sums", torch.zeros(3, 3, M), persistent=False)
        self.epoch_metrics: list[dict[str, float]] = [{} for _ in range(M)]
        self.diverged: dict[int, int] = {}  # member -> step its loss became non-finite
        self.stop_check: Any = None  # called after each step (signals)
        self._last_loss: Tensor | None = None
        self.steps_per_epoch = 1  # the training loader's length, set before fit (the schedule's length)
        self.writers: list[Any] = []  # each member's TensorBoardLogger (logging.tensorboard), else empty
        self.member_groups: list[list[int]] = []  # each member's param groups in the stacked optimizer
        self.scheduled = False

    def forward(self, x: Tensor, train: bool) -> Tensor:
        """x (M, B, ...) -> logits (M, B, K), members in order."""
        outs = [
            group(x[a:b], self.generators[a:b] if train else None)
            for (a, b), group in zip(self.bounds, self.groups, strict=True)
        ]
        return torch.cat(outs) if len(outs) > 1 else outs[0]

    def _sums(self, stage: int, logits: Tensor, y: Tensor) -> Tensor:
        losses = cross_entropy(logits, y)  # (M, B)
        with torch.no_grad():
            s = self.sums[stage]
            s[0] += losses.detach().sum(1)
            s[1] += (logits.detach().argmax(2) == y).sum(1)
            s[2] += logits.shape[1]
        return losses

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch  # (M, B, ...), (M, B)
        logits = self(x, train=True)  # (M, B, K)
        B = logits.shape[1]
        loss = cross_entropy(logits, y, self.smoothing).mean(1)  # (M,): each member's mean loss, as standalone
        with torch.no_grad():
            s = self.sums[0]
            s[0] += loss.detach() * B  # the standalone RunningMean: mean * n per batch
            s[1] += (logits.detach().argmax(2) == y).sum(1)
            s[2] += B
        ce = loss.detach()  # (M,): train/loss_step, without the L1 term
        M = len(self.models)
        pen: list[Tensor | None] = [None] * M
        if any(self.l1):
            pen = [
                lam * torch.stack([w.abs().sum() for _, w in depth_ordered_layers(m)]).sum() if lam > 0 else None
                for lam, m in zip(self.l1, self.models, strict=True)
            ]
            loss = loss + torch.stack([p if p is not None else loss.new_zeros(()) for p in pen])
        if self.writers and is_logging_step(self.trainer):  # what Classifier._log_step writes, per member
            step, epoch = self.trainer.global_step, self.trainer.current_epoch
            for w, v, p in zip(self.writers, ce.tolist(), pen, strict=True):
                extra = {"train/l1": float(p.detach())} if p is not None else {}
                w.log_metrics({"train/loss_step": v, **extra, "epoch": epoch}, step)
        self._last_loss = loss.detach()
        return loss.sum()  # d(sum)/d(loss_m) = 1: each member gets its standalone gradient

    def optimizer_zero_grad(self, epoch: int, batch_idx: int, optimizer: torch.optim.Optimizer) -> None:
        """Lightning's `optimizer.zero_grad()` drops every gradient (set_to_none): the stacked ones are zeroed
        in place instead, so that the members' gradients stay views of them; the others (BatchNorm's) dropped."""
        self._zero_grad()

    def on_validation_model_zero_grad(self) -> None:
        self._zero_grad()  # Lightning's default, `self.zero_grad(set_to_none=True)`, would drop the views

    def _zero_grad(self) -> None:
        torch._foreach_zero_([g for group in self.groups for g in group.stacked_grads()])
        for p in self.unaliased:
            p.grad = None

    def on_train_start(self) -> None:
        if self.stop_check is not None:
            self.stop_check(None)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        """What LearningRateMonitor(logging_interval="step") writes for a standalone run with a schedule:
        `lr-<Optimizer>` (one param group) or `lr-<Optimizer>/pg<i>`, each member its own groups' lr."""
        if not (self.writers and self.scheduled and is_logging_step(self.trainer)):
            return
        optimizer = self.trainer.optimizers[0]
        name, step = f"lr-{type(optimizer).__name__}", self.trainer.global_step
        for writer, groups in zip(self.writers, self.member_groups, strict=True):
            lrs = [float(optimizer.param_groups[g]["lr"]) for g in groups]
            tags = [name] if len(lrs) == 1 else [f"{name}/pg{k + 1}" for k in range(len(lrs))]
            writer.log_metrics(dict(zip(tags, lrs, strict=True)), step)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        assert self._last_loss is not None
        finite = torch.isfinite(self._last_loss)
        if not bool(finite.all()):  # one host read per step, as DivergenceGuard on the CPU
            for m in (~finite).nonzero().flatten().tolist():
                self.diverged.setdefault(m, self.trainer.global_step)
        if self.stop_check is not None:
            self.stop_check(self.trainer.global_step)

    def _close(self, stage: int, name: str) -> None:
        s = self.sums[stage].cpu()
        for m in range(s.shape[1]):
            if m in self.diverged and name == "train":
                continue  # its standalone run stopped at the divergence: keep what it had then
            n = float(s[2, m])
            if n > 0:
                loss, acc = float(s[0, m] / n), float(s[1, m] / n)
                self.epoch_metrics[m][f"{name}/loss"] = loss
                self.epoch_metrics[m][f"{name}/acc"] = acc
                if self.writers:  # the tags Classifier's self.log writes at the epoch end
                    tag = "train/loss_epoch" if name == "train" else f"{name}/loss"
                    epoch = self.trainer.current_epoch
                    step = self.trainer.global_step - (0 if name == "test" else 1)  # Lightning's steps for them
                    self.writers[m].log_metrics({tag: loss, f"{name}/acc": acc, "epoch": epoch}, step)
        self.sums[stage].zero_()

    def on_train_epoch_end(self) -> None:
        self._close(0, "train")

    def _eval_step(self, batch: tuple[Tensor, Tensor], stage: int) -> None:
        x, y = batch  # (B, ...), (M, B)
        M = y.shape[0]
        xs = x.flatten(1).unsqueeze(0).expand(M, -1, -1)  # (M, B, D): every member sees the same inputs
        self._sums(stage, self(xs, train=False), y)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, 1)

    def on_validation_epoch_end(self) -> None:
        if not self.trainer.sanity_checking:
            self._close(1, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval_step(batch, 2)

    def on_test_epoch_end(self) -> None:
        self._close(2, "test")

    def configure_optimizers(self) -> Any:
        optimizer, self.member_groups = build_stacked_optimizer(self.models, self.cfgs)
        self.scheduled = False
        sched = self.cfgs[0].scheduler
        if sched.name == "none" and not sched.warmup_steps:
            return optimizer
        per_epoch, t = self.steps_per_epoch, self.trainer
        total = t.max_steps if t.max_steps > 0 else per_epoch * max(t.max_epochs or 1, 1)
        scheduler = build_scheduler(optimizer, sched, total, per_epoch, self.cfgs[0].optim.lr)
        self.scheduled = True
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}


_GROUP_HYPER = {
    "sgd": ("lr", "momentum", "nesterov"),
    "adam": ("lr", "betas", "eps", "amsgrad"),
    "adamw": ("lr", "betas", "eps", "amsgrad"),
    "rmsprop": ("lr", "momentum", "eps"),
    "adagrad": ("lr", "eps"),
}


def build_stacked_optimizer(
    models: Sequence[nn.Module], cfgs: Sequence[Config]
) -> tuple[torch.optim.Optimizer, list[list[int]]]:
    """One optimizer over every member's own param groups (its `param_groups` with its hyperparameters set
    per group), groups of equal hyperparameters merged; the kind `build_optimizer` builds for one run.
    Also each member's groups' indices in it, in the member's own group order.

    Each member's tensors stay separate in it (views of the stacked leaves), never the stacked leaf itself:
    the fused kernels take the last `numel % vector width` elements of a tensor down a scalar path, so a leaf
    (M, ...) would round some of a member's elements differently from its standalone run (1 ulp, which
    2,000 Adam steps grew into other test errors for 9 of the 36 double-descent nets; ~0.5 ms per step
    faster). Merging equal groups is exact: a group is a list of tensors, each updated as alone. Adam and
    AdamW step those lists in one fused call per group (`_OneFusedCall`)."""
    name = cfgs[0].optim.name
    merged: dict[str, dict[str, Any]] = {}
    where: list[list[int]] = []
    for model, cfg in zip(models, cfgs, strict=True):
        o = cfg.optim
        own = {
            "lr": o.lr,
            "momentum": o.momentum,
            "nesterov": o.nesterov and o.momentum > 0,
            "betas": tuple(o.betas),
            "eps": o.eps,
            "amsgrad": o.amsgrad,
        }
        if name in ("adam", "adamw") and (len(o.betas) != 2 or not all(0 <= b < 1 for b in o.betas)):
            raise UserError(f"optim.betas: need two values in [0, 1), got {o.betas}")
        where.append([])
        for g in param_groups(model, o):
            hyper = {k: own[k] for k in _GROUP_HYPER[name]} | {"weight_decay": g["weight_decay"]}
            key = json.dumps(hyper, sort_keys=True)
            merged.setdefault(key, {**hyper, "params": []})["params"] += g["params"]
            where[-1].append(list(merged).index(key))
    cls = {
        "sgd": torch.optim.SGD,
        "adam": Adam,
        "adamw": AdamW,
        "rmsprop": torch.optim.RMSprop,
        "adagrad": torch.optim.Adagrad,
    }[name]
    groups = list(merged.values())
    if name == "rmsprop":  # as build_optimizer: no fused kernel
        return cls(groups, foreach=True), where
    return _fast(cls, groups), where


class _OneFusedCall:
    """torch.optim.Adam / AdamW with fused=True, stepped in one fused call per param group.

    torch's own step does per-parameter Python (`_init_group`'s state lookups) and, on the CPU, one add per
    step counter (`_foreach_add_` has no CPU kernel): with 144 member tensors (36 double-descent nets) that
    was ~2 ms of a ~10 ms stacked step. Here, after a step of torch's own (the first, which creates the
    state), every parameter's `state["step"]` becomes a view of one tensor that a single add_ advances, and
    each group's tensors are listed once; then a step is that add_ and the `torch._fused_adam_(w)_` call
    torch's step makes, with the same arguments: every bit as torch's (tests/test_stacked.py). Anything else
    (a missing gradient, a grad scaler's scale, state loaded or added, capturable or differentiable) takes
    torch's step.
    """

    _torch: type[torch.optim.Optimizer]  # the torch class whose step this one replaces
    _plan: tuple[Any, Tensor, list[tuple[dict[str, Any], list[Tensor], list[list[Tensor]]]]] | None = None

    def step(self, closure: Any = None) -> Any:  # type: ignore[override]
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        with torch.no_grad():
            fused = self._step_fused()
        if not fused:
            _unwrapped_step(self._torch)(self)  # torch's own step (without its hooks: they ran around this one)
            self._list_tensors()
        return loss

    def _key(self) -> tuple[int, ...]:
        opt: Any = self
        return (id(opt.state), len(opt.state), *(len(g["params"]) for g in opt.param_groups))

    def _step_fused(self) -> bool:
        opt: Any = self
        plan = self._plan
        scaled = getattr(opt, "grad_scale", None) is not None or getattr(opt, "found_inf", None) is not None
        if plan is None or plan[0] != self._key() or scaled:
            return False
        _, steps, groups = plan
        grads = [[p.grad for p in params] for _, params, _ in groups]
        if any(g is None for gs in grads for g in gs):
            return False
        steps.add_(1)  # every parameter's state["step"]: views of it
        for (group, params, (exp_avgs, exp_avg_sqs, max_sqs, state_steps)), gs in zip(groups, grads, strict=True):
            fused = torch._fused_adamw_ if group["decoupled_weight_decay"] else torch._fused_adam_
            beta1, beta2 = group["betas"]
            fused(
                params,
                gs,
                exp_avgs,
                exp_avg_sqs,
                max_sqs,
                state_steps,
                amsgrad=group["amsgrad"],
                lr=group["lr"],
                beta1=beta1,
                beta2=beta2,
                weight_decay=group["weight_decay"],
                eps=group["eps"],
                maximize=group["maximize"],
                grad_scale=None,
                found_inf=None,
            )
        return True

    def _list_tensors(self) -> None:
        """The plan of `_step_fused`, where every parameter has its state on one device and dtype; else none."""
        opt: Any = self
        self._plan = None
        groups = []
        for group in opt.param_groups:
            if not group["fused"] or group["capturable"] or group["differentiable"] or torch.is_tensor(group["lr"]):
                return
            params = list(group["params"])
            states = [opt.state.get(p) for p in params]
            if any(not s or "step" not in s for s in states):
                return
            lists = [[s[k] for s in states] for k in ("exp_avg", "exp_avg_sq")]
            lists.append([s["max_exp_avg_sq"] for s in states] if group["amsgrad"] else [])
            lists.append([s["step"] for s in states])
            groups.append((group, params, lists))
        steps = [t for _, _, lists in groups for t in lists[-1]]
        if not steps or len({(t.device, t.dtype, t.shape) for t in steps}) != 1 or steps[0].shape != ():
            return
        stacked = torch.stack(steps)
        views = iter(stacked.unbind())
        for _, params, lists in groups:
            for i, p in enumerate(params):
                opt.state[p]["step"] = lists[-1][i] = next(views)
        self._plan = (self._key(), stacked, groups)


def _unwrapped_step(cls: type) -> Any:
    """`cls.step` without the profiling / hook wrapper torch.optim puts around a class's step when an instance
    is made (marked `hooked`; functools.wraps keeps the step it wraps as `__wrapped__`), but with the step's
    own decorator (its grad mode)."""
    step = cls.step
    return step.__wrapped__ if getattr(step, "hooked", False) else step


class Adam(_OneFusedCall, torch.optim.Adam):
    """Named as torch's: a standalone run's TensorBoard lr tag (`lr-Adam`) is the optimizer's class name."""

    _torch = torch.optim.Adam


class AdamW(_OneFusedCall, torch.optim.AdamW):
    """Named as torch's (`lr-AdamW`)."""

    _torch = torch.optim.AdamW


# ---------------------------------------------------------------- the run


@dataclasses.dataclass
class Member:
    cfg: Config
    run_dir: Path | None = None
    lock: RunLock | None = None
    record: Any = None


def _load_data(cfgs: Sequence[Config]) -> tuple[InMemoryDataModule, Tensor, Tensor, Tensor]:
    """The members' shared splits, and their training labels (M, N) (label noise may differ)."""
    cache: dict[str, InMemoryDataModule] = {}
    dms = []
    for c in cfgs:
        key = json.dumps(dataclasses.asdict(c.data), sort_keys=True, default=str)
        if key not in cache:
            cache[key] = InMemoryDataModule(c.data, c.seed)
            cache[key].setup("fit")
        dms.append(cache[key])
    first = dms[0].splits
    assert first is not None
    for dm in dms[1:]:
        s = dm.splits
        assert s is not None
        if not (torch.equal(s.x_train, first.x_train) and torch.equal(s.x_test, first.x_test)):
            raise UserError("sweep.vectorize: the stacked points read different inputs (data.*); set vectorize: false")
    y_train = torch.stack([dm.splits.y_train for dm in dms])  # type: ignore[union-attr]
    y_val = torch.stack([dm.splits.y_val for dm in dms])  # type: ignore[union-attr]
    y_test = torch.stack([dm.splits.y_test for dm in dms])  # type: ignore[union-attr]
    return dms[0], y_train, y_val, y_test


def build_members(cfgs: Sequence[Config], data: InMemoryDataModule) -> tuple[list[nn.Module], list[torch.Generator]]:
    """Each member's model and dropout generator, as its standalone `train()` has them: seed_everything, (the
    data,) build_model; its dropout then draws from the global RNG, whose state the generator takes."""
    models, gens = [], []
    for c in cfgs:
        L.seed_everything(c.seed, workers=True, verbose=False)
        models.append(build_model(c.model, data.input_shape, data.num_classes))
        g = torch.Generator()
        g.set_state(torch.get_rng_state())
        gens.append(g)
    return models, gens


def _open_member(m: Member, threads: int) -> None:
    from deepnets.run import RunRecord, make_run_dir

    m.run_dir = make_run_dir(m.cfg.output_dir, m.cfg.name)
    m.lock = RunLock(m.run_dir)
    m.lock.acquire()
    try:
        (m.run_dir / "config.yaml").write_text(to_yaml(m.cfg, threads))
    except OSError as e:
        raise UserError(f"cannot write {m.run_dir / 'config.yaml'}: {e.strerror or e}") from None
    m.record = RunRecord(m.run_dir, m.cfg, None, 0)
    m.record.write("running")


def _save_member(m: Member, model: nn.Module, trainer: L.Trainer, threads: int) -> None:
    """checkpoints/last.ckpt as a standalone run writes it, as far as --export / --evaluate / predict read it:
    the Classifier's state_dict (`model.` prefix) and the run's hyperparameters (the thread count used)."""
    from deepnets.checkpoint import atomic_torch_save

    assert m.run_dir is not None
    used = dataclasses.replace(m.cfg, trainer=dataclasses.replace(m.cfg.trainer, threads=threads))
    ckpt = {
        "epoch": trainer.current_epoch,
        "global_step": trainer.global_step,
        "pytorch-lightning_version": L.__version__,
        "state_dict": {f"model.{k}": v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "hyper_parameters": used.to_dict(),
        "stacked": True,  # no optimizer or loop state: not resumable as a standalone run
    }
    (m.run_dir / "checkpoints").mkdir(exist_ok=True)
    atomic_torch_save(ckpt, m.run_dir / "checkpoints" / "last.ckpt")


def train_stacked(cfgs: Sequence[Config], *, quiet: bool = True) -> list[Any]:
    """Train `cfgs` (one run key) as one stacked model; a `deepnets.run.RunResult` per member, in order.

    Each member gets its own run directory (config.yaml, metrics.json, checkpoints/last.ckpt where
    checkpoint.enabled); nothing is written until data and models are built.
    """
    if not cfgs:
        return []
    group_of: dict[str, int] = {}
    for c in cfgs:
        group_of.setdefault(shape_key(c), len(group_of))
    order = sorted(range(len(cfgs)), key=lambda i: group_of[shape_key(cfgs[i])])  # stable: seeds keep their order
    results = _train_grouped([cfgs[i] for i in order], quiet)
    back = {i: k for k, i in enumerate(order)}
    return [results[back[i]] for i in range(len(cfgs))]


def stacked_threads(cfgs: Sequence[Config]) -> int:
    """The thread count of a stacked run: `trainer.threads: N` (or OMP_NUM_THREADS) as given; for `auto`, what
    auto picks for the stacked computation, one model with the FLOPs of all members together (36 double-descent
    nets: 2 threads on an idle 2-core machine, 1 next to a busy process), where the thread count cannot change
    a member's numbers; else the count each member's standalone run would pick.

    Per member the stacked ops are batched matmuls (each member's product computed whole, whatever the
    threads), elementwise ops, dropout masks from the member's own generator and row-wise cross-entropy: their
    results do not depend on the thread count (tests/test_stacked.py: bitwise at 1 and 2 threads). BatchNorm's
    batch statistics do (its reductions split across threads): with BatchNorm, the members' standalone count
    keeps them equal to their standalone runs (auto gives small nets 1 thread; the smallest where they differ).
    """
    from deepnets.run import forward_flops, resolve_threads

    requested = cfgs[0].trainer.threads  # one run key: the members agree
    shapes = {shape_key(c): c for c in cfgs}
    if any(c.model.batch_norm for c in cfgs):
        return min(resolve_threads(requested, c) for c in shapes.values())

    def total_flops() -> float | None:  # each distinct net counted once (a meta-device forward)
        per_shape = {k: forward_flops(c) for k, c in shapes.items()}
        if any(f is None for f in per_shape.values()):
            return None
        return sum(per_shape[shape_key(c)] for c in cfgs)  # type: ignore[misc]

    return resolve_threads(requested, count_flops=total_flops)


def _train_grouped(cfgs: Sequence[Config], quiet: bool) -> list[Any]:
    """train_stacked with the members of each shape group side by side."""
    from deepnets.run import Interrupted, RunResult, StopSignals, apply_threads

    keys = {run_key(c) for c in cfgs}
    if len(keys) > 1:
        raise ValueError("train_stacked: the configs differ in keys that must agree (group them with run_key)")
    for c in cfgs:
        check_vectorize(c)
    # once per distinct trainer and data settings (one run key: the trainer agrees; the data differs at most in
    # label_noise): it builds a Trainer to see that this machine can run it, ~8 ms each
    runtime = {json.dumps([dataclasses.asdict(c.trainer), dataclasses.asdict(c.data)], default=str): c for c in cfgs}
    for c in runtime.values():
        check_runtime(c)
    threads = apply_threads(stacked_threads(cfgs))
    members = [Member(c) for c in cfgs]
    with StopSignals() as stop:
        try:
            data, y_train, y_val, y_test = _load_data(cfgs)
            models, gens = build_members(cfgs, data)
        except Interrupted as e:
            return [RunResult(None, "interrupted", error=str(e), signum=e.signum) for _ in cfgs]
        if any(not isinstance(m, MLP) for m in models):
            raise UserError("sweep.vectorize: model.arch: only plain MLPs stack")
        stop.defer()
        results: list[Any] = []
        try:
            for m in members:
                _open_member(m, threads)
            results = _fit_stacked(members, models, gens, data, y_train, y_val, y_test, stop, threads, quiet)
        finally:
            for m in members:
                if m.lock is not None:
                    m.lock.release()
        return results


def _fit_stacked(
    members: list[Member],
    models: list[MLP],
    gens: list[torch.Generator],
    data: InMemoryDataModule,
    y_train: Tensor,
    y_val: Tensor,
    y_test: Tensor,
    stop: Any,
    threads: int,
    quiet: bool,
) -> list[Any]:
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from deepnets.run import Interrupted, RunResult

    cfg = members[0].cfg
    t = cfg.trainer
    cfgs = [m.cfg for m in members]
    module = StackedClassifier(cfgs, models, gens)
    limit_val = None if isinstance(t.limit_val_batches, float) and t.limit_val_batches == 1.0 else t.limit_val_batches
    writers = (
        [_tensorboard(m, model, threads) for m, model in zip(members, models, strict=True)]
        if cfg.logging.tensorboard
        else []
    )
    module.writers = writers
    callbacks = [MemberMonitors(members, models, writers)] if cfg.logging.grad_norm_every_n_steps > 0 else []
    with _quiet(quiet):
        trainer = L.Trainer(
            callbacks=callbacks,
            accelerator=t.accelerator,
            devices=1,
            precision=t.lightning_precision,
            max_epochs=t.max_epochs,
            max_steps=t.max_steps,
            deterministic=t.deterministic,
            log_every_n_steps=t.log_every_n_steps,
            limit_val_batches=limit_val,
            check_val_every_n_epoch=t.check_val_every_n_epoch,
            detect_anomaly=t.detect_anomaly,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
        )
    dev = trainer.strategy.root_device
    s = data.splits
    assert s is not None
    bs = cfg.data.batch_size
    ebs = cfg.data.eval_batch_size or 4 * bs
    drop_last = cfg.model.batch_norm and len(s.y_train) % bs == 1
    if dev.type != "cpu":  # standalone CUDA dropout draws from the device's generator, seeded by seed_everything
        module.generators = [torch.Generator(dev).manual_seed(c.seed) for c in cfgs]
    train_loader = StackedBatches(s.x_train.to(dev), y_train.to(dev), [c.seed for c in cfgs], bs, drop_last)
    val_loader = _Eval(s.x_val.to(dev), y_val.to(dev), ebs) if len(s.y_val) else None

    def check(step: int | None) -> None:
        stop.install()  # Lightning replaces the SIGTERM handler at the start of each fit/test
        if step is not None:
            stop.check(step)

    module.stop_check = check
    module.steps_per_epoch = max(len(train_loader), 1)
    status, error, signum = "completed", None, None
    try:
        with _quiet(quiet):
            trainer.fit(module, train_dataloaders=train_loader, val_dataloaders=val_loader)
            stop.check(trainer.global_step)
            if t.test:
                trainer.test(module, dataloaders=_Eval(s.x_test.to(dev), y_test.to(dev), ebs), verbose=False)
                stop.check(trainer.global_step)
    except (Interrupted, SIGTERMException) as e:
        signum = getattr(e, "signum", None) or stop.signum or signal.SIGTERM
        status, error = "interrupted", str(Interrupted(signum, trainer.global_step))
    except BaseException as e:
        for m in members:
            if m.record is not None:
                m.record.write("failed", f"{type(e).__name__}: {e}", trainer=trainer)
        raise
    results = []
    for i, (m, model) in enumerate(zip(members, models, strict=True)):
        st, err = status, error
        metrics = dict(module.epoch_metrics[i])
        if i in module.diverged and st == "completed":
            st, err = "diverged", f"loss became non-finite at step {module.diverged[i]}"
            metrics = {k: v for k, v in metrics.items() if not k.startswith("test/")}
        metrics = {k: (v if math.isfinite(v) else str(v)) for k, v in metrics.items()}
        record = m.record
        record.write(st, err, metrics, trainer=trainer)
        if module.writers:
            _end_tensorboard(module.writers[i], st, metrics, module.diverged.get(i, trainer.global_step))
        if i in module.diverged:  # the standalone run stopped there
            record.steps = module.diverged[i]
            record.write(st, err, metrics)
        if m.cfg.checkpoint.enabled and st == "completed":
            _save_member(m, model, trainer, threads)
        results.append(RunResult(m.run_dir, st, metrics, error=err, signum=signum, model=model))
    return results


class _TrainerOf:
    """The Trainer as one member's GradientFlowMonitor sees it: the member's own logger, else the real one."""

    def __init__(self, trainer: L.Trainer, logger: Any) -> None:
        self._trainer, self.loggers = trainer, [logger] if logger is not None else []

    def __getattr__(self, name: str) -> Any:
        return getattr(self._trainer, name)


class _ModuleOf:
    """The LightningModule as the monitor sees it: `.model` is the watched net, `.hparams` titles its figure."""

    def __init__(self, model: nn.Module, cfg: Config) -> None:
        self.model, self.hparams = model, cfg.to_dict()


class MemberMonitors(L.Callback):
    """A standalone run's GradientFlowMonitor for every member, each on its own net, logger and run directory.

    The members' parameters are their own leaf tensors, so at `on_before_optimizer_step` each holds its
    standalone gradient: the monitor's hooks run unchanged on a view of the trainer and module per member.
    """

    def __init__(self, members: Sequence[Member], models: Sequence[nn.Module], writers: Sequence[Any]) -> None:
        from deepnets.monitor import GradientFlowMonitor

        self.watch = [
            (GradientFlowMonitor.from_config(m.cfg.logging, m.run_dir), _ModuleOf(model, m.cfg), w)
            for m, model, w in zip(members, models, list(writers) or [None] * len(members), strict=True)
        ]

    def _each(self, hook: str, trainer: L.Trainer, *args: Any) -> None:
        for monitor, module, writer in self.watch:
            getattr(monitor, hook)(_TrainerOf(trainer, writer), module, *args)

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._each("setup", trainer, stage)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._each("on_train_start", trainer)

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        self._each("on_before_optimizer_step", trainer, optimizer)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        self._each("on_train_batch_end", trainer, *args)

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._each("on_train_epoch_end", trainer)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._each("on_train_end", trainer)

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._each("on_exception", trainer, exception)


def _tensorboard(m: Member, model: nn.Module, threads: int) -> Any:
    """The member's TensorBoard run, as build_trainer makes it, with HParamsRecorder's start of fit: the
    layout, the experiment definition and the session's hyperparameters (the thread count used)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    from deepnets.hparams import experiment_summary, layout_summary, session_start_summary
    from deepnets.tb import use_fast_crc

    assert m.run_dir is not None
    use_fast_crc()
    logger = TensorBoardLogger(
        save_dir=str(m.run_dir.parent.parent),
        name=m.run_dir.parent.name,
        version=m.run_dir.name,
        default_hp_metric=False,
        flush_secs=10,
    )
    used = dataclasses.replace(m.cfg, trainer=dataclasses.replace(m.cfg.trainer, threads=threads))
    logger.log_hyperparams(used.to_dict())  # hparams.yaml, as Lightning writes from save_hyperparameters
    file_writer = logger.experiment._get_file_writer()
    for summary in (layout_summary(), experiment_summary(), session_start_summary(m.cfg)):
        file_writer.add_summary(summary, 0)
    logger.parameters = sum(p.numel() for p in model.parameters())  # type: ignore[attr-defined]
    return logger


def _end_tensorboard(logger: Any, status: str, metrics: dict[str, Any], step: int) -> None:
    """HParamsRecorder's end of the run: the final metrics as `final/...` scalars and the session end."""
    from deepnets.hparams import STATUS_CODES, session_end_summary

    writer = logger.experiment
    final = {f"final/{k}": metrics.get(k) for k in ("test/acc", "test/loss", "val/acc", "val/loss")}
    final |= {"final/parameters": float(logger.parameters), "final/status": float(STATUS_CODES[status])}
    for tag, v in final.items():
        if isinstance(v, float):
            writer.add_scalar(tag, v, step)
    writer._get_file_writer().add_summary(session_end_summary(status in ("completed", "early_stopped")), step)
    logger.finalize("success")


@contextlib.contextmanager
def _quiet(on: bool) -> Iterator[None]:
    import logging
    import warnings

    if not on:
        yield
        return
    loggers = [logging.getLogger(n) for n in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*does not have many workers.*")
            warnings.filterwarnings("ignore", message=".*`training_step` returned.*")
            # no validation split (limit_val_batches: 0, val_fraction: 0): no val loader, as intended
            warnings.filterwarnings("ignore", message="You defined a `validation_step` but have no `val_dataloader`")
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


# ---------------------------------------------------------------- the sweep's side


def work_stacked(sw: Any, flag: Any, tag: str) -> bool:
    """`sweep.work` for `sweep.vectorize: true`: claim every waiting trial, train the points of each run key
    as one stacked run, record each point's row and outcome in the study; again while trials wait."""
    from optuna.storages import fail_stale_trials
    from optuna.trial import TrialState

    from deepnets import sweep as S

    ok = True
    while flag.signum is None:
        fail_stale_trials(sw.study)
        trials = []
        while (trial := S.claim(sw.study)) is not None:
            trials.append(trial)
        if not trials:
            break
        beats = []
        runs: dict[str, list[tuple[Any, Any]]] = {}
        for trial in trials:
            trial.set_user_attr("worker", S._worker_id())
            trial.set_user_attr("started", time.time())
            beats.append(S._Heartbeat(sw.storage, trial._trial_id))
            try:
                point = S._point_of(trial, sw)
                check_vectorize(point.cfg)
            except UserError as e:
                a = trial.user_attrs
                row = {"point": a["point"], "seed": a["seed"], "status": "failed", "error": str(e)}
                S._finish(sw, trial, row, None, TrialState.FAIL)
                print(f"[{tag}] point {a['point']}, seed {a['seed']}: failed: {e}", file=sys.stderr, flush=True)
                ok = False
                continue
            S._run_dir_cfg(point, sw)
            runs.setdefault(run_key(point.cfg), []).append((trial, point))
        try:
            for pairs in runs.values():
                if flag.signum is not None:
                    break
                labels = ", ".join(p.label for _, p in pairs)
                print(f"[{tag}] stacked: {len(pairs)} points in one run ({labels})", flush=True)
                try:
                    results = train_stacked([p.cfg for _, p in pairs])
                except UserError as e:
                    for trial, point in pairs:
                        run_dir = S._latest_version(Path(point.cfg.output_dir) / point.cfg.name)
                        S._finish(sw, trial, S._row(point, sw, run_dir, "failed", str(e)), None, TrialState.FAIL)
                    raise UserError(f"sweep stacked run ({labels}): {e}") from None
                except Exception as e:  # a crash must not lose the other runs
                    traceback.print_exc(file=sys.stderr)
                    for trial, point in pairs:
                        run_dir = S._latest_version(Path(point.cfg.output_dir) / point.cfg.name)
                        row = S._row(point, sw, run_dir, "failed", f"{type(e).__name__}: {e}")
                        S._finish(sw, trial, row, None, TrialState.FAIL)
                    ok = False
                    continue
                for (trial, point), r in zip(pairs, results, strict=True):
                    row = S._row(point, sw, r.run_dir, r.status, r.error)
                    value = row.get(sw.cfg.sweep.metric)
                    if r.ok and isinstance(value, float) and math.isfinite(value):
                        S._finish(sw, trial, row, value, None)
                    else:
                        S._finish(sw, trial, row, None, TrialState.FAIL)
                    ok &= r.status in S.OK
                    if r.signum is not None and flag.signum is None:
                        flag.signum = r.signum
                    shown = f"{value:.4f}" if isinstance(value, float) else "n/a"
                    print(f"[{tag}]     {point.label}: {r.status}: {sw.cfg.sweep.metric} = {shown}", flush=True)
                S.write_report(sw, plot=False)
        finally:
            for b in beats:
                b.stop()
            # trials claimed but not run (a signal stopped the sweep first): failed, so a resume runs them again
            for pairs in runs.values():
                for trial, point in pairs:
                    if not sw.storage.get_trial(trial._trial_id).state.is_finished():
                        S._finish(sw, trial, S._row(point, sw, None, "interrupted", None), None, TrialState.FAIL)
    return ok
