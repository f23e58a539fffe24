"""GradientFlowMonitor: exact norms, zero cost off the logging steps, TensorBoard output, warnings, resume."""

from __future__ import annotations

import dataclasses
import json
import math
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils.data import DataLoader, TensorDataset

from deepnets.config import LoggingConfig
from deepnets.errors import UserError
from deepnets.models import build_model, depth_ordered_layers
from deepnets.monitor import RATIO_TAGS, GradientFlowMonitor, GradientFlowWarning, _scalar_summary

D, C = 16, 10


@pytest.fixture(autouse=True)
def _one_thread() -> Iterator[None]:
    """These nets are tiny: one thread is fastest, and immune to a busy machine's contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


class Tiny(L.LightningModule):
    """The smallest LightningModule with a `.model`, fed by a fixed random dataset."""

    def __init__(self, net: nn.Module, lr: float = 0.05, fail_at: int | None = None) -> None:
        super().__init__()
        self.model = net
        self.lr = lr
        self.fail_at = fail_at
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(256, D, generator=g)
        self.y = torch.randint(0, C, (256,), generator=g)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        if self.fail_at is not None and self.global_step == self.fail_at:
            raise KeyboardInterrupt  # what Ctrl+C looks like to Lightning
        x, y = batch
        return F.cross_entropy(self.model(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=0.9)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(TensorDataset(self.x, self.y), batch_size=32, shuffle=False)


def mlp(depth: int = 4, activation: str = "relu", arch: str = "mlp", **kw: object) -> nn.Module:
    torch.manual_seed(0)
    return build_model({"arch": arch, "depth": depth, "width": 32, "activation": activation, **kw}, (D,), C)


def cfg(**kw: object) -> LoggingConfig:
    """The monitor with everything on (weight norms and update ratios are off by default)."""
    return dataclasses.replace(LoggingConfig(), **{"weight_norms": True, **kw})


def fit(
    module: L.LightningModule,
    monitor: GradientFlowMonitor,
    tmp_path: Path,
    steps: int,
    callbacks: list[L.Callback] = (),  # type: ignore[assignment]
    logger: bool = True,
    **kw: object,
) -> L.Trainer:
    trainer = L.Trainer(
        max_steps=steps,
        logger=TensorBoardLogger(tmp_path, name="tb") if logger else False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[*callbacks, monitor],
        **kw,
    )
    trainer.fit(module)
    return trainer


class Reference(L.Callback):
    """Per-layer gradient norms computed independently (float64 sum of squares) at every step."""

    def __init__(self) -> None:
        self.norms: dict[int, list[float]] = {}
        self.weights: dict[int, list[torch.Tensor]] = {}
        self.global_norms: dict[int, float] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        layers = depth_ordered_layers(pl_module.model)
        self.norms[trainer.global_step] = [p.grad.double().pow(2).sum().sqrt().item() for _, p in layers]
        grads = [p.grad.double().flatten() for p in pl_module.model.parameters() if p.grad is not None]
        self.global_norms[trainer.global_step] = torch.cat(grads).norm().item()
        self.weights[trainer.global_step] = [p.detach().double().clone() for _, p in layers]


def test_logged_norms_equal_independent_computation(tmp_path: Path) -> None:
    ref = Reference()
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=3), None)
    module = Tiny(mlp(depth=5, batch_norm=True))
    fit(module, mon, tmp_path, steps=10, callbacks=[ref], logger=False)
    h = mon.history
    assert h.steps == [0, 3, 6, 9]
    assert h.layer_names == [n for n, _ in depth_ordered_layers(module.model)]
    assert h.grad_norm.shape == (4, 6)
    for row, step in enumerate(h.steps):
        expected = torch.tensor(ref.norms[step], dtype=torch.float64)
        torch.testing.assert_close(h.grad_norm[row], expected, rtol=1e-6, atol=0)
        # weight norm before the step, and the update it made (weights of the next step)
        before = ref.weights[step]
        wn = torch.stack([w.norm() for w in before])
        torch.testing.assert_close(h.weight_norm[row], wn, rtol=1e-5, atol=0)
        if step + 1 in ref.weights:
            upd = torch.stack([(a - b).norm() for a, b in zip(ref.weights[step + 1], before, strict=True)])
            torch.testing.assert_close(h.update_ratio[row], upd / wn, rtol=1e-4, atol=1e-9)
    # the global norm covers every parameter (biases, BatchNorm), so it exceeds the layers' norm
    assert (h.global_grad_norm >= h.grad_norm.norm(dim=1) - 1e-6).all()
    expected = torch.tensor([ref.global_norms[s] for s in h.steps], dtype=torch.float64)
    torch.testing.assert_close(h.global_grad_norm, expected, rtol=1e-6, atol=0)


class _OpCounter(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops.append(str(func))
        return func(*args, **(kwargs or {}))


class _CountingMonitor(GradientFlowMonitor):
    """Records every tensor op the monitor's per-step hooks dispatch, by step."""

    def __init__(self, *a: object, **kw: object) -> None:
        super().__init__(*a, **kw)  # type: ignore[arg-type]
        self.ops_by_step: dict[int, int] = {}

    def _count(self, step: int, fn, *args) -> None:  # type: ignore[no-untyped-def]
        with _OpCounter() as counter:
            fn(*args)
        self.ops_by_step[step] = self.ops_by_step.get(step, 0) + len(counter.ops)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:  # type: ignore[no-untyped-def]
        self._count(trainer.global_step, super().on_before_optimizer_step, trainer, pl_module, optimizer)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
        step = trainer.global_step - 1  # the step this batch just took
        self._count(step, super().on_train_batch_end, trainer, pl_module, outputs, batch, batch_idx)


