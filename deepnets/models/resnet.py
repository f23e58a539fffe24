"""ResNet (He et al. 2016a) and pre-activation ResNet (He et al. 2016b) for image inputs.

Follows torchvision's `models/resnet.py`: blocks carry `expansion`,
`_make_stage` builds a stage, projection shortcuts (1x1 conv + BN, the
paper's option B) wherever the shape changes, stride on the 3x3 conv of a
Bottleneck ("ResNet v1.5"). With `stem="imagenet"` the presets match
torchvision's parameter counts exactly. Blocks register (and run) the
shortcut projection after the branch, so registration order is execution
order and `depth_ordered_layers` lists layers input -> output.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Literal

from torch import Tensor, nn

from deepnets.layers import maybe_checkpoint


def conv3x3(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    # No bias: a BatchNorm follows and its shift would cancel it.
    return nn.Conv2d(in_channels, out_channels, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_channels: int, out_channels: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False)


def _dropout(p: float) -> nn.Module:
    # Between the convs of a block, as in Wide ResNets (Zagoruyko & Komodakis 2016).
    return nn.Dropout(p) if p > 0 else nn.Identity()


class BasicBlock(nn.Module):
    """Two 3x3 convs: out = h(x + BN(conv(h(BN(conv(x))))))."""

    expansion: int = 1
    preact: bool = False

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn1 = norm_layer(planes)
        self.act1 = activation_layer()
        self.drop = _dropout(dropout)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = norm_layer(planes)
        self.downsample = downsample
        self.act2 = activation_layer()

    def zero_init_last(self) -> None:
        # Goyal et al. 2017: every block starts as the identity, so the deep net starts shallow.
        nn.init.zeros_(self.bn2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.drop(self.act1(self.bn1(self.conv1(x))))  # (B, P, H', W')
        out = self.bn2(self.conv2(out))
        identity = x if self.downsample is None else self.downsample(x)
        return self.act2(out + identity)


class Bottleneck(nn.Module):
    """1x1 reduce -> 3x3 -> 1x1 expand to `planes * expansion`, for deeper nets at the same cost."""

    expansion: int = 4
    preact: bool = False

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn1 = norm_layer(planes)
        self.act1 = activation_layer()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(planes)
        self.act2 = activation_layer()
        self.drop = _dropout(dropout)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.bn3 = norm_layer(planes * self.expansion)
        self.downsample = downsample
        self.act3 = activation_layer()

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.bn3.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.act1(self.bn1(self.conv1(x)))  # (B, P, H, W)
        out = self.drop(self.act2(self.bn2(self.conv2(out))))  # (B, P, H', W')
        out = self.bn3(self.conv3(out))  # (B, 4P, H', W')
        identity = x if self.downsample is None else self.downsample(x)
        return self.act3(out + identity)


class PreActBasicBlock(nn.Module):
    """out = x + conv(h(BN(conv(h(BN(x)))))): nothing after the addition (He et al. 2016b)."""

    expansion: int = 1
    preact: bool = True

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_channels)
        self.act1 = activation_layer()
        self.conv1 = conv3x3(in_channels, planes, stride)
        self.bn2 = norm_layer(planes)
        self.act2 = activation_layer()
        self.drop = _dropout(dropout)
        self.conv2 = conv3x3(planes, planes)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        # Not bn2: h(0) into conv2 would leave the branch with no gradient under ReLU.
        nn.init.zeros_(self.conv2.weight)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv1(pre)  # (B, P, H', W')
        out = self.conv2(self.drop(self.act2(self.bn2(out))))
        # The projection reads the pre-activated input, as in the paper's code.
        identity = x if self.downsample is None else self.downsample(pre)
        return out + identity


class PreActBottleneck(nn.Module):
    """Pre-activation bottleneck: BN-h-conv1x1, BN-h-conv3x3, BN-h-conv1x1, plus the shortcut."""

    expansion: int = 4
    preact: bool = True

    def __init__(
        self,
        in_channels: int,
        planes: int,
        stride: int = 1,
        downsample: nn.Module | None = None,
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        self.bn1 = norm_layer(in_channels)
        self.act1 = activation_layer()
        self.conv1 = conv1x1(in_channels, planes)
        self.bn2 = norm_layer(planes)
        self.act2 = activation_layer()
        self.conv2 = conv3x3(planes, planes, stride)
        self.bn3 = norm_layer(planes)
        self.act3 = activation_layer()
        self.drop = _dropout(dropout)
        self.conv3 = conv1x1(planes, planes * self.expansion)
        self.downsample = downsample

    def zero_init_last(self) -> None:
        nn.init.zeros_(self.conv3.weight)

    def forward(self, x: Tensor) -> Tensor:
        pre = self.act1(self.bn1(x))
        out = self.conv1(pre)  # (B, P, H, W)
        out = self.conv2(self.act2(self.bn2(out)))  # (B, P, H', W')
        out = self.conv3(self.drop(self.act3(self.bn3(out))))  # (B, 4P, H', W')
        identity = x if self.downsample is None else self.downsample(pre)
        return out + identity


Block = type[BasicBlock] | type[Bottleneck] | type[PreActBasicBlock] | type[PreActBottleneck]
BLOCKS: dict[tuple[str, bool], Block] = {
    ("basic", False): BasicBlock,
    ("bottleneck", False): Bottleneck,
    ("basic", True): PreActBasicBlock,
    ("bottleneck", True): PreActBottleneck,
}


class ResNet(nn.Module):
    """Stem -> stages of residual blocks (channels double, resolution halves) -> pool -> head.

    Args:
        block: block class (`BLOCKS[(name, preact)]`).
        stage_depths: blocks per stage, e.g. [2, 2, 2, 2] for ResNet-18.
        num_classes: output size of the head.
        in_channels: image channels.
        width: planes of the first stage (stage i has width * 2**i); also the stem's channels.
        stem: "cifar": 3x3 conv, stride 1; "imagenet": 7x7 conv, stride 2, then 3x3 max pool.
        bias: bias of the linear head (convs never have one: BN follows).
        checkpointing: recompute each block's activations in the backward pass.
    """

    def __init__(
        self,
        block: Block,
        stage_depths: Sequence[int],
        num_classes: int,
        in_channels: int = 3,
        width: int = 64,
        stem: Literal["cifar", "imagenet"] = "imagenet",
        norm_layer: Callable[..., nn.Module] = nn.BatchNorm2d,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        dropout: float = 0.0,
        bias: bool = True,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        self._norm_layer = norm_layer
        # Pre-activation nets leave the stem linear: the first block normalises and activates.
        post: list[nn.Module] = [] if block.preact else [norm_layer(width), activation_layer()]
        if stem == "imagenet":
            self.stem = nn.Sequential(
                nn.Conv2d(in_channels, width, 7, stride=2, padding=3, bias=False),
                *post,
                nn.MaxPool2d(3, stride=2, padding=1),
            )
        else:  # small images: keep the resolution (He et al. 2016a, Sec. 4.2)
            self.stem = nn.Sequential(conv3x3(in_channels, width), *post)
        self.in_channels = width
        self.layers = nn.Sequential(
            *(
                self._make_stage(block, width * 2**i, depth, 1 if i == 0 else 2, activation_layer, dropout)
                for i, depth in enumerate(stage_depths)
            )
        )
        final = self.in_channels
        self.norm = norm_layer(final) if block.preact else nn.Identity()
        self.act = activation_layer() if block.preact else nn.Identity()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(final, num_classes, bias=bias)

        for m in self.modules():  # torchvision's init: He et al. 2015, fan_out
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d | nn.GroupNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def _make_stage(
        self,
        block: Block,
        planes: int,
        depth: int,
        stride: int,
        activation_layer: Callable[..., nn.Module],
        dropout: float,
    ) -> nn.Sequential:
        downsample = None
        out_channels = planes * block.expansion
        if stride != 1 or self.in_channels != out_channels:
            proj = conv1x1(self.in_channels, out_channels, stride)
            # Pre-activation shortcuts read an already normalised input: no BN of their own.
            downsample = proj if block.preact else nn.Sequential(proj, self._norm_layer(out_channels))
        blocks = [block(self.in_channels, planes, stride, downsample, self._norm_layer, activation_layer, dropout)]
        self.in_channels = out_channels
        blocks += [
            block(out_channels, planes, 1, None, self._norm_layer, activation_layer, dropout) for _ in range(1, depth)
        ]
        return nn.Sequential(*blocks)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x)  # (B, width, H, W), H = W/4 with the imagenet stem
        for stage in self.layers:
            for block in stage:
                x = maybe_checkpoint(block, x, enabled=self.checkpointing)  # (B, C_i, H_i, W_i)
        return self.act(self.norm(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(self.pool(x).flatten(1))  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
