"""Stacked sweeps (issue 20): members trained together equal the same points trained alone."""

from __future__ import annotations

import csv
import dataclasses
import json
import os
import signal
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from deepnets.config import Config, load_config
from deepnets.errors import UserError
from deepnets.run import train
from deepnets.stacked import StackedClassifier, check_vectorize, run_key, train_stacked

from .conftest import run_cli

# 300 synthetic samples: 60 test, 48 val, 192 train = 3 x 50 + 42 (an uneven last batch), eval in one batch of 200
BASE = [
    "model.arch=mlp",
    "model.depth=2",
    "model.width=16",
    "data.name=synthetic",
    "data.input_shape=[8]",
    "data.num_classes=3",
    "data.num_samples=300",
    "data.batch_size=50",
    "data.val_fraction=0.2",
    "data.test_fraction=0.2",
    "optim.name=sgd",
    "optim.lr=0.05",
    "trainer.max_epochs=2",
    "trainer.accelerator=cpu",
    "trainer.devices=1",
    "trainer.progress_bar=false",
    "checkpoint.enabled=false",
    "logging.tensorboard=false",
    "logging.grad_norm_every_n_steps=0",
]


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _cfg(tmp_path: Path, seed: int, *overrides: str) -> Config:
    return load_config(None, [*BASE, f"name=m{seed}", f"seed={seed}", f"output_dir={tmp_path / 'runs'}", *overrides])


def test_cpu_dropout_mask_is_bernoulli_of_the_global_generator() -> None:
    """The identity the stacked dropout relies on (torch's CPU F.dropout: x * bernoulli_(1 - p) / (1 - p))."""
    x = torch.randn(7, 13)
    torch.manual_seed(3)
    a = F.dropout(x, 0.3, training=True)
    g = torch.Generator().manual_seed(3)
    assert torch.equal(a, x * torch.empty_like(x).bernoulli_(0.7, generator=g).div_(0.7))


CASES = {
    "sgd_momentum": [[], ["optim.lr=0.1", "optim.weight_decay=1e-3", "optim.momentum=0.5"]],
    "sgd_nesterov_step": [
        ["optim.nesterov=true", "scheduler.name=step", "scheduler.step_size=1"],
        ["optim.momentum=0", "scheduler.name=step", "scheduler.step_size=1"],
    ],
    "adam": [["optim.name=adam", "optim.lr=0.01"], ["optim.name=adam", "optim.lr=0.003", "optim.weight_decay=0.01"]],
    "adamw_bn_dropout": [
        ["optim.name=adamw", "model.batch_norm=true", "model.dropout=0.3", "optim.betas=[0.8, 0.99]"],
        ["optim.name=adamw", "model.batch_norm=true", "optim.weight_decay=0.1"],
    ],
    "widths_cosine_dropout_l1": [
        ["model.width=8", "scheduler.name=cosine", "scheduler.warmup_steps=2"],
        ["model.width=24", "scheduler.name=cosine", "scheduler.warmup_steps=2", "model.dropout=0.2", "optim.l1=1e-4"],
        ["model.width=24", "scheduler.name=cosine", "scheduler.warmup_steps=2", "data.label_noise=0.2"],
    ],
}


@pytest.mark.parametrize("case", list(CASES))
def test_members_equal_their_standalone_runs(tmp_path: Path, case: str) -> None:
    cfgs = [_cfg(tmp_path, i, *o) for i, o in enumerate(CASES[case])]
    assert len({run_key(c) for c in cfgs}) == 1
    alone = [train(c) for c in cfgs]
    stacked = train_stacked(cfgs)
    for a, s in zip(alone, stacked, strict=True):
        assert a.status == s.status == "completed"
        wa, ws = a.model.state_dict(), s.model.state_dict()
        assert wa.keys() == ws.keys()
        for k in wa:
            torch.testing.assert_close(ws[k], wa[k], rtol=1e-5, atol=1e-6, msg=f"{case} {k}")
        assert sorted(s.metrics) == sorted(a.metrics) == [
            "test/acc", "test/loss", "train/acc", "train/loss", "val/acc", "val/loss"
        ]  # fmt: skip
        for k in a.metrics:
            assert s.metrics[k] == pytest.approx(a.metrics[k], rel=1e-5), k
        info = json.loads((s.run_dir / "metrics.json").read_text())
        assert info["status"] == "completed" and info["steps"] == 2 * 4 and info["epochs"] == 2
        assert info["metrics"] == s.metrics
        assert s.run_dir != a.run_dir and (s.run_dir / "config.yaml").is_file()


