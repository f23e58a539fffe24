"""Dense MLP: DenseNet's connectivity (Huang et al. 2017) on fully connected layers.

Inside a dense block layer l sees the concatenation [a^0, h^1, ..., h^{l-1}]
of everything before it and adds `growth_rate` features, so every layer has
a one-step path to the block's output (feature reuse, short gradient paths).
Transition layers between blocks shrink the features by `compression`,
as in DenseNet-BC, so the width does not grow without bound.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from deepnets.layers import maybe_checkpoint
from deepnets.models.mlp import MLPLayer


class DenseMLPBlock(nn.Module):
    """`num_layers` MLP layers, each reading the concatenation of the block input and all earlier outputs.

    Output features: in_features + num_layers * growth_rate.
    """

    def __init__(
        self,
        in_features: int,
        num_layers: int,
        growth_rate: int,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.layers = nn.ModuleList(
            MLPLayer(in_features + i * growth_rate, growth_rate, activation_layer, norm_layer, dropout, bias)
            for i in range(num_layers)
        )
        self.out_features = in_features + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        feats = [x]
        for layer in self.layers:
            inp = torch.cat(feats, dim=1)  # (B, in + i * k)
            feats.append(maybe_checkpoint(layer, inp, enabled=self.checkpointing))  # (B, k)
        return torch.cat(feats, dim=1)  # (B, in + L * k)


class DenseMLP(nn.Module):
    """Stem -> (dense block -> transition) x (num_blocks - 1) -> dense block -> head.

    Args:
        in_features: input size after flattening.
        width: stem output features (a^0).
        growth_rate: features each layer adds (k).
        layers_per_block: layers in each dense block.
        num_blocks: dense blocks.
        compression: transition output = floor(compression * input features) (DenseNet-BC's theta).
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        growth_rate: int,
        layers_per_block: int,
        num_blocks: int,
        num_classes: int,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        compression: float = 0.5,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.stem = MLPLayer(in_features, width, activation_layer, norm_layer, 0.0, bias)
        layers: list[nn.Module] = []
        features = width
        for i in range(num_blocks):
            block = DenseMLPBlock(
                features, layers_per_block, growth_rate, activation_layer, norm_layer, dropout, bias, checkpointing
            )
            layers.append(block)
            features = block.out_features
            if i < num_blocks - 1:
                out = max(1, math.floor(compression * features))
                layers.append(MLPLayer(features, out, activation_layer, norm_layer, 0.0, bias))
                features = out
        self.layers = nn.Sequential(*layers)
        self.head = nn.Linear(features, num_classes, bias=bias)

    def forward_features(self, x: Tensor) -> Tensor:
        return self.layers(self.stem(x.flatten(1)))  # (B, features)

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
