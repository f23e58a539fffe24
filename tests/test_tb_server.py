"""The dashboards as TensorBoard itself serves them: a real server on two runs of different architectures.

Reads only TensorBoard's HTTP API (`/data/plugins_listing`, the custom-scalars layout, the scalar
tags, the hparams plugin's experiment and session groups), the way its web page does.
"""

from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from deepnets.hparams import LAYOUT, METRICS, STATUS_CODES
from deepnets.run import train
from tests.conftest import tiny_config

# The server tests share one module fixture (two training runs and a TensorBoard server: ~45 s on
# 2 busy cores): marked slow. The event-level checks below them run in the default suite.

COMMON = [
    "logging.grad_norm_every_n_steps=2",
    "logging.weight_norms=true",
    "scheduler.name=cosine",  # so the learning-rate chart has data
    "trainer.max_epochs=1",
]
RUNS = {
    "mlp": ["name=mlp", "model.depth=3", "model.activation=sigmoid"],
    "resnet": [
        "name=resnet",
        "model.arch=resnet",
        "model.stage_depths=[1,1]",
        "model.width=4",
        "data.input_shape=[3,8,8]",
        "model.zero_init_residual=true",
    ],
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _get(base: str, path: str, body: dict[str, Any] | None = None) -> Any:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(base + path, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, dict[str, Path]]]:
    tmp = tmp_path_factory.mktemp("tb")
    run_dirs = {}
    for name, overrides in RUNS.items():
        result = train(tiny_config(tmp, *COMMON, *overrides))
        assert result.status == "completed", result.error
        run_dirs[name] = result.run_dir
    port = _free_port()
    command = [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp / "runs"), "--port", str(port)]
    proc = subprocess.Popen(
        [*command, "--host", "127.0.0.1", "--reload_interval", "0"],  # reload 0: load once, then serve
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                listing = _get(base, "/data/plugins_listing")
                runs = _get(base, "/data/runs")
                if listing.get("hparams", {}).get("enabled") and len(runs) == 2:
                    break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                err = proc.stderr.read().decode() if proc.poll() is not None else "(still running)"
                pytest.fail(f"TensorBoard did not come up on port {port} within 90 s: {err[-2000:]}")
            time.sleep(0.5)
        yield base, run_dirs
    finally:
        proc.kill()
        proc.wait(timeout=30)


def _run_name(run_dir: Path) -> str:
    return f"{run_dir.parent.name}/{run_dir.name}"


@pytest.mark.slow
def test_plugins_active(server: tuple[str, dict[str, Path]]) -> None:
    base, _ = server
    listing = _get(base, "/data/plugins_listing")
    for plugin in ("scalars", "custom_scalars", "images", "hparams"):
        assert listing[plugin]["enabled"], plugin


@pytest.mark.slow
def test_one_chart_per_metric_matching_both_runs_and_nothing_else(server: tuple[str, dict[str, Path]]) -> None:
    base, run_dirs = server
    layout = _get(base, "/data/plugin/custom_scalars/layout")
    tags = _get(base, "/data/plugin/scalars/tags")
    runs = [_run_name(d) for d in run_dirs.values()]
    assert sorted(tags) == sorted(runs)

    # merged across the two runs: each category once, each chart once, exactly LAYOUT
    served = [(c["title"], [(ch["title"], ch["multiline"]["tag"]) for ch in c["chart"]]) for c in layout["category"]]
    assert served == [(title, [(chart, list(rx)) for chart, rx in charts]) for title, charts in LAYOUT]

    claimed: dict[str, dict[str, str]] = {run: {} for run in runs}  # run -> tag -> chart that shows it
    for _, charts in LAYOUT:
        for chart, regexes in charts:
            for run in runs:
                hits = [t for t in tags[run] if any(re.match(rx, t) for rx in regexes)]
                assert hits, f"chart {chart!r} shows nothing of run {run}"
                for t in hits:
                    assert t not in claimed[run], f"{t} in both {claimed[run][t]!r} and {chart!r}"
                    claimed[run][t] = chart
    # every per-layer tag of a run is in its per-layer chart, in depth order, and no other run's tag is
    for run in runs:
        layer_tags = sorted(t for t, c in claimed[run].items() if c.startswith("gradient norm per layer"))
        n = len(layer_tags)
        assert [int(t.split("/")[1].split("_")[0]) for t in layer_tags] == list(range(n))
        assert layer_tags[0].endswith(("layers.0.0", "stem.0")) and layer_tags[-1].endswith("_head")
        assert {"grad_norm/first_over_last", "grad_norm/log10_first_over_last"} <= claimed[run].keys()
        assert any(t.startswith("lr-SGD") for t in claimed[run])
        # what is in no chart: bookkeeping, the final metrics (HParams) and test scalars
        unclaimed = set(tags[run]) - claimed[run].keys()
        assert all(t == "epoch" or t.startswith(("final/", "test/")) for t in unclaimed), unclaimed


@pytest.mark.slow
def test_first_over_last_is_the_ratio_of_the_logged_layer_norms(server: tuple[str, dict[str, Path]]) -> None:
    base, run_dirs = server
    for run_dir in run_dirs.values():
        run = _run_name(run_dir)
        tags = sorted(t for t in _get(base, "/data/plugin/scalars/tags")[run] if re.match(r"^grad_norm/\d+_", t))

        def series(tag: str, run: str = run) -> dict[int, float]:
            q = urllib.parse.urlencode({"run": run, "tag": tag})
            return {step: v for _, step, v in _get(base, f"/data/plugin/scalars/scalars?{q}")}

        first, last, ratio = series(tags[0]), series(tags[-1]), series("grad_norm/first_over_last")
        assert ratio.keys() == first.keys() and len(ratio) >= 2
        for step, r in ratio.items():
            if last[step] > 0 and first[step] > 0:
                assert r == pytest.approx(first[step] / last[step], rel=1e-5)
            else:  # zero-initialised residual branches: exactly 0 at step 0
                assert first[step] == 0 or r != r


@pytest.mark.slow
def test_hparams_lists_both_runs_with_their_values(server: tuple[str, dict[str, Path]]) -> None:
    base, run_dirs = server
    experiment = _get(base, "/data/plugin/hparams/experiment", {"experimentName": ""})
    names = [h["name"] for h in experiment["hparamInfos"]]
    for key in ("model.arch", "model.depth", "optim.lr", "data.batch_size", "trainer.max_epochs", "seed"):
        assert key in names
    assert not any(k.startswith(("logging.", "checkpoint.")) or k in ("output_dir", "name") for k in names)
    assert [m["name"]["tag"] for m in experiment["metricInfos"]] == [tag for tag, _ in METRICS]

    groups = _get(
        base,
        "/data/plugin/hparams/session_groups",
        {
            "experimentName": "",
            "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE", "STATUS_RUNNING"],
            "colParams": [],
            "startIndex": 0,
            "sliceSize": 100,
        },
    )
    by_run = {g["name"]: g for g in groups["sessionGroups"]}
    assert sorted(by_run) == sorted(_run_name(d) for d in run_dirs.values())
    for arch, run_dir in run_dirs.items():
        group = by_run[_run_name(run_dir)]
        assert group["hparams"]["model.arch"] == arch
        assert group["hparams"]["model.zero_init_residual"] is (arch == "resnet")
        recorded = json.loads((run_dir / "metrics.json").read_text())
        metrics = {m["name"]["tag"]: m["value"] for m in group["metricValues"]}
        for key in ("test/acc", "test/loss", "val/acc", "val/loss"):
            assert metrics[f"final/{key}"] == pytest.approx(recorded["metrics"][key], rel=1e-6)
        assert metrics["final/status"] == STATUS_CODES[recorded["status"]] == 0
        assert metrics["final/parameters"] == sum(p.numel() for p in _model(run_dir).parameters())
        (session,) = group["sessions"]
        assert session["status"] == "STATUS_SUCCESS"