def test_member_metrics_are_its_model_applied_by_hand(tmp_path: Path) -> None:
    """val/* and test/* of each member from its final weights (the last validation and the test see them), on
    the whole split in plain PyTorch with float64 sums; evaluated in batches of 25, so the last batch is smaller
    (val 48 = 25 + 23, test 60 = 2 x 25 + 10): a mean of batch means would miss."""
    from deepnets.data import InMemoryDataModule

    cfgs = [_cfg(tmp_path, i, f"model.width={w}", "data.eval_batch_size=25") for i, w in enumerate([4, 12, 4])]
    results = train_stacked(cfgs)
    dm = InMemoryDataModule(cfgs[0].data, 0)
    dm.setup("fit")
    splits = {"val": (dm.splits.x_val, dm.splits.y_val), "test": (dm.splits.x_test, dm.splits.y_test)}
    assert (len(splits["val"][1]), len(splits["test"][1])) == (48, 60)
    for r in results:
        for name, (x, y) in splits.items():
            with torch.no_grad():
                logits = r.model.eval()(x)
            losses = F.cross_entropy(logits, y, reduction="none").double()
            assert r.metrics[f"{name}/loss"] == pytest.approx(float(losses.mean()), rel=1e-6), name
            assert r.metrics[f"{name}/acc"] == pytest.approx(float((logits.argmax(1) == y).double().mean()), abs=1e-7)
            batch_means = [float(b.mean()) for b in losses.split(25)]
            assert abs(sum(batch_means) / len(batch_means) - float(losses.mean())) > 1e-4  # the check can fail


def test_member_checkpoint_exports_and_evaluates_to_its_test_metrics(tmp_path: Path) -> None:
    from deepnets.export import evaluate, export_run

    cfgs = [_cfg(tmp_path, i, "checkpoint.enabled=true", "early_stopping.restore_best=false") for i in range(2)]
    results = train_stacked(cfgs)
    for r in results:
        assert (r.run_dir / "checkpoints" / "last.ckpt").is_file()
        got = evaluate(export_run(r.run_dir))  # what `--export RUN_DIR` then `--evaluate EXPORT_DIR` print
        assert got["test/acc"] == pytest.approx(r.metrics["test/acc"], rel=1e-6)
        assert got["test/loss"] == pytest.approx(r.metrics["test/loss"], rel=1e-5)


def test_a_diverging_member_stops_alone(tmp_path: Path) -> None:
    cfgs = [_cfg(tmp_path, 0), _cfg(tmp_path, 1, "optim.lr=1e30", "optim.momentum=0.99")]
    ok, bad = train_stacked(cfgs)
    alone = train(cfgs[0])
    assert ok.status == "completed" and bad.status == "diverged" and "non-finite" in bad.error
    for k, v in alone.model.state_dict().items():
        torch.testing.assert_close(ok.model.state_dict()[k], v, rtol=1e-5, atol=1e-6)
    assert json.loads((bad.run_dir / "metrics.json").read_text())["status"] == "diverged"


@pytest.mark.parametrize(
    ("override", "culprit"),
    [
        ("model.arch=resmlp", "model.arch=resmlp"),
        ("optim.grad_clip_norm=1.0", "optim.grad_clip_norm"),
        ("sweep.workers=2", "sweep.workers=2"),
        ("early_stopping.enabled=true", "early_stopping.enabled"),
        ("scheduler.name=plateau", "scheduler.name=plateau"),
        ("checkpoint.enabled=true", "early_stopping.restore_best"),
        ("trainer.precision=64", "trainer.precision=64"),
        ("optim.name=NAdam", "optim.name=NAdam"),
    ],
)
def test_what_cannot_be_stacked_is_refused_naming_the_key(tmp_path: Path, override: str, culprit: str) -> None:
    with pytest.raises(UserError, match="sweep.vectorize") as e:
        check_vectorize(_cfg(tmp_path, 0, override))
    assert culprit in str(e.value) and "\n" not in str(e.value)


def test_regression_is_refused_naming_the_task(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, 0)
    cfg = dataclasses.replace(cfg, task="regression")
    with pytest.raises(UserError, match="sweep.vectorize: task=regression"):
        check_vectorize(cfg)


