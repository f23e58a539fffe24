"""Local sweep workers: the order they claim a grid's runs in (longest first), the thread share of each, and
the report each rewrites. No timing: the orders and counts are checked, bench/sweep_workers.py times them."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from deepnets import sweep as sweep_mod
from deepnets.sweep import _share_machine, create_sweep, grid, open_sweep, rows_of, run_order

from .test_sweep import _cfg  # the same tiny, fast sweep config


def _queue(sweep_dir: Path) -> list[tuple[int, int]]:
    """(grid index, seed) of the study's trials in the order a worker claims them (trial number)."""
    study = open_sweep(sweep_dir).study
    return [(t.user_attrs["index"], t.user_attrs["seed"]) for t in sorted(study.trials, key=lambda t: t.number)]


@pytest.mark.parametrize("workers", [2, 0])
def test_several_workers_claim_the_biggest_runs_first(tmp_path: Path, workers: int) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 64, 16]}", "sweep.seeds=[0, 1]", f"sweep.workers={workers}")
    sweep_dir, _, total = create_sweep(cfg, verbose=False)
    assert total == 6
    # grid indices: width 4 -> 0, 1; 64 -> 2, 3; 16 -> 4, 5 (seeds innermost); claimed 64, 16, 4, seeds in order
    assert _queue(sweep_dir) == [(2, 0), (3, 1), (4, 0), (5, 1), (0, 0), (1, 1)]


def test_one_worker_keeps_the_grid_order(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 64, 16]}", "sweep.seeds=[0, 1]", "sweep.workers=1")
    sweep_dir, _, _ = create_sweep(cfg, verbose=False)
    assert _queue(sweep_dir) == [(0, 0), (1, 1), (2, 0), (3, 1), (4, 0), (5, 1)]


def test_run_order_weighs_parameters_by_epochs(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [8, 16], trainer.max_steps: [40, 2]}", "sweep.seeds=[0]")
    points = grid(cfg)
    for p in points:
        p.params = sweep_mod.count_params(p.cfg)
    # grid: 0 (8, 40), 1 (8, 2), 2 (16, 40), 3 (16, 2); width 8 has 171 parameters, 16 has 467. (8, 40) has
    # fewer parameters than (16, 2) but 20x the steps: it goes before it
    assert [p.index for p in run_order(points, 2)] == [2, 0, 3, 1]
    assert run_order(points, 1) == points


def test_table_keeps_the_grid_order_whatever_order_the_runs_ran_in(tmp_path: Path) -> None:
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4, 64, 16]}", "sweep.seeds=[0]", "sweep.workers=2")
    sweep_dir, _, _ = create_sweep(cfg, verbose=False)
    sw = open_sweep(sweep_dir)
    flag = sweep_mod.StopFlag()
    assert sweep_mod.work(sw, flag, tag="test", slot=(0, 2))  # one worker of two, in this process
    assert [r["width"] for r in rows_of(sw.study)] == [4, 64, 16]
    started = sorted((t.user_attrs["started"], t.user_attrs["index"]) for t in sw.study.trials)
    assert [i for _, i in started] == [1, 2, 0]  # ran biggest first


def test_each_worker_writes_its_report_through_its_own_temporary_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two workers finishing at once used to share `.results.csv` (`.results.<pid>`'s pid was taken for a
    suffix and replaced): one renamed the other's file away and died with FileNotFoundError."""
    from deepnets.experiments import common

    stems: list[Path] = []
    real = common.write_table
    monkeypatch.setattr(common, "write_table", lambda rows, stem: (stems.append(Path(stem)), real(rows, stem))[1])
    cfg = _cfg(tmp_path, "sweep.params={model.width: [4]}", "sweep.seeds=[0]", "sweep.workers=2")
    sweep_dir, _, _ = create_sweep(cfg, verbose=False)
    sw = open_sweep(sweep_dir)
    assert sweep_mod.work(sw, sweep_mod.StopFlag(), tag="test", slot=(0, 2))
    assert stems and all(str(os.getpid()) in s.with_suffix(".csv").name for s in stems)
    assert (sweep_dir / "results.csv").is_file() and not list(sweep_dir.glob(".results*"))


def test_share_machine_gives_each_worker_its_cores(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    c = _cfg(tmp_path, "trainer.accelerator=cpu")
    _share_machine(c, 1, 2)
    assert c.trainer.threads == max(1, cores // 2)
    c = _cfg(tmp_path, "trainer.accelerator=cpu")
    _share_machine(c, 0, 1)  # one worker: auto stays auto (the run decides from its model and the load)
    assert c.trainer.threads == "auto"