def test_nothing_computed_on_non_logging_steps(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[int] = []
    real = torch._foreach_norm
    trainer_ref: list[L.Trainer] = []

    def counting(*a, **kw):  # type: ignore[no-untyped-def]
        calls.append(trainer_ref[0].global_step)
        return real(*a, **kw)

    monkeypatch.setattr(torch, "_foreach_norm", counting)
    mon = _CountingMonitor.from_config(cfg(grad_norm_every_n_steps=4), None)
    trainer = L.Trainer(
        max_steps=10,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        callbacks=[mon],
    )
    trainer_ref.append(trainer)
    trainer.fit(Tiny(mlp()))
    assert mon.history.steps == [0, 4, 8]
    # per log event: one batched call for grad + weight norms (before the step, global_step = s)
    # and one for the update norms (after it, global_step = s + 1)
    assert calls == [0, 1, 4, 5, 8, 9]
    for step, n_ops in mon.ops_by_step.items():
        if step % 4:
            assert n_ops == 0, f"step {step}: {n_ops} tensor ops on a non-logging step"
        else:
            assert n_ops > 0


def test_one_host_transfer_per_log_event(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    transfers: list[int] = []
    real = torch.Tensor.tolist

    def counting(self):  # type: ignore[no-untyped-def]
        transfers.append(1)
        return real(self)

    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=2), None)
    module = Tiny(mlp())
    monkeypatch.setattr(torch.Tensor, "tolist", counting)
    fit(module, mon, tmp_path, steps=6, logger=False)
    monkeypatch.undo()
    assert len(mon.history.steps) == 3
    assert len(transfers) == 3


def _events(tmp_path: Path):  # type: ignore[no-untyped-def]
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    (log_dir,) = {p.parent for p in tmp_path.rglob("events.out.tfevents.*")}
    acc = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def test_png_tags_and_heatmaps(tmp_path: Path) -> None:
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=2, heatmap_every_n_logs=2), tmp_path / "run")
    mon.heatmap_min_interval_s = 0.0  # at every epoch end with 2 new log events, however close in time
    module = Tiny(mlp(depth=11))  # 12 layers: index 10 and 11 must sort after 09
    fit(module, mon, tmp_path, steps=20)  # 8 steps per epoch: epochs end after steps 7, 15 and 19
    assert (tmp_path / "run" / "gradient_flow.png").stat().st_size > 10_000
    acc = _events(tmp_path)
    names = [n for n, _ in depth_ordered_layers(module.model)]
    grad_tags = [t for t in acc.Tags()["scalars"] if re.match(r"^grad_norm/\d+_", t)]
    assert sorted(grad_tags) == [f"grad_norm/{i:02d}_{n}" for i, n in enumerate(names)]
    assert set(RATIO_TAGS) <= set(acc.Tags()["scalars"])
    assert [e.step for e in acc.Scalars("grad_norm/00_layers.0.0")] == list(range(0, 20, 2))
    assert acc.Scalars("grad_norm/11_head")[0].value == pytest.approx(mon.history.grad_norm[0, -1].item())
    assert any(t.startswith("update_ratio/00_") for t in acc.Tags()["scalars"])
    assert {"gradient_flow/heatmap", "gradient_flow/figure"} <= set(acc.Tags()["images"])
    # at epoch ends (the last logged step then), never in the step hooks; the end's is the last epoch's
    assert [e.step for e in acc.Images("gradient_flow/heatmap")] == [6, 14, 18]
    assert [e.step for e in acc.Images("gradient_flow/figure")] == [18]
    assert "custom_scalars__config__" not in acc.Tags()["tensors"]  # the layout is deepnets.hparams' job