def test_cli_refusal_is_one_line_and_writes_nothing(tmp_path: Path) -> None:
    out = tmp_path / "runs"
    proc = run_cli(
        "--config", "mlp", *BASE, f"output_dir={out}", "sweep.params={model.width: [4, 8]}", "sweep.vectorize=true",
        "optim.grad_clip_norm=1.0",
    )  # fmt: skip
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: sweep.vectorize: optim.grad_clip_norm"), proc.stderr
    assert not out.exists()


def _csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


SWEEP = ["sweep.params={model.width: [4, 16]}", "sweep.seeds=[0, 1]", "sweep.metric=test/error"]


def test_vectorized_sweep_writes_the_same_table_and_run_dirs(tmp_path: Path) -> None:
    from deepnets.sweep import sweep

    tables = []
    for vectorize in ("false", "true"):
        cfg = load_config(
            None, [*BASE, "name=sw", f"output_dir={tmp_path / vectorize}", *SWEEP, f"sweep.vectorize={vectorize}"]
        )
        res = sweep(cfg, verbose=False)
        assert res.ok
        rows = _csv(res.sweep_dir / "results.csv")
        for r in rows:
            run_dir = res.sweep_dir / r["run_dir"]
            assert (run_dir / "config.yaml").is_file() and (run_dir / "metrics.json").is_file()
            assert load_config(str(run_dir / "config.yaml")).model.width == int(r["width"])
        assert (res.sweep_dir / "sweep.png").stat().st_size > 1000
        tables.append(rows)
    plain, stacked = tables
    assert [(r["width"], r["seed"], r["status"], r["run_dir"]) for r in plain] == [
        (r["width"], r["seed"], r["status"], r["run_dir"]) for r in stacked
    ]
    for a, b in zip(plain, stacked, strict=True):
        for k in ("test/acc", "test/loss", "train/loss", "val/loss", "params", "steps", "epochs"):
            assert float(b[k]) == pytest.approx(float(a[k]), rel=1e-5), k


def test_interrupted_stacked_sweep_finishes_on_resume(tmp_path: Path, monkeypatch) -> None:
    from deepnets.sweep import resume, sweep

    real = StackedClassifier.on_train_batch_end
    calls = []

    def sigterm_at_step_3(self, outputs, batch, batch_idx) -> None:  # a real SIGTERM, in the first run only
        calls.append(self.trainer.global_step)
        if len(calls) == 3:
            os.kill(os.getpid(), signal.SIGTERM)
        real(self, outputs, batch, batch_idx)

    monkeypatch.setattr(StackedClassifier, "on_train_batch_end", sigterm_at_step_3)
    cfg = load_config(None, [*BASE, "name=sw", f"output_dir={tmp_path}", *SWEEP, "sweep.vectorize=true"])
    first = sweep(cfg, verbose=False)
    assert first.signum == signal.SIGTERM and not first.ok
    assert [r["status"] for r in first.rows] == ["interrupted"] * 4
    for r in first.rows:
        info = json.loads((first.sweep_dir / r["run_dir"] / "metrics.json").read_text())
        assert (info["status"], info["steps"]) == ("interrupted", 3)
    res = resume(first.sweep_dir, verbose=False)
    assert res.ok and [r["status"] for r in res.rows] == ["completed"] * 4
    assert all(int(r["steps"]) == 8 for r in res.rows)


