"""DenseNet-BC (Huang et al. 2017, "Densely connected convolutional networks").

Each layer of a dense block reads the concatenation of all earlier feature
maps of its block and adds `growth_rate` (k) new ones. "B": every layer is a
bottleneck BN-h-conv1x1(bn_size * k)-BN-h-conv3x3(k); "C": transitions
compress the channels by `compression` (theta). With `stem="imagenet"` and the
densenet121 preset the parameter count equals torchvision's densenet121.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from deepnets.layers import maybe_checkpoint


class DenseLayer(nn.Module):
    """BN-h-conv1x1 to bn_size * k channels, BN-h-conv3x3 to k channels (pre-activation, DenseNet-B)."""

    def __init__(
        self,
        in_channels: int,
        growth_rate: int,
        bn_size: int = 4,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.norm1 = norm_layer(in_channels)
        self.act1 = activation_layer()
        self.conv1 = nn.Conv2d(in_channels, bn_size * growth_rate, 1, bias=False)
        self.norm2 = norm_layer(bn_size * growth_rate)
        self.act2 = activation_layer()
        self.conv2 = nn.Conv2d(bn_size * growth_rate, growth_rate, 3, padding=1, bias=False)
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, *features: Tensor) -> Tensor:
        x = torch.cat(features, dim=1)  # (B, C_in + i * k, H, W)
        out = self.conv1(self.act1(self.norm1(x)))  # (B, bn_size * k, H, W)
        out = self.conv2(self.act2(self.norm2(out)))  # (B, k, H, W)
        return self.drop(out)


class DenseBlock(nn.Module):
    """`num_layers` dense layers; output channels: in_channels + num_layers * growth_rate."""

    def __init__(
        self,
        in_channels: int,
        num_layers: int,
        growth_rate: int,
        bn_size: int = 4,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self.layers = nn.ModuleList(
            DenseLayer(in_channels + i * growth_rate, growth_rate, bn_size, norm_layer, activation_layer, dropout)
            for i in range(num_layers)
        )
        self.out_channels = in_channels + num_layers * growth_rate

    def forward(self, x: Tensor) -> Tensor:
        features = [x]
        for layer in self.layers:
            # The concatenation + bottleneck is where a DenseNet's memory goes
            # (Pleiss et al. 2017), so each layer is the unit that is recomputed.
            features.append(maybe_checkpoint(layer, *features, enabled=self.checkpointing))
        return torch.cat(features, dim=1)  # (B, C_in + L * k, H, W)


class Transition(nn.Sequential):
    """BN-h-conv1x1 to `out_channels`, then 2x2 average pooling (halves H and W)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
    ) -> None:
        super().__init__(
            norm_layer(in_channels),
            activation_layer(),
            nn.Conv2d(in_channels, out_channels, 1, bias=False),
            # ceil_mode: a 1x1 map stays 1x1, so tiny inputs (8x8 digits) survive many transitions.
            nn.AvgPool2d(2, stride=2, ceil_mode=True),
        )


class DenseNet(nn.Module):
    """Stem -> dense blocks with transitions between them -> BN-h -> pool -> head.

    Args:
        stage_depths: layers per dense block, e.g. [6, 12, 24, 16] for DenseNet-121.
        num_classes: output size of the head.
        in_channels: image channels.
        growth_rate: k, channels each dense layer adds.
        num_init_features: stem output channels.
        bn_size: bottleneck width factor (bn_size * k channels before the 3x3 conv).
        compression: theta, transition output = floor(theta * input channels).
        stem: "cifar": one 3x3 conv (the paper's CIFAR nets); "imagenet": 7x7/2 conv, BN, h, 3x3/2 max pool.
        bias: bias of the linear head.
    """

    def __init__(
        self,
        stage_depths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        growth_rate: int = 32,
        num_init_features: int = 64,
        bn_size: int = 4,
        compression: float = 0.5,
        stem: Literal["cifar", "imagenet"] = "imagenet",
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        bias: bool = True,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        c = num_init_features
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, c, 7, stride=2, padding=3, bias=False),
                norm_layer(c),
                activation_layer(),
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:  # the first dense layer pre-activates, so a bare conv suffices
            self.stem = nn.Sequential(nn.Conv2d(in_channels, c, 3, padding=1, bias=False))
        layers: list[nn.Module] = []
        for i, num_layers in enumerate(stage_depths):
            block = DenseBlock(
                c, num_layers, growth_rate, bn_size, norm_layer, activation_layer, dropout, checkpointing
            )
            layers.append(block)
            c = block.out_channels
            if i < len(stage_depths) - 1:
                out = max(1, math.floor(compression * c))
                layers.append(Transition(c, out, norm_layer, activation_layer))
                c = out
        self.layers = nn.Sequential(*layers)
        self.norm = norm_layer(c)
        self.act = activation_layer()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(c, num_classes, bias=bias)

        for m in self.modules():  # torchvision's init
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.layers(self.stem(x))  # (B, C, H', W')
        return self.act(self.norm(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(self.pool(x).flatten(1))  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