def test_first_over_last_scalars_are_the_ratio_of_the_layer_norms(tmp_path: Path) -> None:
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=1), None)
    fit(Tiny(mlp(depth=6, activation="sigmoid")), mon, tmp_path, steps=4)
    acc = _events(tmp_path)
    g = mon.history.grad_norm
    ratio = [e.value for e in acc.Scalars("grad_norm/first_over_last")]
    log_ratio = [e.value for e in acc.Scalars("grad_norm/log10_first_over_last")]
    np.testing.assert_allclose(ratio, (g[:, 0] / g[:, -1]).numpy(), rtol=1e-6)  # float32 on disk
    np.testing.assert_allclose(log_ratio, np.log10((g[:, 0] / g[:, -1]).numpy()), rtol=1e-6)
    assert max(ratio) < 0.1  # a 6-layer sigmoid net: the first layer's gradient is far below the head's


def test_heatmap_in_a_run_shorter_than_heatmap_every_n_logs(tmp_path: Path) -> None:
    """A short run (fewer log events than heatmap_every_n_logs) still gets its heatmap, at the end."""
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=1), tmp_path / "run")
    assert mon.heatmap_min_interval_s == 30.0 and mon.heatmap_every_n_logs == 20
    fit(Tiny(mlp(depth=3)), mon, tmp_path, steps=12)
    assert [e.step for e in _events(tmp_path).Images("gradient_flow/heatmap")] == [11]


def test_heatmap_images_are_at_least_thirty_seconds_apart(tmp_path: Path) -> None:
    """Logging every step would otherwise draw a labelled heatmap every heatmap_every_n_logs steps.

    The first periodic one comes 30 s into training: a run of a second or two gets only the end's."""
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=1, heatmap_every_n_logs=2), tmp_path / "run")
    fit(Tiny(mlp(depth=3)), mon, tmp_path, steps=12)
    assert [e.step for e in _events(tmp_path).Images("gradient_flow/heatmap")] == [11]


def test_live_heatmap_equals_a_fresh_drawing() -> None:
    """The blitted TensorBoard heatmap shows the same image as one drawn from scratch."""
    from deepnets.monitor import _LiveHeatmap

    names = ["a", "b", "c"]
    g = np.array([[0.0, 1e-3, 1.0], [1e-9, 1e-2, 2.0], [1e-8, math.nan, 3.0]])
    live = _LiveHeatmap(names, (-12.0, 1.0), "t")
    live.update([0, 5], g[:2])  # an earlier, shorter history first: nothing of it may remain
    live.update([0, 5, 10], g)
    np.testing.assert_array_equal(live.im.get_array().mask, ~np.isfinite(np.log10(g.T)) | (g.T == 0))
    np.testing.assert_allclose(live.im.get_array().compressed(), np.log10(g.T[(g.T > 0) & np.isfinite(g.T)]))
    assert live.im.get_extent() == [-2.5, 12.5, 2.5, -0.5]
    assert [len(c.get_paths()) for c in live.cells] == [1, 1]  # one zero cell, one non-finite cell
    assert live.im.get_clim() == (-12.0, 1.0)


def _dead_head_net() -> nn.Module:
    """Zero head weights: at step 0 every hidden layer's gradient is exactly 0 (the head's is not)."""
    net = mlp(depth=3)
    with torch.no_grad():
        net.head.weight.zero_()
    return net


def _texts(fig: Any) -> list[Any]:
    from matplotlib.text import Text

    return [t for t in fig.findobj(Text) if t.get_text().strip() and t.get_visible()]


