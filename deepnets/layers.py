"""Name -> layer tables (the only place a config string becomes a layer class) and shared pieces."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from functools import partial

import torch
from torch import Tensor, nn
from torch.utils.checkpoint import checkpoint

from deepnets.errors import UserError

ACTIVATIONS: dict[str, Callable[..., nn.Module]] = {
    "relu": partial(nn.ReLU, inplace=False),
    "leaky_relu": partial(nn.LeakyReLU, 0.01),
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
    "identity": nn.Identity,
}

NORMS: dict[str, Callable[..., nn.Module]] = {
    "batch_norm1d": nn.BatchNorm1d,
    "batch_norm2d": nn.BatchNorm2d,
    "layer_norm": nn.LayerNorm,
}


def get_activation(name: str | Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """A layer factory for `name`; callables pass through (torchvision's `activation_layer`)."""
    if callable(name):
        return name
    try:
        return ACTIVATIONS[name]
    except KeyError:
        raise UserError(f"model.activation: unknown {name!r}; allowed: {', '.join(ACTIVATIONS)}") from None


def get_norm(name: str | Callable[..., nn.Module] | None) -> Callable[..., nn.Module] | None:
    """A norm-layer factory for `name` (None: no norm); callables pass through."""
    if name is None or callable(name):
        return name
    try:
        return NORMS[name]
    except KeyError:
        raise UserError(f"unknown norm layer {name!r}; allowed: {', '.join(NORMS)}") from None


@contextmanager
def _keep_buffers(module: nn.Module) -> Iterator[None]:
    """Undo buffer updates (BatchNorm running stats) made while the block is recomputed.

    Without this, checkpointing would count every training batch twice in
    the running mean/var, so eval-mode outputs would differ from a run
    without checkpointing.
    """
    saved = [(b, b.clone()) for b in module.buffers()]
    try:
        yield
    finally:
        with torch.no_grad():
            for b, value in saved:
                b.copy_(value)


def maybe_checkpoint(block: nn.Module, *inputs: Tensor, enabled: bool) -> Tensor:
    """`block(*inputs)`, recomputed in the backward pass when `enabled` and training.

    Activation checkpointing (Chen et al. 2016, "Training deep nets with
    sublinear memory cost") keeps only block inputs and recomputes the
    rest, trading one extra forward for O(blocks) instead of O(layers)
    activation memory. Non-reentrant mode works with inputs that need no
    grad and with torch.compile; the dropout RNG state is replayed.
    """
    if not (enabled and block.training and torch.is_grad_enabled()):
        return block(*inputs)
    return checkpoint(block, *inputs, use_reentrant=False, context_fn=lambda: (nullcontext(), _keep_buffers(block)))