def _scalars(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    ea.Reload()
    scalars = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    return scalars, sorted(ea.Tags()["tensors"] + ea.Tags()["images"])


@pytest.mark.parametrize("l1", [True, False])  # with L1 the members' own tensors are optimized, else the stacked
def test_member_tensorboard_run_is_the_standalone_one(tmp_path: Path, l1: bool) -> None:
    """Every scalar tag (step losses, epoch metrics, lr per param group, the gradient-flow monitor's norms,
    final/...) at the same steps with the same values, the same hparams-plugin summaries and images,
    gradient_flow.png and hparams.yaml."""
    extra = ["logging.tensorboard=true", "trainer.log_every_n_steps=3", "scheduler.name=cosine"]
    extra += ["logging.grad_norm_every_n_steps=2", *(["optim.l1=1e-4"] if l1 else [])]
    cfgs = [_cfg(tmp_path, s, *extra) for s in (0, 1)]
    alone = train(cfgs[0])
    member = train_stacked(cfgs)[0]
    (a, a_tensors), (b, b_tensors) = _scalars(alone.run_dir), _scalars(member.run_dir)
    assert sorted(a) == sorted(b) and a_tensors == b_tensors
    assert {"train/loss_step", "lr-SGD/pg1", "val/acc", "test/loss", "final/status"} <= set(a)
    assert ("train/l1" in a) == l1
    assert {"grad_norm/global", "grad_norm/first_over_last"} <= set(a) and "gradient_flow/figure" in a_tensors
    assert (member.run_dir / "gradient_flow.png").stat().st_size > 1000
    for tag in a:
        assert [s for s, _ in b[tag]] == [s for s, _ in a[tag]], tag
        assert [v for _, v in b[tag]] == pytest.approx([v for _, v in a[tag]], rel=1e-5), tag
    assert (member.run_dir / "hparams.yaml").read_text() == (alone.run_dir / "hparams.yaml").read_text()


@pytest.mark.parametrize("case", ["adam", "widths_cosine_dropout_l1", "adamw_bn_dropout"])
def test_a_member_is_the_same_at_one_and_two_threads_unless_batchnorm(tmp_path: Path, case: str, monkeypatch) -> None:
    """What lets a stacked run take a second thread (stacked_threads): batched matmuls, dropout from each
    member's generator and row-wise cross-entropy give the same bits at 1 and 2 threads. BatchNorm's batch
    statistics do not, so with BatchNorm stacked_threads keeps the members' standalone count."""
    import deepnets.stacked

    runs = []
    for threads in (1, 2):
        monkeypatch.setattr(deepnets.stacked, "stacked_threads", lambda cfgs, n=threads: n)
        cfgs = [_cfg(tmp_path / str(threads), i, *o, "trainer.max_epochs=4") for i, o in enumerate(CASES[case])]
        runs.append(train_stacked(cfgs))
    same = all(
        torch.equal(a.model.state_dict()[k], b.model.state_dict()[k]) and a.metrics == b.metrics
        for a, b in zip(*runs, strict=True)
        for k in a.model.state_dict()
    )
    assert same == ("bn" not in case)


def test_stacked_threads_rule(tmp_path: Path, monkeypatch) -> None:
    import deepnets.run
    from deepnets.stacked import stacked_threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    widths = [4, 8, 16, 24, 32, 40, 48, 64, 96, 128, 256, 512]
    dd = [load_config("double_descent", [f"model.width={w}", f"seed={s}"]) for w in widths for s in range(3)]
    monkeypatch.setattr(deepnets.run, "available_cores", lambda: 2)
    monkeypatch.setattr(deepnets.run, "sample_busy", lambda seconds=0.15: 0.0)  # an idle machine
    assert all(deepnets.run.resolve_threads("auto", c) == 1 for c in dd[::3])  # each net alone: 1
    assert stacked_threads(dd) == 2  # the 36 together: a second thread pays
    monkeypatch.setattr(deepnets.run, "sample_busy", lambda seconds=0.15: 1.0)  # one core taken by another process
    assert stacked_threads(dd) == 1
    assert stacked_threads(dd[:2]) == 1  # two tiny nets: below SMALL_FORWARD_FLOPS, no sampling needed
    monkeypatch.setattr(deepnets.run, "sample_busy", lambda seconds=0.15: 0.0)
    with_bn = [dataclasses.replace(c, model=dataclasses.replace(c.model, batch_norm=True)) for c in dd]
    assert stacked_threads(with_bn) == 1  # BatchNorm: the members' standalone count
    fixed = [dataclasses.replace(c, trainer=dataclasses.replace(c.trainer, threads=3)) for c in dd]
    assert stacked_threads(fixed) == 3
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert stacked_threads(dd) == 1


def test_stacked_sweep_without_validation_prints_no_library_warning(tmp_path: Path) -> None:
    """A user's stacked sweep with no validation split (as the double-descent config): its output is deepnets'
    own lines, no Lightning warning about the validation loop it deliberately leaves out."""
    import subprocess
    import sys

    from .conftest import ROOT

    args = [sys.executable, str(ROOT / "train.py"), "--config", "mlp", *BASE, f"output_dir={tmp_path}", *SWEEP]
    args += ["sweep.vectorize=true", "data.val_fraction=0", "trainer.limit_val_batches=0"]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONWARNINGS"}  # warnings as a user sees them
    proc = subprocess.run(args, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    noise = [line for line in (proc.stdout + proc.stderr).splitlines() if "arning" in line or "warn(" in line]
    assert noise == [], proc.stdout + proc.stderr
    assert "sweep: 4/4 runs ok" in proc.stdout


def test_members_gradients_stay_views_of_the_stacked_gradient_after_zero_grad() -> None:
    """Module.zero_grad() (Lightning's before each validation) drops the members' gradients; the next
    stacked_grads() makes them views of the stacked gradient again, so backward reaches the optimizer."""
    from deepnets.models import build_model
    from deepnets.stacked import ShapeGroup

    torch.manual_seed(0)
    spec = {"arch": "mlp", "depth": 1, "width": 5}
    group = ShapeGroup([build_model(spec, (6,), 3), build_model(spec, (6,), 3)], [0.0, 0.0])
    group.bind()
    group.zero_grad(set_to_none=True)
    assert all(p.grad is None for m in group.members for p in m.parameters())
    grads = group.stacked_grads()
    group(torch.randn(2, 4, 6), None).sum().backward()
    (w, b), _ = group.stacked
    for m, member in enumerate(group.members):
        layer = member.layers[0][0]
        assert layer.weight.grad.data_ptr() == w.grad[m].data_ptr() and torch.equal(layer.weight.grad, w.grad[m])
        assert layer.bias.grad.data_ptr() == b.grad[m].data_ptr() and layer.bias.grad.abs().sum() > 0
    assert grads[0] is w.grad


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_one_fused_call_optimizer_is_torchs_fused_step_bit_for_bit(name: str) -> None:
    """The stacked run's Adam / AdamW (one torch._fused_adam(w)_ call per group, one add for every step
    counter) against torch's own fused step: every parameter and state tensor equal bitwise, through lr
    changes, a step where one gradient is missing (torch's step: that counter stays), and a state loaded back."""
    from deepnets.stacked import Adam, AdamW

    ours, theirs = {"adam": (Adam, torch.optim.Adam), "adamw": (AdamW, torch.optim.AdamW)}[name]
    assert ours.__name__ == theirs.__name__  # the TensorBoard lr tag (lr-Adam) is the class name
    for wd, amsgrad, maximize in [(0.0, False, False), (0.1, True, False), (0.05, False, True)]:
        torch.manual_seed(0)
        shapes = [(7, 5), (5,), (10, 33), (10,), (64, 3)]
        a = [torch.randn(s, requires_grad=True) for s in shapes]
        b = [t.detach().clone().requires_grad_() for t in a]
        kw = {"lr": 0.01, "weight_decay": wd, "amsgrad": amsgrad, "maximize": maximize, "fused": True}
        oa = ours([{"params": a[:3]}, {"params": a[3:], "lr": 0.003}], **kw)
        ob = theirs([{"params": b[:3]}, {"params": b[3:], "lr": 0.003}], **kw)
        fused: list[bool] = []

        def spy(real=oa._step_fused, fused=fused) -> bool:
            fused.append(real())
            return fused[-1]

        oa._step_fused = spy  # type: ignore[method-assign]
        hooks: list[int] = []
        oa.register_step_pre_hook(lambda *_, hooks=hooks: hooks.append(1))
        torch.optim.Adam([torch.zeros(1, requires_grad=True)])  # an instance hooks torch's own step too
        for step in range(12):
            g = [torch.randn(s) for s in shapes]
            for xs in (a, b):
                for t, gg in zip(xs, g, strict=True):
                    t.grad = None if (step == 5 and t is xs[1]) else gg.clone()
            oa.step()
            ob.step()
            for o in (oa, ob):
                o.param_groups[0]["lr"] *= 0.8
            if step == 8:
                oa.load_state_dict(oa.state_dict())  # a new state: torch's step once, then the fused one again
        # torch's step for the first (no state yet), the missing gradient, and the first after loading
        assert [i for i, f in enumerate(fused) if not f] == [0, 5, 9]
        assert len(hooks) == 12  # once a step, torch's steps included
        assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
        sa, sb = oa.state_dict()["state"], ob.state_dict()["state"]
        assert sa.keys() == sb.keys() and float(sa[1]["step"]) == 11 and float(sa[0]["step"]) == 12
        for i in sb:
            assert sa[i].keys() == sb[i].keys() and all(torch.equal(sa[i][k], sb[i][k]) for k in sb[i])
