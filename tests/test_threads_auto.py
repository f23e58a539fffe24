"""`trainer.threads: auto`: the decision from cores, load and model size, each input simulated; no timing."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepnets import run
from deepnets.config import load_config
from deepnets.run import SMALL_FORWARD_FLOPS, auto_threads, busy_cores, forward_flops, resolve_threads

ROOT = Path(__file__).resolve().parent.parent
BIG, SMALL = 10 * SMALL_FORWARD_FLOPS, SMALL_FORWARD_FLOPS / 10


@pytest.mark.parametrize(
    ("cores", "busy", "flops", "default", "expected"),
    [
        (2, 0.0, BIG, 2, 2),  # idle 2-core box, a conv net: both cores
        (2, 0.15, BIG, 2, 2),  # a little background load still leaves the core free
        (2, 0.3, BIG, 2, 1),  # more than FREE_MARGIN of the other core taken: one thread
        (2, 1.0, BIG, 2, 1),  # one competing CPU-bound process
        (2, 2.0, BIG, 2, 1),  # both cores taken: still one
        (2, 0.0, SMALL, 2, 1),  # a small model gains nothing from a second thread, idle or not
        (2, 0.0, None, 2, 2),  # FLOPs unknown (an op without a meta kernel): the load decides
        (1, 0.0, BIG, 1, 1),
        (16, 3.5, BIG, 16, 12),  # one thread per free core
        (16, 0.0, BIG, 8, 8),  # capped by torch's default (one per physical core)
        (4, 0.0, BIG, 16, 4),  # capped by the usable cores (affinity, cgroup quota)
        (2, None, BIG, 2, 1),  # no /proc/stat: the old rule, 1 on <= 2 cores
        (8, None, BIG, 8, 8),  # ... and the cap elsewhere
    ],
)
def test_auto_decision(cores: int, busy: float | None, flops: float | None, default: int, expected: int) -> None:
    assert auto_threads(cores, busy, flops, default) == expected


def _stat(*cpus: tuple[int, int, int, int, int, int, int, int]) -> str:
    lines = ["cpu  " + " ".join(str(sum(c[i] for c in cpus)) for i in range(8)) + " 0 0"]
    lines += [f"cpu{k} " + " ".join(map(str, c)) + " 0 0" for k, c in enumerate(cpus)]
    return "\n".join([*lines, "intr 1 2 3", "ctxt 99", "btime 1"]) + "\n"


def test_busy_cores_from_proc_stat() -> None:
    # user nice system idle iowait irq softirq steal
    before = _stat((100, 0, 10, 500, 5, 0, 0, 0), (50, 0, 5, 900, 0, 0, 0, 0), (0, 0, 0, 100, 0, 0, 0, 0))
    # cpu0: 15 ticks, all busy (user, system, steal); cpu1: 15 ticks, idle or iowait; cpu2: 10 ticks user
    after = _stat((110, 0, 13, 500, 5, 0, 0, 2), (50, 0, 5, 910, 5, 0, 0, 0), (10, 0, 0, 100, 0, 0, 0, 0))
    assert busy_cores(before, after, {0, 1}) == pytest.approx(1.0)
    assert busy_cores(before, after, {1}) == pytest.approx(0.0)  # iowait is free time
    assert busy_cores(before, after, {0, 1, 2}) == pytest.approx(3 * 25 / 40)
    assert busy_cores(before, before, {0, 1}) is None  # no tick passed: unknown, not idle


def test_sample_busy_reads_this_machine() -> None:
    busy = run.sample_busy(0.05)
    if not Path("/proc/stat").is_file():
        assert busy is None
        return
    assert busy is not None and 0.0 <= busy <= len(os.sched_getaffinity(0)) + 1e-9


def test_forward_flops_of_an_mlp_by_hand() -> None:
    # depth hidden Linear layers of width w, no bias-free tricks: FlopCounterMode counts 2*in*out per sample
    # and layer (the addmm); activations and BatchNorm are not matmuls and count nothing.
    for depth in (3, 20):  # 20: counted at depths 1..3 and extrapolated
        cfg = load_config(
            None,
            [
                "model.arch=mlp",
                f"model.depth={depth}",
                "model.width=32",
                "data.name=synthetic",
                "data.input_shape=[8]",
                "data.num_classes=3",
                "data.batch_size=16",
            ],
        )
        by_hand = 2 * 16 * (8 * 32 + (depth - 1) * 32 * 32 + 32 * 3)
        assert forward_flops(cfg) == by_hand


def test_shipped_digits_configs_split_into_small_mlps_and_big_conv_nets() -> None:
    """What bench/threads.py measured: the digits MLPs gain nothing from 2 threads, the conv nets do."""
    flops = {
        n: forward_flops(load_config(str(ROOT / "configs" / f"{n}.yaml")))
        for n in ("mlp", "skipnet", "resmlp", "densemlp", "deep_sigmoid", "resnet", "densenet")
    }
    assert all(f is not None for f in flops.values()), flops
    small = {n for n, f in flops.items() if f < SMALL_FORWARD_FLOPS}
    assert small == {"mlp", "skipnet", "resmlp", "densemlp", "deep_sigmoid"}, flops


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A 2-core machine, no OMP_NUM_THREADS; returns the list of sampled loads handed out (set [0] first)."""
    loads: list[float] = []
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(run, "available_cores", lambda: 2)
    monkeypatch.setattr(run, "_TORCH_THREADS", 2)
    monkeypatch.setattr(run, "sample_busy", lambda seconds=run.LOAD_SAMPLE_S: loads.pop(0))
    return loads


def test_resolve_auto_follows_the_load_for_a_conv_net(two_cores: list[float]) -> None:
    cfg = load_config(str(ROOT / "configs" / "resnet.yaml"))
    two_cores += [0.05, 1.0]
    assert resolve_threads("auto", cfg) == 2  # idle
    assert resolve_threads("auto", cfg) == 1  # one competing process
    assert resolve_threads(3, cfg) == 3 and not two_cores  # a fixed count is used as it is, nothing sampled


def test_resolve_auto_takes_one_thread_for_a_small_model_without_sampling(two_cores: list[float]) -> None:
    cfg = load_config(str(ROOT / "configs" / "mlp.yaml"))
    assert resolve_threads("auto", cfg) == 1  # sample_busy would fail: nothing left in the list


def test_omp_num_threads_wins(two_cores: list[float], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert resolve_threads("auto", load_config(str(ROOT / "configs" / "resnet.yaml"))) == 3


def test_apply_threads_sets_torch(two_cores: list[float]) -> None:
    import torch

    before = torch.get_num_threads()
    try:
        two_cores.append(0.0)
        assert run.apply_threads("auto", load_config(str(ROOT / "configs" / "densenet.yaml"))) == 2
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
