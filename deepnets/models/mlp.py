"""Plain deep MLP: y = v^T h(W^L ... h(W^1 x))."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise

from torch import Tensor, nn

from deepnets.layers import maybe_checkpoint


class MLPLayer(nn.Sequential):
    """Linear -> [norm] -> activation -> [dropout], the unit every fully connected net stacks."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        activation_layer: Callable[..., nn.Module],
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        layers: list[nn.Module] = [nn.Linear(in_features, out_features, bias=bias)]
        if norm_layer is not None:
            layers.append(norm_layer(out_features))
        layers.append(activation_layer())
        if dropout > 0:
            layers.append(nn.Dropout(dropout))
        super().__init__(*layers)


class MLP(nn.Module):
    """Deep fully connected classifier on flattened inputs.

    Args:
        in_features: input size after flattening.
        widths: hidden widths, one per layer (depth = len(widths)).
        num_classes: output size of the linear head v.
        checkpointing: recompute each layer's activations in the backward pass.
    """

    def __init__(
        self,
        in_features: int,
        widths: Sequence[int],
        num_classes: int,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        dims = [in_features, *widths]
        self.layers = nn.Sequential(
            *(MLPLayer(a, b, activation_layer, norm_layer, dropout, bias) for a, b in pairwise(dims))
        )
        self.head = nn.Linear(dims[-1], num_classes, bias=bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (B, D)
        for layer in self.layers:
            x = maybe_checkpoint(layer, x, enabled=self.checkpointing)  # (B, width_l)
        return x

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
