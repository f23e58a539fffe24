"""What every run tells TensorBoard about itself: one dashboard layout, its hyperparameters, its outcome.

- The Custom Scalars layout (`LAYOUT`): the same bytes in every run, one chart per metric whose
  anchored regexes pick that metric's tags in every run. TensorBoard merges the layouts of a
  logdir's runs category by category and drops charts identical to one it has, so any set of
  runs (architectures, sweep points) shows each chart once with every run's lines in it.
  (Per-run layouts listing each run's own tags gave one same-titled chart per architecture,
  each picking up other runs' tags.)
- The HParams plugin: at the start of fit each run writes its hyperparameters (`hparams(cfg)`:
  every config key that describes model, data, optimizer, schedule, trainer limits and seed)
  and the experiment definition (the same bytes in every run, so whichever run TensorBoard
  reads it from, the table has the same columns); when the run ends, however it ends, its
  final metrics as `final/...` scalars and the session's end status.

TensorBoard without an experiment definition would turn every scalar tag (each layer's
gradient norm) into a metric column; with one, the columns are exactly `METRICS`.
"""

from __future__ import annotations

import dataclasses
import json
import time
import types
import typing
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import EarlyStopping
from lightning.pytorch.loggers import TensorBoardLogger

from deepnets.config import Config

__all__ = ["LAYOUT", "METRICS", "STATUS_CODES", "HParamsRecorder", "hparams", "layout_proto"]

# (category, [(chart title, anchored tag regexes)]); the monitor's per-layer tags are
# `<metric>/<index>_<layer>` with a zero-padded index, so a chart's legend and tooltip list
# layers input -> head.
LAYOUT: list[tuple[str, list[tuple[str, list[str]]]]] = [
    (
        "Gradient flow",
        [
            ("gradient norm per layer ||dL/dW|| (tag index: 00 = input ... head)", [r"^grad_norm/\d+_"]),
            ("first-layer / last-layer gradient norm (<< 1: vanishing)", [r"^grad_norm/first_over_last$"]),
            ("log10 first-layer / last-layer gradient norm", [r"^grad_norm/log10_first_over_last$"]),
            ("global gradient norm", [r"^grad_norm/global$"]),
            ("weight norm per layer ||W|| (logging.weight_norms)", [r"^weight_norm/\d+_"]),
            ("update / weight ratio per layer (logging.weight_norms)", [r"^update_ratio/\d+_"]),
        ],
    ),
    (
        "Training",
        [
            ("train/loss (logged steps)", [r"^train/loss_step$"]),
            ("train/loss (epoch mean)", [r"^train/loss_epoch$"]),
            ("train/acc", [r"^train/acc$"]),
            ("val/loss", [r"^val/loss$"]),
            ("val/acc", [r"^val/acc$"]),
            ("learning rate", [r"^lr-[^/]+(/pg\d+)?$"]),  # LearningRateMonitor: lr-<Optimizer>[/pg<i>]
        ],
    ),
]

# (tag, display name): final metrics, written when the run ends
METRICS: list[tuple[str, str]] = [  # TensorBoard's table ticks the first five: status among them
    ("final/status", "status"),
    ("final/test/acc", "test/acc"),
    ("final/val/acc", "val/acc"),
    ("final/test/loss", "test/loss"),
    ("final/val/loss", "val/loss"),
    ("final/parameters", "parameters"),
]
STATUS_DESCRIPTION = "0 completed, 1 early_stopped, 2 diverged, 3 interrupted, 4 failed"
STATUS_CODES = {"completed": 0, "early_stopped": 1, "diverged": 2, "interrupted": 3, "failed": 4}

# Config keys that change how a run is executed or recorded, not what it computes.
_PLUMBING = {
    "name",
    "output_dir",
    "data.root",
    "data.download",
    "trainer.accelerator",
    "trainer.devices",
    "trainer.strategy",
    "trainer.num_nodes",
    "trainer.progress_bar",
    "trainer.fast_dev_run",
    "trainer.log_every_n_steps",
    "trainer.detect_anomaly",
    "trainer.threads",
    "trainer.test",
}
_PLUMBING_SECTIONS = ("checkpoint.", "logging.", "sweep.")


