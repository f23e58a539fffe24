"""Your own model: `model.arch: path/to/file.py:ClassName` / `package.module:ClassName` with `model.kwargs`.

A module written to tmp_path goes through train, resume, export and evaluate from other working
directories; every import failure is one line naming its key; the gradient monitor lists a module's
layers in the order its forward pass uses them (not registration order); and the model zoo is tested
over the ARCHITECTURES table.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

from deepnets.config import load_config, to_yaml
from deepnets.data import InMemoryDataModule
from deepnets.errors import UserError
from deepnets.export import evaluate, export_run, load_exported
from deepnets.imports import resolve_import
from deepnets.memory import check_fits
from deepnets.models import (
    ARCHITECTURES,
    BUILTIN_ARCHS,
    FC_ARCHS,
    build_model,
    depth_ordered_layers,
    record_forward_order,
    sample_batch,
)
from deepnets.monitor import GradientFlowMonitor
from deepnets.run import train
from tests.conftest import ROOT, TINY, run_cli

# Registers its layers in the reverse order of use: registration order would put the head first.
REVNET = '''
import torch
from torch import nn


class RevNet(nn.Module):
    def __init__(self, input_shape, num_outputs, hidden: int = 16, scale: float = 1.0):
        super().__init__()
        self.hidden, self.scale = hidden, scale
        self.head = nn.Linear(hidden, num_outputs)
        self.mid = nn.Linear(hidden, hidden)
        self.inp = nn.Linear(input_shape[0], hidden)

    def forward(self, x):  # (B, D) -> (B, num_outputs)
        h = torch.relu(self.inp(x))
        return self.head(torch.relu(self.mid(h))) * self.scale


class Synonym(nn.Module):
    """Takes num_classes (the synonym) and a keyword-only kwarg."""

    def __init__(self, input_shape, num_classes, *, hidden=8):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(), nn.Linear(input_shape[0], hidden), nn.ReLU(), nn.Linear(hidden, num_classes)
        )

    def forward(self, x):
        return self.net(x)


def not_a_class():
    pass


class NotAModule:
    pass
'''
# TINY without the architecture keys (an own module takes no model.depth / model.width)
BASE = [a for a in TINY if not a.startswith("model.")]


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


@pytest.fixture
def revnet(tmp_path: Path) -> Path:
    return write(tmp_path / "usercode" / "revnet.py", REVNET)


def load(*overrides: str):
    return load_config(None, [*BASE, *overrides])


# ---------------------------------------------------------------- building


def test_kwargs_and_data_sizes_reach_the_constructor(revnet: Path) -> None:
    cfg = load(f"model.arch={revnet}:RevNet", "model.kwargs={hidden: 5, scale: 2}")
    model = build_model(cfg.model, (8,), 3)
    assert (model.hidden, model.scale) == (5, 2)
    assert (model.inp.in_features, model.inp.out_features, model.head.out_features) == (8, 5, 3)
    syn = build_model(load(f"model.arch={revnet}:Synonym", "model.kwargs={hidden: 4}").model, (8,), 7)
    assert syn.net[-1].out_features == 7 and syn.net[1].out_features == 4  # num_classes = num_outputs


def test_relative_paths_resolve_against_the_config_file_then_the_cwd(
    revnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg_file = write(tmp_path / "usercode" / "exp.yaml", "model:\n  arch: revnet.py:RevNet\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    cfg = load_config(str(cfg_file))
    assert cfg.model.arch == f"{revnet}:RevNet"  # recorded absolute: config.yaml reloads from any cwd
    monkeypatch.chdir(tmp_path)
    assert load_config(None, ["model.arch=usercode/revnet.py:RevNet"]).model.arch == f"{revnet}:RevNet"
    with pytest.raises(UserError, match=r"^model.arch: file .*elsewhere/usercode/revnet.py not found$"):
        monkeypatch.chdir(elsewhere)
        load_config(None, ["model.arch=usercode/revnet.py:RevNet"])


def test_module_path_import(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path / "mypkg" / "__init__.py", "")
    write(tmp_path / "mypkg" / "nets.py", REVNET)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load("model.arch=mypkg.nets:RevNet")
    assert cfg.model.arch == "mypkg.nets:RevNet"
    assert build_model(cfg.model, (8,), 3).head.out_features == 3


def _bad(tmp_path: Path, case: str) -> list[str]:
    """Overrides that make the config fail in the way `case` names."""
    f = tmp_path / "bad.py"
    bodies = {
        "raises": "import torch\n\nx = 1\nraise RuntimeError('boom at import')\n",
        "syntax": "def broken(:\n    pass\n",
        "imports": "import no_such_module_xyz\n",
        "exits": "import sys\nsys.exit(3)\n",
    }
    if case in bodies:
        write(f, bodies[case])
        return [f"model.arch={f}:Net"]
    write(f, REVNET)
    return {
        "no-file": [f"model.arch={tmp_path / 'missing.py'}:Net"],
        "no-module": ["model.arch=no_such_pkg_xyz.mod:Net"],
        "no-attr": [f"model.arch={f}:RevNte"],
        "not-class": [f"model.arch={f}:not_a_class"],
        "not-module": [f"model.arch={f}:NotAModule"],
        "unknown-kwarg": [f"model.arch={f}:RevNet", "model.kwargs={hiden: 3}"],
        "unknown-kwarg-listed": [f"model.arch={f}:Synonym", "model.kwargs={hidden: 3, depth: 2}"],
        "kwarg-type": [f"model.arch={f}:RevNet", "model.kwargs={hidden: many}"],
        "data-kwarg": [f"model.arch={f}:RevNet", "model.kwargs={num_outputs: 3}"],
        "builtin-only": [f"model.arch={f}:RevNet", "model.depth=3"],
        "kwargs-on-builtin": ["model.arch=mlp", "model.kwargs={hidden: 3}"],
        "typo": ["model.arch=resnt"],
    }[case]


IMPORT_FAILURES = {
    "no-file": r"model.arch: file .*/missing.py not found",
    "no-module": r"model.arch: no module named 'no_such_pkg_xyz' \(is it installed, or on PYTHONPATH\?\)",
    "no-attr": r"model.arch: .*/bad.py has no attribute 'RevNte'; did you mean RevNet\?",
    "not-class": r"model.arch: .*/bad.py:not_a_class is a function, not a class",
    "not-module": r"model.arch: .*/bad.py:NotAModule is not a subclass of torch.nn.modules.module.Module",
    "raises": r"model.arch: importing .*/bad.py failed: .*/bad.py:4: RuntimeError: boom at import",
    "syntax": r"model.arch: importing .*/bad.py failed: .*/bad.py:1: SyntaxError: .*",
    "imports": r"model.arch: importing .*/bad.py failed: .*/bad.py:1: ModuleNotFoundError: No module named "
    r"'no_such_module_xyz'",
    "exits": r"model.arch: importing .*/bad.py failed: .*/bad.py:2: SystemExit: 3",
    "unknown-kwarg": r"model.kwargs.hiden: RevNet\(\) takes no argument 'hiden'; did you mean hidden\?",
    "unknown-kwarg-listed": r"model.kwargs.depth: Synonym\(\) takes no argument 'depth' \(it takes: input_shape, "
    r"num_classes, hidden\)",
    "kwarg-type": r"model.kwargs.hidden: RevNet\(\) expects int, got 'many'",
    "data-kwarg": r"model.kwargs.num_outputs: deepnets passes num_outputs from the data; remove it from model.kwargs",
    "builtin-only": r"model.depth: applies to the built-in architectures only, not to model.arch=.*/bad.py:RevNet; "
    r"pass your module's settings in model.kwargs",
    "kwargs-on-builtin": r"model.kwargs.hidden: model.kwargs is for a model.arch import path; mlp takes its settings "
    r"as model.<key> \(see the README's config table\)",
    "typo": r"model.arch: expected one of mlp, skipnet, resmlp, densemlp, resnet, densenet, got 'resnt'; did you "
    r"mean resnet\? \(or your own nn.Module: path/to/file.py:ClassName or package.module:ClassName\)",
}


@pytest.mark.parametrize("case", IMPORT_FAILURES)
def test_each_import_failure_is_one_line_naming_the_key(tmp_path: Path, case: str) -> None:
    with pytest.raises(UserError) as e:
        load(*_bad(tmp_path, case))
    message = str(e.value)
    assert "\n" not in message
    assert re.fullmatch(IMPORT_FAILURES[case], message), message


def test_required_kwarg_missing(tmp_path: Path) -> None:
    f = write(tmp_path / "req.py", "from torch import nn\n\nclass Net(nn.Module):\n    def __init__(self, width):\n"
              "        super().__init__()\n")  # fmt: skip
    want = r"^model.kwargs: Net\(\) needs a value for 'width' \(set model.kwargs.width\)$"
    with pytest.raises(UserError, match=want):
        load(f"model.arch={f}:Net")


def test_resolve_import_for_other_keys(revnet: Path) -> None:
    """The shared resolver (optim.name uses it too): any base class, the key in every message."""
    assert resolve_import(f"{revnet}:RevNet", "optim.name", nn.Module).__name__ == "RevNet"
    with pytest.raises(UserError, match=r"^optim.name: .*RevNet is not a subclass of torch.optim.optimizer.Optimizer$"):
        resolve_import(f"{revnet}:RevNet", "optim.name", torch.optim.Optimizer)
    with pytest.raises(UserError, match=r"^optim.name: 'x:' is not an import path"):
        resolve_import("x:", "optim.name")


USER_ERRORS_AT_BUILD = {
    "ctor": (
        "class Net(nn.Module):\n    def __init__(self, num_outputs):\n        super().__init__()\n"
        "        raise ValueError('bad width')\n",
        r"model.arch: Net\(\.\.\.\) raised .*/net.py:7: ValueError: bad width",
    ),
    "forward": (
        "class Net(nn.Module):\n    def __init__(self, num_outputs):\n        super().__init__()\n"
        "        self.lin = nn.Linear(99, num_outputs)\n\n    def forward(self, x):\n        return self.lin(x)\n",
        r"model.arch: Net fails on a sample batch of shape \(2, 8\): .*/net.py:10: RuntimeError: mat1 and mat2 "
        r"shapes cannot be multiplied \(2x8 and 99x3\)",
    ),
    "shape": (
        "class Net(nn.Module):\n    def __init__(self):\n        super().__init__()\n"
        "        self.lin = nn.Linear(8, 5)\n\n    def forward(self, x):\n        return self.lin(x)\n",
        r"model.arch: Net returns shape \(2, 5\) for a batch of shape \(2, 8\); expected \(2, 3\) \(batch, "
        r"num_outputs=3 from the data\): take num_outputs in its constructor",
    ),
}


@pytest.mark.parametrize("case", USER_ERRORS_AT_BUILD)
def test_errors_in_the_users_code_name_its_file_and_line(tmp_path: Path, case: str) -> None:
    body, pattern = USER_ERRORS_AT_BUILD[case]
    f = write(tmp_path / "net.py", "import torch\nfrom torch import nn\n\n" + body)
    cfg = load(f"model.arch={f}:Net", f"output_dir={tmp_path / 'runs'}")
    with pytest.raises(UserError) as e:
        train(cfg)
    assert re.fullmatch(pattern, str(e.value)), str(e.value)
    assert not (tmp_path / "runs").exists()  # nothing written


def test_cli_error_is_one_line_exit_2_no_traceback(tmp_path: Path) -> None:
    f = write(tmp_path / "bad.py", "x = 1\nraise KeyError('k')\n")
    exp = write(tmp_path / "exp.yaml", "model:\n  arch: bad.py:Net\n")  # relative to the config file
    r = run_cli("--config", str(exp), *BASE, f"output_dir={tmp_path / 'runs'}", "--print-config")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == [f"error: model.arch: importing {f} failed: {f}:2: KeyError: 'k'"]
    assert not (tmp_path / "runs").exists()


def test_memory_check_survives_a_module_without_meta_kernels(tmp_path: Path) -> None:
    """check_fits builds on the meta device; a module whose __init__/forward needs real data gets no claim."""
    f = write(
        tmp_path / "data_dependent.py",
        """
        import torch
        from torch import nn

        class Net(nn.Module):
            def __init__(self, input_shape, num_outputs):
                super().__init__()
                self.lin = nn.Linear(input_shape[0], num_outputs)
                self.gain = float(self.lin.weight.abs().max().item()) + 1.0  # no meta value for .item()

            def forward(self, x):
                if x.sum().item() > 1e9:  # data-dependent control flow
                    return self.lin(x) * 0
                return self.lin(x) * self.gain
        """,
    )
    cfg = load(f"model.arch={f}:Net")
    check_fits(cfg)  # returns: no estimate, no crash
    assert build_model(cfg.model, (8,), 3).lin.out_features == 3  # the real build still works


# ---------------------------------------------------------------- the monitor's depth order


def test_forward_order_is_not_registration_order(revnet: Path) -> None:
    model = build_model(load(f"model.arch={revnet}:RevNet").model, (8,), 3)
    registered = [n.removesuffix(".weight") for n, p in model.named_parameters() if p.dim() >= 2]
    assert registered == ["head", "mid", "inp"]
    assert [n for n, _ in depth_ordered_layers(model)] == ["inp", "mid", "head"]


def test_monitor_traces_a_net_given_input_shape(revnet: Path) -> None:
    """A net no forward pass has recorded (built by hand) is traced once by the monitor itself."""
    cls = resolve_import(f"{revnet}:RevNet", "model.arch", nn.Module)
    net = cls((8,), 3)
    assert [n for n, _ in depth_ordered_layers(net)] == ["head", "mid", "inp"]  # registration: no record yet
    mon = GradientFlowMonitor(1, input_shape=(8,))

    class Holder(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.model = net

    mon._resolve(Holder())  # type: ignore[arg-type]
    assert mon.layer_names == ["inp", "mid", "head"]


def test_forward_order_leaves_buffers_and_rng_alone() -> None:
    net = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Dropout(0.5), nn.Linear(6, 2))
    before = {k: v.clone() for k, v in net.state_dict().items()}
    rng = torch.get_rng_state()
    record_forward_order(net, sample_batch((4,)))
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert [n for n, _ in depth_ordered_layers(net)] == ["0", "3"]


# ---------------------------------------------------------------- the zoo, over the ARCHITECTURES table

ZOO_CFG = {
    "mlp": {"depth": 3, "width": 8},
    "skipnet": {"depth": 3, "width": 8},
    "resmlp": {"depth": 2, "width": 8},
    "densemlp": {"growth_rate": 4, "layers_per_block": 2, "num_blocks": 2},
    "resnet": {"stage_depths": [1, 1], "width": 4},
    "densenet": {"stage_depths": [2, 2], "growth_rate": 4},
}


@pytest.mark.parametrize("arch", BUILTIN_ARCHS)
def test_zoo(arch: str) -> None:
    """Every table entry: builds, right output shape, finite, every parameter gets a gradient, and the
    depth order (registration order, for the zoo) is the order a recorded forward pass uses the weights."""
    assert arch in ARCHITECTURES
    shape = (8,) if arch in FC_ARCHS else (3, 8, 8)
    model = build_model({"arch": arch, **ZOO_CFG[arch]}, shape, 5)
    registered = [n for n, _ in depth_ordered_layers(model)]
    x = torch.randn(3, *shape)
    out = model(x)
    assert out.shape == (3, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None]
    assert not missing, missing
    record_forward_order(model, sample_batch(shape))
    assert [n for n, _ in depth_ordered_layers(model)] == registered


def test_zoo_table_is_what_validation_reads() -> None:
    assert set(ZOO_CFG) == set(BUILTIN_ARCHS)  # a new built-in architecture needs its zoo case
    for arch in BUILTIN_ARCHS:
        assert load(f"model.arch={arch}").model.arch == arch


# ---------------------------------------------------------------- a run of one: train, resume, export, evaluate


def test_own_module_through_train_monitor_resume_export_evaluate(
    revnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    exp = write(
        tmp_path / "usercode" / "exp.yaml",
        """
        name: own
        model:
          arch: revnet.py:RevNet
          kwargs: {hidden: 12}
        """,
    )
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    monkeypatch.chdir(a)
    args = [*BASE[1:], f"output_dir={tmp_path / 'runs'}", "trainer.max_epochs=1", "logging.grad_norm_every_n_steps=1"]
    cfg = load_config(str(exp), args)
    grads: list[dict[str, float]] = []

    class Spy(GradientFlowMonitor):  # the run's monitor, plus each layer's gradient norm computed here
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):  # type: ignore[no-untyped-def]
            net = pl_module.model
            grads.append({n: float(getattr(net, n).weight.grad.norm()) for n in ("inp", "mid", "head")})
            super().on_before_optimizer_step(trainer, pl_module, optimizer)

    spy = Spy.from_config(cfg.logging)
    first = train(cfg, callbacks=[spy])
    assert first.status == "completed"
    # the monitor's depth order is the forward pass's (RevNet registers head, mid, inp), its norms exact
    h = spy.history
    assert h.layer_names == ["inp", "mid", "head"]
    assert len(h.steps) == len(grads) > 0
    want = torch.tensor([[g[n] for n in h.layer_names] for g in grads], dtype=torch.float64)
    torch.testing.assert_close(h.grad_norm, want, rtol=1e-5, atol=0)
    run = tmp_path / "runs" / "own" / "version_0"
    assert first.run_dir == run
    saved = (run / "config.yaml").read_text()
    assert f"arch: {revnet}:RevNet" in saved and "hidden: 12" in saved

    # resume in a fresh process, from another cwd, with the run's own config.yaml: the same run directory
    r = run_cli("--config", str(run / "config.yaml"), "--resume", "last", "trainer.max_epochs=2", cwd=b)
    assert r.returncode == 0, r.stderr[-2000:]
    assert sorted(p.name for p in (tmp_path / "runs" / "own").iterdir()) == ["version_0"]
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 2

    monkeypatch.chdir(b)
    out = export_run(run)
    model, _ = load_exported(out)
    assert type(model).__name__ == "RevNet" and model.hidden == 12
    # the exported weights, applied by hand to the test split, give the run's reported test metrics
    dm = InMemoryDataModule(load_config(str(run / "config.yaml")).data, 0)
    dm.setup("test")
    x, y = dm.splits.x_test, dm.splits.y_test
    with torch.no_grad():
        logits = model(x)
    acc = float((logits.argmax(1) == y).float().mean())
    assert acc == pytest.approx(metrics["metrics"]["test/acc"], abs=1e-6)
    assert evaluate(out)["test/acc"] == pytest.approx(acc, abs=1e-6)


def test_run_config_reloads_equal_from_another_cwd(
    revnet: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    cfg = load(f"model.arch={revnet}:RevNet", "model.kwargs={hidden: 3}")
    path = tmp_path / "config.yaml"
    path.write_text(to_yaml(cfg))
    monkeypatch.chdir(tmp_path / "usercode")
    assert load_config(str(path)) == cfg


DDP_SCRIPT = """
import os, sys, torch
sys.path.insert(0, {root!r})
from deepnets.config import load_config
from deepnets.run import train
result = train(load_config(None, {overrides!r}))
torch.save(result.model.state_dict(), os.path.join({out!r}, f"rank{{os.environ.get('LOCAL_RANK', '0')}}.pt"))
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_with_a_users_module(revnet: Path, tmp_path: Path) -> None:
    overrides = [
        *BASE,
        f"model.arch={revnet}:RevNet",
        f"output_dir={tmp_path / 'runs'}",
        "trainer.strategy=ddp",
        "trainer.devices=2",
        "trainer.max_epochs=1",
        "logging.grad_norm_every_n_steps=1",
    ]
    script = tmp_path / "ddp_run.py"
    script.write_text(DDP_SCRIPT.format(root=str(ROOT), overrides=overrides, out=str(tmp_path)))
    r = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    w0, w1 = (torch.load(tmp_path / f"rank{i}.pt", weights_only=True) for i in range(2))
    assert w0.keys() == w1.keys() and all(torch.equal(w0[k], w1[k]) for k in w0)  # gradients all-reduced
    run = tmp_path / "runs" / "tiny" / "version_0"
    assert json.loads((run / "metrics.json").read_text())["status"] == "completed"
    assert (run / "gradient_flow.png").is_file()


def test_figure_title_names_a_users_module() -> None:
    from deepnets.monitor import describe_model

    assert describe_model({"arch": "/x/y/net.py:Net", "kwargs": {"hidden": 3, "scale": 0.5}}) == (
        "Net (net.py) hidden=3 scale=0.5"
    )
    assert describe_model({"arch": "pkg.nets:Net", "kwargs": {}}) == "Net (pkg.nets)"


def test_home_in_an_import_path_is_expanded_once(revnet: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(revnet.parent))
    assert load("model.arch=~/revnet.py:RevNet").model.arch == f"{revnet}:RevNet"
