"""The model zoo: every arch and preset builds, trains, and honours every `model:` toggle."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
import torchvision
from torch import Tensor, nn

from deepnets.config import ModelConfig
from deepnets.errors import UserError
from deepnets.models import PRESETS, apply_preset, build_model, depth_ordered_layers
from deepnets.models.densemlp import DenseMLPBlock
from deepnets.models.densenet import DenseBlock, DenseLayer, Transition
from deepnets.models.mlp import MLPLayer
from deepnets.models.resmlp import PreActResidualBlock, ResidualBlock
from deepnets.models.resnet import BasicBlock, Bottleneck, PreActBasicBlock, PreActBottleneck, conv1x1
from deepnets.models.skipnet import SkipNet

DIGITS = (1, 8, 8)
CIFAR = (3, 32, 32)

# Tiny instances: the whole file must run in seconds on 2 cores.
CASES: dict[str, dict[str, Any]] = {
    "mlp": {"arch": "mlp", "depth": 3, "width": 8},
    "mlp_widths_bn": {"arch": "mlp", "depth": 2, "width": [12, 6], "batch_norm": True, "dropout": 0.1},
    "skipnet_input": {"arch": "skipnet", "depth": 3, "width": 8},
    "skipnet_all": {"arch": "skipnet", "depth": 3, "width": 8, "skip_from": "all", "batch_norm": True},
    "resmlp": {"arch": "resmlp", "depth": 2, "width": 8},
    "resmlp_bn_dropout": {"arch": "resmlp", "depth": 2, "width": 8, "batch_norm": True, "dropout": 0.2},
    "resmlp_preact": {"arch": "resmlp", "depth": 2, "width": 8, "preact": True, "batch_norm": True},
    "densemlp": {"arch": "densemlp", "width": 8, "growth_rate": 6, "layers_per_block": 2, "num_blocks": 3},
    "resnet_basic": {"arch": "resnet", "width": 4, "stage_depths": [1, 2]},
    "resnet_bottleneck_imagenet": {
        "arch": "resnet",
        "block": "bottleneck",
        "width": 4,
        "stage_depths": [1, 1],
        "stem": "imagenet",
    },
    "resnet_preact_basic": {"arch": "resnet", "width": 4, "stage_depths": [2, 1], "preact": True},
    "resnet_preact_bottleneck": {
        "arch": "resnet",
        "block": "bottleneck",
        "width": 4,
        "stage_depths": [1, 1],
        "preact": True,
        "dropout": 0.1,
    },
    "densenet": {"arch": "densenet", "growth_rate": 4, "stage_depths": [2, 2], "bn_size": 2},
    "densenet_imagenet": {
        "arch": "densenet",
        "growth_rate": 4,
        "stage_depths": [1, 1, 1],
        "stem": "imagenet",
        "compression": 0.7,
    },
}
# Every preset, its channels shrunk 8x so it runs in milliseconds.
PRESET_CASES = {f"preset_{name}": {"preset": name, "width_multiplier": 0.125} for name in PRESETS}
FC_CASES = [k for k, v in CASES.items() if v.get("arch") in ("mlp", "skipnet", "resmlp", "densemlp")]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on a busy 2-core box
    # the thread pool's spinning makes each op ~10x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def n_modules(model: nn.Module, kind: type | tuple[type, ...]) -> int:
    return sum(isinstance(m, kind) for m in model.modules())


def grads(model: nn.Module) -> list[Tensor]:
    return [p.grad.clone() for p in model.parameters()]


# ---------------------------------------------------------------- every arch and preset


@pytest.mark.parametrize("case", [*CASES, *PRESET_CASES])
def test_forward_backward(case: str) -> None:
    torch.manual_seed(0)
    model = build_model(CASES.get(case) or PRESET_CASES[case], DIGITS, 10)
    x = torch.randn(16, *DIGITS)
    out = model(x)
    assert out.shape == (16, 10)
    assert torch.isfinite(out).all()
    nn.functional.cross_entropy(out, torch.arange(16) % 10).backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} got an all-zero gradient"
    model.eval()
    with torch.no_grad():
        assert torch.equal(model.forward_head(model.forward_features(x)), model(x))


@pytest.mark.parametrize("case", [*CASES, "preset_resnet50"])
def test_depth_order_is_forward_order(case: str) -> None:
    """`depth_ordered_layers` lists weights in the order the forward pass uses them, ending with `head`."""
    model = build_model(CASES.get(case) or PRESET_CASES[case], DIGITS, 10)
    names = {m: n for n, m in model.named_modules()}
    ran: list[str] = []
    for m in model.modules():
        if getattr(m, "weight", None) is not None and m.weight.dim() >= 2:
            m.register_forward_pre_hook(lambda mod, _: ran.append(names[mod]))
    model(torch.randn(2, *DIGITS))
    listed = [n for n, _ in depth_ordered_layers(model)]
    assert listed == ran
    assert listed[-1] == "head"


@pytest.mark.parametrize("case", ["mlp", "skipnet_all", "resmlp_bn_dropout", "densemlp", "resnet_basic", "densenet"])
def test_cifar_shaped_input(case: str) -> None:
    model = build_model(CASES[case], CIFAR, 7)
    assert model(torch.randn(2, *CIFAR)).shape == (2, 7)


@pytest.mark.parametrize(
    ("preset", "torchvision_model"),
    [
        ("resnet18", torchvision.models.resnet18),
        ("resnet34", torchvision.models.resnet34),
        ("resnet50", torchvision.models.resnet50),
        ("densenet121", torchvision.models.densenet121),
    ],
)
def test_parameter_count_matches_torchvision(preset: str, torchvision_model: Any) -> None:
    with torch.device("meta"):  # shapes only: no memory, no init cost
        ours = build_model({"preset": preset, "stem": "imagenet"}, (3, 224, 224), 1000)
        theirs = torchvision_model()
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in theirs.parameters())
    assert sorted(p.shape for p in ours.parameters()) == sorted(p.shape for p in theirs.parameters())


def test_cifar_presets_have_6n_plus_2_layers() -> None:
    # He et al. 2016a, Sec. 4.2: 6n + 2 weighted layers (projection shortcuts not counted).
    for name, n in (("resnet20", 3), ("resnet56", 9)):
        model = build_model({"preset": name}, CIFAR, 10)
        layers = [k for k, _ in depth_ordered_layers(model) if "downsample" not in k]
        assert len(layers) == 6 * n + 2
        assert model.stem[0].out_channels == 16
        assert model.head.in_features == 64


# ---------------------------------------------------------------- presets


def test_preset_sets_defaults_and_explicit_keys_win() -> None:
    cfg = apply_preset(ModelConfig(preset="resnet50"))
    assert (cfg.arch, cfg.block, cfg.stage_depths, cfg.width) == ("resnet", "bottleneck", [3, 4, 6, 3], 64)
    cfg = apply_preset(ModelConfig(preset="resnet50", stage_depths=[1, 1], width=8))
    assert (cfg.block, cfg.stage_depths, cfg.width) == ("bottleneck", [1, 1], 8)
    model = build_model({"preset": "resnet18", "stage_depths": [1, 1], "width": 4}, DIGITS, 10)
    assert len(model.layers) == 2
    assert model.head.in_features == 8
    assert n_modules(model, nn.MaxPool2d) == 0  # presets leave the stem alone (default: cifar)


def test_preset_of_another_arch_is_rejected() -> None:
    with pytest.raises(UserError, match=r"model\.preset"):
        build_model({"arch": "densenet", "preset": "resnet18"}, DIGITS, 10)


# ---------------------------------------------------------------- toggles


@pytest.mark.parametrize("case", FC_CASES)
def test_batch_norm_toggle(case: str) -> None:
    on = build_model({**CASES[case], "batch_norm": True}, DIGITS, 10)
    off = build_model({**CASES[case], "batch_norm": False}, DIGITS, 10)
    assert n_modules(on, nn.BatchNorm1d) > 0
    assert n_modules(off, nn.modules.batchnorm._BatchNorm) == 0


@pytest.mark.parametrize("case", CASES)
def test_dropout_toggle(case: str) -> None:
    on = build_model({**CASES[case], "dropout": 0.3}, DIGITS, 10)
    off = build_model({**CASES[case], "dropout": 0.0}, DIGITS, 10)
    rates = {m.p for m in on.modules() if isinstance(m, nn.Dropout)}
    assert rates == {0.3}
    assert n_modules(off, nn.Dropout) == 0


@pytest.mark.parametrize("case", CASES)
def test_bias_toggle(case: str) -> None:
    model = build_model({**CASES[case], "bias": False}, DIGITS, 10)
    assert model.head.bias is None
    assert all(m.bias is None for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    with_bias = build_model({**CASES[case], "bias": True}, DIGITS, 10)
    assert with_bias.head.bias is not None


@pytest.mark.parametrize("case", ["mlp", "skipnet_input", "resmlp_preact", "densemlp", "resnet_basic", "densenet"])
def test_activation_toggle(case: str) -> None:
    model = build_model({**CASES[case], "activation": "tanh"}, DIGITS, 10)
    assert n_modules(model, nn.Tanh) > 0
    assert n_modules(model, nn.ReLU) == 0


def _weights(model: nn.Module) -> list[Tensor]:
    return [m.weight.detach() for m in model.modules() if isinstance(m, nn.Linear | nn.Conv2d)]


@pytest.mark.parametrize("case", ["mlp", "resmlp", "resnet_basic", "densenet"])
def test_init_statistics(case: str) -> None:
    torch.manual_seed(0)
    wide = {**CASES[case], "width": 64} if "width" in CASES[case] else CASES[case]
    normal = build_model({**wide, "init": "normal", "init_std": 0.02}, DIGITS, 10)
    w = torch.cat([w.flatten() for w in _weights(normal)])
    assert w.std().item() == pytest.approx(0.02, rel=0.1)
    assert all(m.bias is None or not m.bias.any() for m in normal.modules() if isinstance(m, nn.Linear | nn.Conv2d))

    kaiming = build_model({**wide, "init": "kaiming", "init_gain": 2.0}, DIGITS, 10)
    for w in _weights(kaiming):
        fan_in = w[0].numel()
        if w.numel() >= 1000:  # enough samples for a 15% tolerance
            assert w.std().item() == pytest.approx(2.0 * math.sqrt(2 / fan_in), rel=0.15)

    ortho = build_model({**wide, "init": "orthogonal"}, DIGITS, 10)
    for w in _weights(ortho):
        m = w.flatten(1)
        small = m @ m.T if m.shape[0] <= m.shape[1] else m.T @ m
        torch.testing.assert_close(small, 2.0 * torch.eye(len(small)), atol=1e-4, rtol=0)  # ReLU gain^2 = 2

    xavier = build_model({**wide, "init": "xavier", "activation": "tanh"}, DIGITS, 10)
    w = _weights(xavier)[-1]  # the head: fan_in = width, fan_out = 10
    assert w.std().item() == pytest.approx(5 / 3 * math.sqrt(2 / (w.shape[0] + w.shape[1])), rel=0.25)

    # Norm layers are never touched by `init`.
    for m in normal.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            assert (m.weight == 1).all() and (m.bias == 0).all()


def test_default_init_is_the_archs_own() -> None:
    torch.manual_seed(0)
    model = build_model({"arch": "resnet", "width": 32, "stage_depths": [1]}, DIGITS, 10)
    conv = model.layers[0][0].conv1.weight  # torchvision's kaiming_normal_(fan_out, relu)
    assert conv.std().item() == pytest.approx(math.sqrt(2 / (32 * 9)), rel=0.1)


@pytest.mark.parametrize(
    ("case", "last"),
    [
        ("resmlp", "fc2"),
        ("resmlp_bn_dropout", "norm2"),
        ("resmlp_preact", "fc2"),
        ("resnet_basic", "bn2"),
        ("resnet_bottleneck_imagenet", "bn3"),
        ("resnet_preact_basic", "conv2"),
        ("resnet_preact_bottleneck", "conv3"),
    ],
)
def test_zero_init_residual(case: str, last: str) -> None:
    for init in ("default", "kaiming"):  # survives `model.init`, which runs first
        model = build_model({**CASES[case], "zero_init_residual": True, "init": init}, DIGITS, 10)
        blocks = [m for m in model.modules() if hasattr(m, "zero_init_last")]
        assert blocks
        assert all(not getattr(b, last).weight.any() for b in blocks)
    plain = build_model(CASES[case], DIGITS, 10)
    assert all(getattr(b, last).weight.any() for b in plain.modules() if hasattr(b, "zero_init_last"))


def test_structural_toggles() -> None:
    imagenet = build_model({"arch": "resnet", "width": 4, "stem": "imagenet"}, DIGITS, 10)
    cifar = build_model({"arch": "resnet", "width": 4, "stem": "cifar"}, DIGITS, 10)
    assert imagenet.stem[0].kernel_size == (7, 7) and n_modules(imagenet, nn.MaxPool2d) == 1
    assert cifar.stem[0].kernel_size == (3, 3) and n_modules(cifar, nn.MaxPool2d) == 0
    assert n_modules(build_model(CASES["resnet_basic"], DIGITS, 10), Bottleneck) == 0
    assert n_modules(build_model({**CASES["resnet_basic"], "block": "bottleneck"}, DIGITS, 10), Bottleneck) == 3
    assert n_modules(build_model({**CASES["resnet_basic"], "preact": True}, DIGITS, 10), PreActBasicBlock) == 3

    wide = build_model({**CASES["resnet_basic"], "width_multiplier": 2.0}, DIGITS, 10)
    assert wide.stem[0].out_channels == 8 and wide.head.in_features == 16
    dense = build_model({**CASES["densenet"], "width_multiplier": 2.0}, DIGITS, 10)
    assert dense.stem[0].out_channels == 16  # 2 * growth_rate, scaled
    assert dense.layers[0].layers[0].conv2.out_channels == 8

    skip_in = build_model(CASES["skipnet_input"], DIGITS, 10)
    skip_all = build_model(CASES["skipnet_all"], DIGITS, 10)
    assert skip_in.head.in_features == 8 + 64  # last layer + input
    assert skip_all.head.in_features == 64 + 3 * 8  # input + every layer

    dm = build_model({**CASES["densemlp"], "compression": 1.0}, DIGITS, 10)
    assert dm.head.in_features == 8 + 3 * 2 * 6  # no compression: features only grow
    dn = build_model({"arch": "densenet", "growth_rate": 4, "stage_depths": [2, 2], "bn_size": 3}, DIGITS, 10)
    assert dn.layers[0].layers[0].conv1.out_channels == 12  # bn_size * k
    assert dn.layers[1][2].out_channels == math.floor(0.5 * (8 + 2 * 4))  # compression
    assert build_model({**CASES["densenet"], "num_init_features": 5}, DIGITS, 10).stem[0].out_channels == 5


# ---------------------------------------------------------------- resmlp is exactly the paper's block


def test_resmlp_block_equation() -> None:
    torch.manual_seed(0)
    block = ResidualBlock(6, nn.ReLU, bias=False)
    x = torch.randn(5, 6)
    w1, w2 = block.fc1.weight, block.fc2.weight
    expected = torch.relu(x + torch.relu(x @ w1.T) @ w2.T)  # a^{l+2} = h(a^l + W^{l+1} h(W^l a^l))
    torch.testing.assert_close(block(x), expected)
    pre = PreActResidualBlock(6, nn.ReLU, bias=False)
    torch.testing.assert_close(pre(x), x + torch.relu(torch.relu(x) @ pre.fc1.weight.T) @ pre.fc2.weight.T)


@pytest.mark.parametrize("batch_norm", [False, True])
def test_resmlp_zero_weights_give_identity(batch_norm: bool) -> None:
    model = build_model({"arch": "resmlp", "depth": 3, "width": 6, "batch_norm": batch_norm}, DIGITS, 10)
    a = torch.rand(5, 6)  # non-negative, as after a ReLU
    for block in model.layers:
        for layer in (block.fc1, block.fc2):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        torch.testing.assert_close(block(a), a)
    torch.testing.assert_close(model.layers(a), a)


# ---------------------------------------------------------------- gradcheck every block type


def _gradcheck(module: nn.Module, *inputs: Tensor) -> None:
    module = module.double()
    inputs = tuple(x.double().requires_grad_() for x in inputs)
    # fast_mode checks random projections of the Jacobian: same float64 check, a fraction of the passes.
    assert torch.autograd.gradcheck(module, inputs, eps=1e-6, atol=1e-5, fast_mode=True)


BLOCKS: dict[str, tuple[Any, tuple[int, ...]]] = {
    # SiLU: smooth, so finite differences never straddle a ReLU kink.
    "mlp_layer": (lambda: MLPLayer(5, 4, nn.SiLU, nn.BatchNorm1d), (4, 5)),
    "skipnet": (lambda: SkipNet(5, [3, 3], 2, nn.SiLU, skip_from="all"), (3, 5)),
    "residual": (lambda: ResidualBlock(4, nn.SiLU, nn.BatchNorm1d), (4, 4)),
    "preact_residual": (lambda: PreActResidualBlock(4, nn.SiLU, nn.BatchNorm1d), (4, 4)),
    "dense_mlp_block": (lambda: DenseMLPBlock(3, 2, 2, nn.SiLU), (3, 3)),
    "basic": (
        lambda: BasicBlock(2, 3, 2, nn.Sequential(conv1x1(2, 3, 2), nn.BatchNorm2d(3)), activation_layer=nn.SiLU),
        (2, 2, 4, 4),
    ),
    "bottleneck": (lambda: Bottleneck(4, 1, 1, activation_layer=nn.SiLU), (2, 4, 3, 3)),
    "preact_basic": (lambda: PreActBasicBlock(2, 2, activation_layer=nn.SiLU), (2, 2, 3, 3)),
    "preact_bottleneck": (lambda: PreActBottleneck(2, 1, 2, conv1x1(2, 4, 2), activation_layer=nn.SiLU), (2, 2, 4, 4)),
    "dense_layer": (lambda: DenseLayer(3, 2, 2, activation_layer=nn.SiLU), (2, 3, 3, 3)),
    "dense_block": (lambda: DenseBlock(2, 2, 2, 1, activation_layer=nn.SiLU), (2, 2, 3, 3)),
    "transition": (lambda: Transition(3, 2, activation_layer=nn.SiLU), (2, 3, 4, 4)),
}


@pytest.mark.parametrize("name", BLOCKS)
def test_gradcheck(name: str) -> None:
    torch.manual_seed(0)
    make, shape = BLOCKS[name]
    _gradcheck(make(), torch.randn(shape))


# ---------------------------------------------------------------- checkpointing


@pytest.mark.parametrize(
    "case", ["mlp_widths_bn", "skipnet_all", "resmlp_bn_dropout", "densemlp", "resnet_preact_bottleneck", "densenet"]
)
def test_checkpointing_gives_the_same_gradients(case: str) -> None:
    torch.manual_seed(0)
    plain = build_model({**CASES[case], "dropout": 0.3}, DIGITS, 10)
    ckpt = build_model({**CASES[case], "dropout": 0.3, "checkpointing": True}, DIGITS, 10)
    ckpt.load_state_dict(plain.state_dict())
    x, y = torch.randn(6, *DIGITS), torch.randint(0, 10, (6,))

    calls = []
    first_in_blocks = next(m for m in ckpt.layers.modules() if isinstance(m, nn.Linear | nn.Conv2d))
    first_in_blocks.register_forward_hook(lambda *_: calls.append(1))
    for model in (plain, ckpt):
        torch.manual_seed(1)  # same dropout masks: checkpoint replays the RNG state
        nn.functional.cross_entropy(model(x), y).backward()
    for (name, a), b in zip(plain.named_parameters(), ckpt.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    # BN running stats are counted once, not once more in the recomputation.
    for (name, a), b in zip(plain.named_buffers(), ckpt.buffers(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    assert len(calls) == 2  # forward + recomputation in backward

    ckpt.eval()
    with torch.no_grad():
        torch.testing.assert_close(ckpt(x), plain.eval()(x))


# ---------------------------------------------------------------- bad configs


@pytest.mark.parametrize(
    ("cfg", "shape", "key"),
    [
        ({"arch": "resnet"}, (64,), "model.arch"),
        ({"arch": "densenet"}, (8, 8), "model.arch"),
        ({"arch": "vgg"}, DIGITS, "model.arch"),
        ({"arch": "mlp", "depth": 3, "width": [8, 8]}, DIGITS, "model.width"),
        ({"arch": "resmlp", "width": [8, 8], "depth": 2}, DIGITS, "model.width"),
        ({"arch": "densenet", "width": 16}, DIGITS, "model.width"),
        ({"arch": "resnet", "stage_depths": []}, DIGITS, "model.stage_depths"),
        ({"arch": "resnet", "stage_depths": [2, 0]}, DIGITS, "model.stage_depths"),
        ({"arch": "resnet", "block": "wide"}, DIGITS, "model.block"),
        ({"preset": "resnet101"}, DIGITS, "model.preset"),
        ({"activation": "swish"}, DIGITS, "model.activation"),
        ({"depth": 0}, DIGITS, "model.depth"),
        ({"dropout": 1.0}, DIGITS, "model.dropout"),
        ({"widht": 8}, DIGITS, "model.widht"),
    ],
)
def test_bad_config_names_the_key(cfg: dict[str, Any], shape: tuple[int, ...], key: str) -> None:
    with pytest.raises(UserError, match=key.replace(".", r"\.")):
        build_model(cfg, shape, 10)