@pytest.mark.parametrize("heatmap_range", [[-12.0, 1.0], None])
def test_figure_marks_exact_zeros_and_uses_the_configured_colour_range(
    tmp_path: Path, heatmap_range: list[float] | None
) -> None:
    from matplotlib.collections import PatchCollection

    from deepnets.monitor import render

    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=1, heatmap_range=heatmap_range), None, title="t")
    fit(Tiny(_dead_head_net()), mon, tmp_path, steps=4, logger=False)
    g = mon.history.grad_norm.numpy()  # (4, 4)
    assert (g[0, :-1] == 0).all() and g[0, -1] > 0 and (g[1:] > 0).all()
    fig = mon.figure()
    render(fig)
    heat, depth = fig.axes[0], fig.axes[1]
    z = np.log10(g[g > 0])
    clim = heat.images[0].get_clim()
    assert clim == ((-12.0, 1.0) if heatmap_range else (z.min(), z.max()))
    (hatched,) = [c for c in heat.collections if isinstance(c, PatchCollection)]
    assert hatched.get_hatch() == "////"
    # one rectangle per run of zero cells in a row: the three hidden layers at step 0
    assert len(hatched.get_paths()) == 3
    (legend_text,) = [t.get_text() for t in heat.get_legend().get_texts()]
    assert legend_text == "exactly 0 (3 cells)"
    # the depth line starts at the first step without zeros (step 1), the other is the last step
    labels = [line.get_label() for line in depth.get_lines()]
    assert labels == ["step 1 (first non-zero)", "step 3"]
    np.testing.assert_allclose(depth.get_lines()[0].get_ydata(), g[1])


def test_figure_text_reads_at_tensorboards_image_width(tmp_path: Path) -> None:
    """TensorBoard shows an image TB_CARD_PX wide: every text must be >= 12 px (9 pt) there."""
    from deepnets.monitor import TB_CARD_PX, render

    module = Tiny(mlp(depth=30, arch="mlp"))
    module.hparams.update({"name": "deep", "model": {"arch": "mlp", "depth": 30, "width": 32, "activation": "tanh"}})
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=1), tmp_path / "deep" / "version_3")
    fit(module, mon, tmp_path, steps=3, logger=False)
    fig = mon.figure()
    render(fig)
    assert fig._suptitle.get_text() == "deep/version_3\nmlp 30x32 tanh"
    scale = TB_CARD_PX / (fig.get_figwidth() * 72)  # px per point at TensorBoard's width
    sizes = {t.get_text(): t.get_fontsize() * scale for t in _texts(fig)}
    assert min(sizes.values()) >= 12, {k: v for k, v in sizes.items() if v < 12}
    # nothing drawn outside the figure (clipped labels): the bounding box of all that is drawn, in inches
    drawn = fig.get_tightbbox(fig.canvas.get_renderer())
    assert drawn.x0 >= -0.01 and drawn.x1 <= fig.get_figwidth() + 0.01, drawn
    assert drawn.y0 >= -0.01 and drawn.y1 <= fig.get_figheight() + 0.01, drawn


def test_without_tensorboard_history_and_png_remain(tmp_path: Path) -> None:
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=1, weight_norms=False), tmp_path)
    fit(Tiny(mlp()), mon, tmp_path, steps=3, logger=False)
    assert mon.history.steps == [0, 1, 2]
    assert mon.history.weight_norm.shape == (0, 5)
    assert (tmp_path / "gradient_flow.png").is_file()


def test_off_does_nothing(tmp_path: Path) -> None:
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=0), tmp_path)
    fit(Tiny(mlp()), mon, tmp_path, steps=3, logger=False)
    assert mon.history.steps == []
    assert not (tmp_path / "gradient_flow.png").exists()


def test_png_written_when_interrupted(tmp_path: Path) -> None:
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=1), tmp_path)
    with pytest.raises(SystemExit):  # Lightning turns KeyboardInterrupt into exit(1) after on_exception
        fit(Tiny(mlp(), fail_at=4), mon, tmp_path, steps=10)
    assert mon.history.steps == [0, 1, 2, 3]
    assert (tmp_path / "gradient_flow.png").is_file()


def _warnings_of(module: L.LightningModule, tmp_path: Path, **kw: object) -> list[str]:
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=2, **kw), None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fit(module, mon, tmp_path, steps=6, logger=False)
    return [str(w.message) for w in caught if issubclass(w.category, GradientFlowWarning)]


def test_vanishing_warning_fires_once_on_deep_sigmoid_mlp(tmp_path: Path) -> None:
    msgs = _warnings_of(Tiny(mlp(depth=20, activation="sigmoid")), tmp_path)
    assert len(msgs) == 1, msgs  # once per run, although every log event is below the threshold
    assert msgs[0].startswith("vanishing gradients at step 0")
    assert "'layers.0.0'" in msgs[0] and "'head'" in msgs[0]