def _model(run_dir: Path) -> Any:
    from deepnets.config import load_config
    from deepnets.models import build_model

    cfg = load_config(str(run_dir / "config.yaml"))
    shape = tuple(cfg.data.input_shape)
    return build_model(cfg.to_dict()["model"], shape, cfg.data.num_classes)


# ---------------------------------------------------------------- event-level checks (no server: fast)


def _acc(run_dir: Path) -> Any:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0, "tensors": 0})
    acc.Reload()
    return acc


def _session_end_status(acc: Any) -> int:
    from tensorboard.plugins.hparams import metadata

    content = acc.SummaryMetadata(metadata.SESSION_END_INFO_TAG).plugin_data.content
    return metadata.parse_session_end_info_plugin_data(content).status


def test_layout_and_experiment_are_the_same_bytes_in_every_run(tmp_path: Path) -> None:
    from tensorboard.plugins.hparams import metadata

    configs = [["name=a"], ["name=b", "model.arch=resmlp", "logging.weight_norms=true", "trainer.test=false"]]
    accs = []
    for overrides in configs:
        result = train(tiny_config(tmp_path, "trainer.max_epochs=1", "checkpoint.enabled=false", *overrides))
        accs.append(_acc(result.run_dir))
    layouts = [a.Tensors("custom_scalars__config__")[0].tensor_proto.string_val[0] for a in accs]
    assert layouts[0] == layouts[1]
    experiments = [a.SummaryMetadata(metadata.EXPERIMENT_TAG).plugin_data.content for a in accs]
    assert experiments[0] == experiments[1]