def layout_proto() -> Any:
    """`LAYOUT` as TensorBoard's custom-scalars Layout message."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    return layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title=title,
                chart=[
                    layout_pb2.Chart(title=chart, multiline=layout_pb2.MultilineChartContent(tag=regexes))
                    for chart, regexes in charts
                ],
            )
            for title, charts in LAYOUT
        ]
    )


def layout_summary() -> Any:
    """The Summary holding `layout_proto()` under the custom-scalars plugin's config tag."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.compat.proto.tensor_pb2 import TensorProto
    from tensorboard.compat.proto.tensor_shape_pb2 import TensorShapeProto
    from tensorboard.plugins.custom_scalar import metadata

    tensor = TensorProto(
        dtype="DT_STRING", string_val=[layout_proto().SerializeToString()], tensor_shape=TensorShapeProto()
    )
    smd = metadata.create_summary_metadata()
    return Summary(value=[Summary.Value(tag=metadata.CONFIG_SUMMARY_TAG, tensor=tensor, metadata=smd)])


def _kind(tp: Any) -> str:
    """bool / number / string: the HParams type of a config field, from its annotation.

    From the schema, not the value, so a key has one type in every run (`model.width: 64` in one
    run and `null` in another is a string in both)."""
    if tp is bool:
        return "bool"
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
    else:
        args = [tp]
    if args == [bool]:
        return "bool"
    if all(a in (int, float) for a in args):
        return "number"
    return "string"


def _fields(cls: type, prefix: str) -> list[tuple[str, str]]:
    out = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += _fields(hints[f.name], f"{key}.")
        elif key not in _PLUMBING and not key.startswith(_PLUMBING_SECTIONS):
            out.append((key, _kind(hints[f.name])))
    return out


def hparam_keys() -> list[tuple[str, str]]:
    """(dotted key, bool | number | string) of every hyperparameter recorded."""
    return _fields(Config, "")


def hparams(cfg: Config) -> dict[str, bool | float | str]:
    """The run's hyperparameters, flattened: `model.depth`, `optim.lr`, ... (see `_PLUMBING` for what is left out).

    Numbers that are null in this run are left out (a blank cell), lists and other values become
    their JSON text."""
    flat: dict[str, Any] = {}

    def walk(d: dict[str, Any], prefix: str) -> None:
        for k, v in d.items():
            if isinstance(v, dict) and f"{prefix}{k}" not in ("sweep.params", "model.kwargs"):
                walk(v, f"{prefix}{k}.")
            else:
                flat[f"{prefix}{k}"] = v

    walk(cfg.to_dict(), "")
    out: dict[str, bool | float | str] = {}
    for key, kind in hparam_keys():
        v = flat[key]
        if kind == "bool":
            out[key] = bool(v)
        elif kind == "number":
            if v is not None:
                out[key] = float(v)
        else:
            out[key] = v if isinstance(v, str) else json.dumps(v)
    return out


def _summary(tag: str, **data: Any) -> Any:
    """An hparams-plugin Summary (what `tensorboard.plugins.hparams.summary` builds, which needs TensorFlow)."""
    from tensorboard.compat.proto.summary_pb2 import Summary
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    smd = metadata.create_summary_metadata(plugin_data_pb2.HParamsPluginData(**data))
    return Summary(value=[Summary.Value(tag=tag, metadata=smd, tensor=metadata.NULL_TENSOR)])


def experiment_summary() -> Any:
    """The experiment definition: every hyperparameter key with its type, and `METRICS`; the same bytes in every run."""
    from tensorboard.plugins.hparams import api_pb2, metadata

    types = {"bool": api_pb2.DATA_TYPE_BOOL, "number": api_pb2.DATA_TYPE_FLOAT64, "string": api_pb2.DATA_TYPE_STRING}
    experiment = api_pb2.Experiment(
        hparam_infos=[api_pb2.HParamInfo(name=k, type=types[kind]) for k, kind in hparam_keys()],
        metric_infos=[
            api_pb2.MetricInfo(
                name=api_pb2.MetricName(tag=tag),
                display_name=name,
                description=STATUS_DESCRIPTION if tag == "final/status" else "",
            )
            for tag, name in METRICS
        ],
    )
    return _summary(metadata.EXPERIMENT_TAG, experiment=experiment)