def test_no_vanishing_warning_on_resmlp(tmp_path: Path) -> None:
    try:
        net = mlp(depth=20, arch="resmlp")
    except UserError as e:
        pytest.skip(f"resmlp not built yet: {e}")
    assert _warnings_of(Tiny(net), tmp_path) == []


def test_exploding_and_nonfinite_warnings_name_layers(tmp_path: Path) -> None:
    msgs = _warnings_of(Tiny(mlp(depth=3)), tmp_path, exploding_norm=1e-9)
    assert len(msgs) == 1 and msgs[0].startswith("exploding gradients at step 0")
    assert "layers.0.0" in msgs[0] and "head" in msgs[0]

    net = mlp(depth=3)
    with torch.no_grad():
        net.layers[1][0].weight.fill_(float("nan"))
    msgs = _warnings_of(Tiny(net), tmp_path)
    nonfinite = [m for m in msgs if m.startswith("non-finite")]
    assert len(nonfinite) == 1 and "layers.0.0 (nan)" in nonfinite[0]


def test_state_dict_round_trip(tmp_path: Path) -> None:
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=2, vanishing_ratio=1.0), None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fit(Tiny(mlp()), mon, tmp_path, steps=6, logger=False)
    torch.save({"cb": mon.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["cb"]
    other = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=2), None)
    other.load_state_dict(state)
    a, b = mon.history, other.history
    assert a.steps == b.steps == [0, 2, 4]
    assert a.layer_names == b.layer_names
    for field in ("grad_norm", "global_grad_norm", "weight_norm", "update_ratio"):
        assert torch.equal(getattr(a, field), getattr(b, field))
    assert other._warned == mon._warned == {"vanishing"}


def test_history_and_warnings_survive_checkpoint_resume(tmp_path: Path) -> None:
    c = cfg(grad_norm_every_n_steps=2, vanishing_ratio=1.0)  # the warning fires at step 0
    kw = {
        "logger": False,
        "enable_checkpointing": False,
        "enable_progress_bar": False,
        "enable_model_summary": False,
        "accelerator": "cpu",
    }
    first = GradientFlowMonitor.from_config(c, None)
    trainer = L.Trainer(max_steps=4, callbacks=[first], **kw)
    with pytest.warns(GradientFlowWarning, match="vanishing"):
        trainer.fit(Tiny(mlp()))
    trainer.save_checkpoint(tmp_path / "a.ckpt")

    second = GradientFlowMonitor.from_config(c, tmp_path)
    trainer = L.Trainer(max_steps=8, callbacks=[second], **kw)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(Tiny(mlp()), ckpt_path=tmp_path / "a.ckpt")
    assert not [w for w in caught if issubclass(w.category, GradientFlowWarning)]  # warned already
    assert second.history.steps == [0, 2, 4, 6]
    assert torch.equal(second.history.grad_norm[:2], first.history.grad_norm)