def test_final_metrics_written_however_the_run_ends(tmp_path: Path) -> None:
    import os
    import signal

    import lightning as L
    from tensorboard.plugins.hparams import api_pb2

    class SigtermAt(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:  # type: ignore[no-untyped-def]
            if trainer.global_step == 3:
                os.kill(os.getpid(), signal.SIGTERM)  # LastCheckpoint turns it into a clean stop

    cases = {
        "diverged": (["optim.lr=1e30"], ()),
        "interrupted": ([], (SigtermAt(),)),
        "untested": (["trainer.test=false"], ()),
    }
    for name, (overrides, callbacks) in cases.items():
        cfg = tiny_config(tmp_path, f"name={name}", "checkpoint.enabled=false", *overrides)
        result = train(cfg, callbacks=callbacks)
        recorded = json.loads((result.run_dir / "metrics.json").read_text())
        acc = _acc(result.run_dir)
        final = {t: acc.Scalars(t)[-1].value for t in acc.Tags()["scalars"] if t.startswith("final/")}
        expected_status = {"untested": "completed"}.get(name, name)
        assert recorded["status"] == result.status == expected_status
        assert final["final/status"] == STATUS_CODES[expected_status]
        ok = expected_status == "completed"
        assert _session_end_status(acc) == (api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE)
        assert not any(t.startswith("final/test/") for t in final)  # no test ran
        for key in ("val/acc", "val/loss"):  # what the run had when it ended, as metrics.json says
            if key in recorded["metrics"] and isinstance(recorded["metrics"][key], float):
                assert final[f"final/{key}"] == pytest.approx(recorded["metrics"][key], rel=1e-6)
            else:
                assert f"final/{key}" not in final
        assert final["final/parameters"] == sum(p.numel() for p in result.model.parameters())


def test_hyperparameters_are_every_config_key_but_plumbing() -> None:
    import dataclasses

    from deepnets.config import Config
    from deepnets.hparams import _PLUMBING, _PLUMBING_SECTIONS, hparams

    def leaves(d: dict[str, Any], prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= (
                leaves(v, f"{prefix}{k}.")
                if isinstance(v, dict) and k not in ("params", "kwargs")
                else {f"{prefix}{k}"}
            )
        return out

    cfg = dataclasses.replace(Config(), seed=7)
    hp = hparams(cfg)
    everything = leaves(cfg.to_dict())
    kept = {k for k in everything if k not in _PLUMBING and not k.startswith(_PLUMBING_SECTIONS)}
    assert set(hp) <= kept
    assert kept - set(hp) == {k for k in kept if cfg_value_is_null(cfg, k) and k not in hp}  # only nulls left out
    assert hp["seed"] == 7.0 and hp["model.arch"] == "mlp" and hp["optim.betas"] == "[0.9, 0.999]"
    assert hp["model.batch_norm"] is False and hp["model.width"] == "null"  # int | list | None: text
    assert "data.eval_batch_size" not in hp  # a number that is null in this run: left blank


def cfg_value_is_null(cfg: Any, key: str) -> bool:
    node: Any = cfg.to_dict()
    for part in key.split("."):
        node = node[part]
    return node is None