def session_start_summary(cfg: Config) -> Any:
    from google.protobuf import struct_pb2
    from tensorboard.plugins.hparams import metadata, plugin_data_pb2

    info = plugin_data_pb2.SessionStartInfo(start_time_secs=time.time())  # no group_name: one row per run
    for key, v in hparams(cfg).items():
        info.hparams[key].CopyFrom(
            struct_pb2.Value(bool_value=v)
            if isinstance(v, bool)
            else struct_pb2.Value(number_value=v)
            if isinstance(v, float)
            else struct_pb2.Value(string_value=v)
        )
    return _summary(metadata.SESSION_START_INFO_TAG, session_start_info=info)


def session_end_summary(ok: bool) -> Any:
    from tensorboard.plugins.hparams import api_pb2, metadata, plugin_data_pb2

    status = api_pb2.STATUS_SUCCESS if ok else api_pb2.STATUS_FAILURE
    info = plugin_data_pb2.SessionEndInfo(status=status, end_time_secs=time.time())
    return _summary(metadata.SESSION_END_INFO_TAG, session_end_info=info)


class HParamsRecorder(L.Callback):
    """Writes the custom-scalars layout and the run's HParams session into its TensorBoard run.

    Args:
        cfg: the run's config (its hyperparameters are `hparams(cfg)`).

    Start of fit: layout, experiment definition, session start (hyperparameters). End of the
    run: the final metrics and the session end. The run ends at the end of `trainer.test` when
    the run tests (`trainer.test` and the fit completed or stopped early), else at the end of fit
    or at the exception that stopped it (diverged, interrupted, failed). Rank 0 only.
    """

    def __init__(self, cfg: Config) -> None:
        self.cfg = cfg
        self.status: str | None = None
        self.fit_metrics: dict[str, float] = {}
        self.parameters = 0
        self.written = False  # the session end, once per run

    @staticmethod
    def _writer(trainer: L.Trainer) -> Any:
        if not trainer.is_global_zero:
            return None
        for logger in trainer.loggers:
            if isinstance(logger, TensorBoardLogger):
                return logger.experiment
        return None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit" or (writer := self._writer(trainer)) is None:
            return
        net = getattr(pl_module, "model", pl_module)
        self.parameters = sum(p.numel() for p in net.parameters())
        file_writer = writer._get_file_writer()  # torch's SummaryWriter: the run's own event file
        step = trainer.global_step
        file_writer.add_summary(layout_summary(), step)
        file_writer.add_summary(experiment_summary(), step)
        file_writer.add_summary(session_start_summary(self.cfg), step)

    def _end(self, trainer: L.Trainer, test_metrics: dict[str, float]) -> None:
        if self.written or (writer := self._writer(trainer)) is None:
            return
        self.written = True
        status = self.status or "completed"
        values = {**self.fit_metrics, **test_metrics}
        final = {
            "final/test/acc": values.get("test/acc"),
            "final/test/loss": values.get("test/loss"),
            "final/val/acc": values.get("val/acc"),
            "final/val/loss": values.get("val/loss"),
            "final/parameters": float(self.parameters),
            "final/status": float(STATUS_CODES[status]),
        }
        step = trainer.global_step
        for tag, v in final.items():
            if v is not None:
                writer.add_scalar(tag, v, step)
        ok = status in ("completed", "early_stopped")
        writer._get_file_writer().add_summary(session_end_summary(ok), step)
        writer.flush()

    @staticmethod
    def _scalars(trainer: L.Trainer, prefix: str) -> dict[str, float]:
        out = {}
        for k, v in trainer.callback_metrics.items():
            if k.startswith(prefix) and getattr(v, "numel", lambda: 1)() == 1:
                out[k] = float(v)
        return out

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        from deepnets.run import Diverged, Interrupted  # run.py imports this module

        if trainer.state.fn == "fit":
            self.fit_metrics = self._scalars(trainer, "val/")
        kind = {Diverged: "diverged", Interrupted: "interrupted"}.get(type(exception), "failed")
        self.status = "interrupted" if isinstance(exception, KeyboardInterrupt) else kind
        self._end(trainer, {})

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage == "fit":
            self.fit_metrics = self._scalars(trainer, "val/")
            stopped = any(isinstance(c, EarlyStopping) and c.stopped_epoch > 0 for c in trainer.callbacks)
            self.status = "early_stopped" if stopped else "completed"
            if not self.cfg.trainer.test:
                self._end(trainer, {})  # no test follows: the run ends here
        elif stage == "test":
            self._end(trainer, self._scalars(trainer, "test/"))
