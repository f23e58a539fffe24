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

pytestmark = pytest.mark.slow  # two training runs and a TensorBoard server: ~30-40 s on 2 busy cores

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


def test_plugins_active(server: tuple[str, dict[str, Path]]) -> None:
    base, _ = server
    listing = _get(base, "/data/plugins_listing")
    for plugin in ("scalars", "custom_scalars", "images", "hparams"):
        assert listing[plugin]["enabled"], plugin


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