def test_vanishing_experiment_quick(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from deepnets.experiments.vanishing import main

    archs = "mlp sigmoid,mlp sigmoid + bn,resmlp"
    assert main(["--quick", "--out", str(tmp_path), "--archs", archs, "--steps", "12", "--depth", "8"]) == 0
    out = capsys.readouterr().out
    (run_dir,) = (tmp_path / "vanishing").glob("version_*")
    assert (run_dir / "grad_norm_vs_depth.png").is_file()
    for name in ("mlp_sigmoid", "mlp_sigmoid_bn", "resmlp_relu"):  # ordinary run directories
        assert (run_dir / name / "version_0" / "gradient_flow.png").is_file()
        assert (run_dir / name / "version_0" / "metrics.json").is_file()
    table = (run_dir / "ratios.md").read_text()
    assert table in out
    header = [c.strip() for c in table.splitlines()[0].split("|")[1:-1]]
    rows = {
        cells[0]: dict(zip(header, cells, strict=True))
        for line in table.splitlines()[2:]
        for cells in [[c.strip() for c in line.split("|")[1:-1]]]
    }
    assert list(rows) == ["mlp sigmoid", "mlp sigmoid + bn", "resmlp relu"]
    assert rows["mlp sigmoid"]["vanishing warning"] == "yes" and rows["resmlp relu"]["vanishing warning"] == "no"
    # BatchNorm keeps the sigmoid net's gradient from vanishing
    assert float(rows["mlp sigmoid + bn"]["first/last @ step 0"]) > 1e3 * float(
        rows["mlp sigmoid"]["first/last @ step 0"]
    )
    # sigmoid outputs are never exactly 0; ReLU's are, often
    assert float(rows["mlp sigmoid"]["zero activations (test)"]) == 0.0
    assert float(rows["resmlp relu"]["zero activations (test)"]) > 0.1
    recorded = json.loads((run_dir / "resmlp_relu" / "version_0" / "metrics.json").read_text())
    assert float(rows["resmlp relu"]["test/acc"]) == pytest.approx(recorded["metrics"]["test/acc"], abs=5e-4)


def test_zero_activation_fraction_equals_a_hand_count() -> None:
    """The model applied by hand, layer by layer, with a batch size that leaves a smaller last batch."""
    from deepnets.experiments.vanishing import zero_activation_fraction

    net = mlp(depth=3, batch_norm=True).eval()
    torch.manual_seed(1)
    with torch.no_grad():  # non-trivial running statistics
        for m in net.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    x = torch.randn(103, D)
    zeros = total = 0
    h = x
    with torch.no_grad():
        for block in net.layers:  # Linear -> BatchNorm -> ReLU per hidden layer
            for layer in block:
                h = layer(h)
                if isinstance(layer, nn.ReLU):
                    zeros += int((h == 0).sum())
                    total += h.numel()
    assert total == 103 * 32 * 3
    assert zero_activation_fraction(net.train(), x, batch_size=25) == zeros / total
    assert net.training  # left as it was


def test_dense_events_reach_tensorboard_in_bursts_sparse_ones_at_once(monkeypatch) -> None:
    """Each event handed to TensorBoard's writer thread alone costs ~0.12 ms of thread handoff."""
    import deepnets.monitor as monitor_module

    written: list[int] = []

    class FileWriter:
        def add_summary(self, summary: Any, step: int, walltime: float) -> None:
            written.append(step)

    class Writer:
        def _get_file_writer(self) -> FileWriter:
            return FileWriter()

        def add_image(self, *args: Any, **kwargs: Any) -> None:
            pass

        def flush(self) -> None:
            pass

    clock = [0.0]
    monkeypatch.setattr(monitor_module.time, "monotonic", lambda: clock[0])
    mon = GradientFlowMonitor.from_config(cfg(grad_norm_every_n_steps=1))
    mon.layer_names, mon._writer = ["a", "b"], Writer()

    def event(step: int, dt: float) -> None:
        clock[0] += dt
        mon._steps.append(step)
        mon._grad.append([1.0, 2.0])
        mon._global.append(3.0)
        mon._log_scalars(step)

    event(0, 5.0)
    assert written == [0]  # the first event, and any after a quiet second, at once
    for step in range(1, 10):
        event(step, 0.01)  # dense: 100 per second
    assert written == list(range(9))  # steps 1-8 as one burst of 8; step 9 waits
    event(10, 2.0)
    assert written == [*range(10), 10]
    event(11, 0.01)
    mon._end(type("T", (), {"is_global_zero": True})())  # the end of training writes what waits
    assert written == [*range(10), 10, 11]


def test_packed_scalar_summary_equals_protobufs_own() -> None:
    """The monitor packs its Summary bytes itself; they must parse to what protobuf would build."""
    from tensorboard.compat.proto.summary_pb2 import Summary

    def built(values: list[float]) -> Summary:
        return Summary(value=[Summary.Value(tag=t, simple_value=v) for t, v in zip(tags, values, strict=True)])

    tags = ("grad_norm/00_a", "grad_norm/01_" + "block." * 30 + "weight", "grad_norm/02_ü", "grad_norm/global")
    assert len(tags[1].encode()) > 127  # a two-byte length prefix
    assert (
        _scalar_summary(tags, [0.5, 1e-30, 3e38, 2.0]).SerializeToString()
        == built([0.5, 1e-30, 3e38, 2.0]).SerializeToString()
    )
    for values in ([math.nan, math.inf, -math.inf, 0.0], [1e40, 1.0, 2.0, 3.0]):  # 1e40: beyond float32, inf
        got = _scalar_summary(tags, values)
        assert [v.tag for v in got.value] == list(tags)
        np.testing.assert_array_equal(
            [v.simple_value for v in got.value], [v.simple_value for v in built(values).value]
        )
