"""SkipNet: an MLP whose later layers and head also see the input (or every earlier layer).

Shortcuts are concatenations, as in the "cascade" nets of Fahlman & Lebiere
(1990) and DenseNet (Huang et al. 2017). With `skip_from: input` every layer
and the head see [h^{l-1}, x]: the input reaches the output through one
transformation, but W^1's gradient still crosses all L layers (it vanishes:
see `python -m deepnets.experiments vanishing`). With `skip_from: all` layer l
sees [x, h^1, ..., h^{l-1}] and the head sees every layer, so the gradient
reaches W^1 through one transformation instead of L.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from deepnets.layers import maybe_checkpoint
from deepnets.models.mlp import MLPLayer


class SkipNet(nn.Module):
    """Fully connected net with concatenated shortcuts from the input (or from all earlier layers).

    Args:
        in_features: input size after flattening.
        widths: hidden widths, one per layer.
        num_classes: output size of the linear head.
        skip_from: "input": layer l sees [h^{l-1}, x]; "all": layer l sees [x, h^1, ..., h^{l-1}].
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
        skip_from: Literal["input", "all"] = "input",
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.skip_from = skip_from
        self.checkpointing = checkpointing
        layers = []
        seen = in_features  # features the next layer reads
        for width in widths:
            layers.append(MLPLayer(seen, width, activation_layer, norm_layer, dropout, bias))
            seen = seen + width if skip_from == "all" else width + in_features
        self.layers = nn.ModuleList(layers)
        self.head = nn.Linear(seen, num_classes, bias=bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = x.flatten(1)  # (B, D)
        feats = [x]
        for layer in self.layers:
            inp = torch.cat(feats, dim=1) if len(feats) > 1 else feats[0]  # (B, seen)
            h = maybe_checkpoint(layer, inp, enabled=self.checkpointing)  # (B, width_l)
            feats = [*feats, h] if self.skip_from == "all" else [h, x]
        return torch.cat(feats, dim=1)  # (B, seen)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
