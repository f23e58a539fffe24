"""Residual MLP: blocks a^{l+2} = h(a^l + W^{l+1} h(W^l a^l)) with identity shortcuts.

He et al. 2016a ("Deep residual learning", eq. 1): the block learns a
residual F(a) = W^{l+1} h(W^l a) on top of the identity, so with W = 0 and
ReLU a block is the identity on non-negative activations, and a deep stack
starts close to a shallow net instead of a product of L random matrices.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor, nn

from deepnets.layers import maybe_checkpoint
from deepnets.models.mlp import MLPLayer


def _norm(norm_layer: Callable[..., nn.Module] | None, width: int) -> nn.Module:
    return norm_layer(width) if norm_layer is not None else nn.Identity()


class ResidualBlock(nn.Module):
    """a -> h(a + W2 N(drop(h(N(W1 a))))), same width in and out, no weights on the shortcut."""

    def __init__(
        self,
        width: int,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.fc1 = nn.Linear(width, width, bias=bias)
        self.norm1 = _norm(norm_layer, width)
        self.act1 = activation_layer()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(width, width, bias=bias)
        self.norm2 = _norm(norm_layer, width)
        self.act2 = activation_layer()

    def zero_init_last(self) -> None:
        """Start as the identity (Goyal et al. 2017): zero the branch's last BN scale, else W^{l+1}."""
        last = self.fc2 if isinstance(self.norm2, nn.Identity) else self.norm2
        nn.init.zeros_(last.weight)

    def forward(self, x: Tensor) -> Tensor:
        identity = x  # (B, W)
        out = self.drop(self.act1(self.norm1(self.fc1(x))))
        out = self.norm2(self.fc2(out))
        return self.act2(out + identity)


class PreActResidualBlock(nn.Module):
    """a -> a + W2 drop(h(N(W1 h(N(a))))): pre-activation block (He et al. 2016b).

    Nothing follows the addition, so the shortcut path from any block to the
    head is a pure identity and the gradient reaches early blocks unchanged.
    """

    def __init__(
        self,
        width: int,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = _norm(norm_layer, width)
        self.act1 = activation_layer()
        self.fc1 = nn.Linear(width, width, bias=bias)
        self.norm2 = _norm(norm_layer, width)
        self.act2 = activation_layer()
        self.drop = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.fc2 = nn.Linear(width, width, bias=bias)

    def zero_init_last(self) -> None:
        # Zeroing norm2's scale would feed h(0) into fc2; with ReLU that kills the
        # branch's gradient for good (ReLU'(0) = 0), so zero the last weight instead.
        nn.init.zeros_(self.fc2.weight)

    def forward(self, x: Tensor) -> Tensor:
        out = self.fc1(self.act1(self.norm1(x)))  # (B, W)
        out = self.fc2(self.drop(self.act2(self.norm2(out))))
        return x + out


class ResMLP(nn.Module):
    """Stem (input -> width), `depth` residual blocks of constant width, linear head.

    Args:
        in_features: input size after flattening.
        width: width of the stem and every block.
        depth: number of residual blocks (2 linear layers each).
        num_classes: output size of the head.
        preact: pre-activation blocks; the stem is then a bare linear map and a
            final norm + activation precede the head (He et al. 2016b).
    """

    def __init__(
        self,
        in_features: int,
        width: int,
        depth: int,
        num_classes: int,
        activation_layer: Callable[..., nn.Module] = nn.ReLU,
        norm_layer: Callable[..., nn.Module] | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        preact: bool = False,
        checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.checkpointing = checkpointing
        if preact:
            self.stem: nn.Module = nn.Sequential(nn.Linear(in_features, width, bias=bias))
        else:
            self.stem = MLPLayer(in_features, width, activation_layer, norm_layer, 0.0, bias)
        block = PreActResidualBlock if preact else ResidualBlock
        self.layers = nn.Sequential(*(block(width, activation_layer, norm_layer, dropout, bias) for _ in range(depth)))
        self.norm = _norm(norm_layer, width) if preact else nn.Identity()
        self.act = activation_layer() if preact else nn.Identity()
        self.head = nn.Linear(width, num_classes, bias=bias)

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.stem(x.flatten(1))  # (B, W)
        for block in self.layers:
            x = maybe_checkpoint(block, x, enabled=self.checkpointing)
        return self.act(self.norm(x))

    def forward_head(self, x: Tensor) -> Tensor:
        return self.head(x)  # (B, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
