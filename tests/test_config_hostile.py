"""Hostile input to the config layer: a fuzzer over every key, one case per family of mistake through
the CLI, and the runtime checks of devices, strategy and precision.

Every mistake must end as one `error: ...` line naming the culprit, exit code 2, no traceback and
nothing written.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tempfile
import typing
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from deepnets import config as config_mod
from deepnets.cli import main
from deepnets.config import (
    Config,
    TrainerConfig,
    Visible,
    check_devices,
    check_runtime,
    from_dict,
    load_config,
    parse_yaml,
    to_yaml,
)
from deepnets.errors import UserError
from tests.conftest import TINY, run_cli


def _cuda_or_mps() -> bool:
    import torch

    return torch.cuda.is_available() or torch.backends.mps.is_available()


# ---------------------------------------------------------------- (a) the fuzzer


def _keys(cls: type = Config, prefix: str = "") -> list[tuple[str, Any]]:
    """(dotted key, type) of every field of the config reference: a new field is fuzzed automatically."""
    out: list[tuple[str, Any]] = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            out += _keys(tp, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", tp))
    return out


KEYS = _keys()
MARKER = Path(tempfile.gettempdir()) / f"deepnets-fuzz-marker-{os.getpid()}"
GARBAGE = [
    "!!int abc",
    "!!bool maybe",
    "!!timestamp foo",
    "!!float x",
    "!!null 3",
    "!!binary aGk=",
    "!!set {a, b}",
    f"!!python/object/apply:os.system ['touch {MARKER}']",
    "!ruby/object {}",
    "1:20",
    "0100",
    "0o17",
    "0x1F",
    "1_000",
    "[[[",
    "[" * 3000,
    "{" * 200,
    "]]",
    "&a [*a]",
    "*nope",
    "{a: 1, a: 2}",
    "<<: {a: 1}",
    "a: b: c",
    '"\\ud800"',
    '"a\\nb"',  # a newline inside a value: messages must stay one line
    '"~x\\ny/z"',
    '"\\x00"',
    "'unterminated",
    "\t",
    "- 1\n- 2",
    "---\n1\n---\n2",
    "%YAML 1.1\n--- 1",
    "2020-13-45",
    "2020-01-01 10:00:00",
    "~",
    "",
    "null",
    "yes",
    "no",
    "on",
    "=",
    ".inf",
    "-.inf",
    ".nan",
    "1e400",
    "-0",
    "0x" + "f" * 40,
    "9" * 5000,
    "../../x",
    "/etc/x",
    "~/x",
    "~nosuchuser_fuzz/x",
    "a//b",
]


def _literal_values(tp: Any) -> list[str]:
    if typing.get_origin(tp) is typing.Literal:
        return [str(a) for a in typing.get_args(tp)]
    return [v for a in typing.get_args(tp) for v in _literal_values(a)] if typing.get_args(tp) else []


_scalar = st.one_of(
    st.integers(-(2**70), 2**70).map(str),
    st.integers(-3, 300).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0.5", "1e-3", "1.0", "0.0", "2.5", ".inf", ".nan", "true", "false", "null"]),
    st.text(max_size=12),
    st.sampled_from(GARBAGE),
)
_flat = st.one_of(st.integers(-3, 300).map(str), st.sampled_from(["0.1", ".inf", "x", "null", "true", "1:20", "[]"]))
_list = st.lists(_flat, max_size=4).map(lambda xs: "[" + ", ".join(xs) + "]")
_nested = st.recursive(_flat, lambda inner: st.lists(inner, max_size=3).map(lambda xs: "[" + ", ".join(xs) + "]"))
_mapping = st.dictionaries(st.sampled_from(["a", "depth", "model.width", "1"]), _flat, max_size=3).map(
    lambda d: "{" + ", ".join(f"{k}: {v}" for k, v in d.items()) + "}"
)


@st.composite
def _override(draw: st.DrawFn) -> str:
    key, tp = draw(st.sampled_from(KEYS))
    if draw(st.integers(0, 9)) == 0:  # now and then a whole section, an unknown key or a bad path
        key = draw(st.sampled_from(["model", "trainer", "sweep", "nope", "model.widht", "model.depth.x", "a..b"]))
    literals = _literal_values(tp)
    value = draw(
        st.one_of(
            _scalar,
            _list,
            _nested,
            _mapping,
            *([st.sampled_from(literals)] if literals else []),
            *([st.sampled_from([f"{v}x" for v in literals] + [v[:-1] for v in literals])] if literals else []),
        )
    )
    return f"{key}={value}"


KEY_NAMES = {k for k, _ in KEYS} | {f.name for f in dataclasses.fields(Config)}
# keys whose value is a mapping (model.kwargs, optim.kwargs, sweep.params): an entry's path, model.kwargs.NAME,
# is how deepnets names it (README: `model.kwargs.chanels: TinyConvNet() takes no argument 'chanels'`)
MAPPING_KEYS = tuple(f"{k}." for k, tp in KEYS if typing.get_origin(tp) is dict)


def _names_a_culprit(msg: str, base: str | None) -> bool:
    """The message starts with what to fix: a key path, an override, an unknown key or the config file."""
    head = re.split(r"[:= ]", msg, maxsplit=1)[0]
    return (
        re.sub(r"\[\d+\]$", "", head) in KEY_NAMES
        or head.startswith(MAPPING_KEYS)
        or msg.startswith(("override ", "unknown key ", "trainer.lr_find and trainer.lr_probe"))
        or (base is not None and head.endswith(".yaml"))
    )


@settings(
    max_examples=int(os.environ.get("DEEPNETS_FUZZ_EXAMPLES", "400")),  # more: DEEPNETS_FUZZ_EXAMPLES=5000
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(base=st.sampled_from([None, "mlp", "resnet", "double_descent"]), overrides=st.lists(_override(), max_size=5))
def test_fuzzed_overrides_raise_nothing_but_one_line_user_errors(base: str | None, overrides: list[str]) -> None:
    try:
        cfg = load_config(base, overrides)
    except UserError as e:
        msg = str(e)
        assert msg and "\n" not in msg and "\r" not in msg, repr(msg)
        assert len(msg) < 600, msg
        assert _names_a_culprit(msg, base), msg
    else:
        for key, _ in KEYS:  # what loads is in range: every float finite
            value: Any = cfg
            for part in key.split("."):
                value = getattr(value, part)
            for v in value if isinstance(value, list) else [value]:
                assert not isinstance(v, float) or v - v == 0, (key, v)
        again = from_dict(parse_yaml(to_yaml(cfg), "config.yaml"))  # a run's config.yaml loads back equal
        assert repr(again) == repr(cfg)
    assert not MARKER.exists(), "a YAML tag ran code"


def test_fuzzer_covers_every_key() -> None:
    keys = {k for k, _ in KEYS}
    for section in ("model", "data", "optim", "scheduler", "trainer", "early_stopping", "checkpoint", "logging"):
        fields = dataclasses.fields(getattr(Config(), section))
        assert {f"{section}.{f.name}" for f in fields} <= keys
    assert {"name", "seed", "output_dir"} <= keys


# ---------------------------------------------------------------- (b) one case per family, through the CLI

DUPLICATE_SECTION = "model:\n  depth: 2\nname: x\nmodel:\n  width: 8\n"
LATIN1 = "name: caf\xe9\n".encode("latin-1")
NESTED = "name: " + "[" * 3000 + "\n"

# (id, config text or bytes or None, arguments after --config, text the error line must contain)
CASES: list[tuple[str, str | bytes | None, list[str], str]] = [
    ("unknown-key", None, ["model.widht=3"], "unknown key model.widht; did you mean model.width?"),
    ("width-0", None, ["model.width=0"], "model.width: 0 is out of range"),
    ("width-negative", None, ["model.width=-5"], "model.width: -5 is out of range"),
    ("width-list-0", None, ["model.width=[0]"], "model.width[0]: 0 is out of range"),
    ("width-list-negative", None, ["model.width=[8,-8,8]", "model.depth=3"], "model.width[1]: -8"),
    ("input-shape-0", None, ["data.input_shape=[0]"], "data.input_shape[0]: 0 is out of range"),
    ("lr-inf", None, ["optim.lr=.inf"], "optim.lr: inf is not a finite number"),
    ("eps-inf", None, ["optim.eps=.inf"], "optim.eps: inf is not a finite number"),
    ("layer-decay-negative", None, ["optim.layer_decay=-0.5"], "optim.layer_decay: -0.5 is out of range"),
    ("max-epochs-0", None, ["trainer.max_epochs=0"], "trainer.max_epochs: 0 is out of range"),
    ("sexagesimal", None, ["model.depth=1:20"], "model.depth: expected int, got '1:20'"),
    ("duplicate-section", DUPLICATE_SECTION, [], "c.yaml:4: invalid YAML: duplicate key 'model' (first at line 1)"),
    ("seed-range", None, ["seed=4294967296"], "seed: 4294967296 is out of range"),
    ("split-seed-range", None, ["data.split_seed=-1"], "data.split_seed: -1 is out of range"),
    ("devices-minus-1", None, ["trainer.devices=-1"], "trainer.devices: -1 is out of range"),
    ("devices-0", None, ["trainer.devices=0"], "trainer.devices: 0 is out of range"),
    ("devices-empty", None, ["trainer.devices=[]"], "trainer.devices: [] is not a valid device list"),
    ("devices-banana", None, ["trainer.devices=banana"], "trainer.devices: expected auto or int or list[int]"),
    ("checkpoint-monitor", None, ["checkpoint.monitor=val/accuracy"], "checkpoint.monitor: 'val/accuracy' is not"),
    (
        "early-stopping-monitor",
        None,
        ["early_stopping.enabled=true", "early_stopping.monitor=val/los"],
        "early_stopping.monitor: 'val/los' is not a metric this run logs; did you mean val/loss?",
    ),
    (
        "early-stopping-no-val",
        None,
        ["early_stopping.enabled=true", "data.val_fraction=0", "checkpoint.enabled=false"],
        "early_stopping.monitor: val/loss needs a validation split, but data.val_fraction=0.0",
    ),
    (
        "plateau-no-val",
        None,
        [
            "scheduler.name=plateau",
            "scheduler.warmup_steps=0",
            "trainer.limit_val_batches=0",
            "checkpoint.enabled=false",
        ],
        "scheduler.name: plateau watches val/loss, but there is no validation split (trainer.limit_val_batches=0)",
    ),
    ("overfit-inf", None, ["trainer.overfit_batches=.inf"], "trainer.overfit_batches: inf is not a finite number"),
    ("limit-val-2.5", None, ["trainer.limit_val_batches=2.5"], "trainer.limit_val_batches: 2.5 is out of range"),
    ("fast-dev-run-minus-1", None, ["trainer.fast_dev_run=-1"], "trainer.fast_dev_run: -1 is out of range"),
    ("tag-int", None, ["name=!!int abc"], "override name: invalid YAML: !!int 'abc' is not an integer"),
    ("tag-bool", None, ["model.bias=!!bool maybe"], "override model.bias: invalid YAML: !!bool 'maybe'"),
    ("tag-timestamp", None, ["name=!!timestamp foo"], "override name: invalid YAML: tag !!timestamp is not allowed"),
    ("tag-python", None, ["name=!!python/object/apply:os.getcwd []"], "tag !!python/object/apply:os.getcwd"),
    ("non-utf8", LATIN1, [], "c.yaml:1: not UTF-8 text (byte 0xe9)"),
    ("nested-file", NESTED, [], "c.yaml:1: invalid YAML: nested more than 64 levels deep"),
    ("nested-override", None, ["name=" + "[" * 3000], "override name: invalid YAML: nested more than 64 levels"),
    ("name-dotdot", None, ["name=../../x"], "name: '../../x' is not a relative path inside output_dir"),
    ("name-absolute", None, ["name=/etc/x"], "name: '/etc/x' is not a relative path inside output_dir"),
    ("home-unknown-user", None, ["output_dir=~nosuchuser_x/runs"], "output_dir: cannot expand '~nosuchuser_x'"),
    ("arch-typo", None, ["model.arch=resnt"], "model.arch: expected one of mlp, skipnet, resmlp, densemlp, resnet"),
    ("lr-find-and-probe", None, ["trainer.lr_find=true", "trainer.lr_probe=[0.1]"], "trainer.lr_find and"),
    ("sweep-key-not-str", None, ["sweep.params={1: [2]}"], "sweep.params: key 1 is not a string"),
    ("override-shape", None, ["model.depth"], "override 'model.depth' must look like dotted.key=value"),
    ("missing-config", None, ["--config", "no_such_config"], "config 'no_such_config' not found"),
    ("argparse", None, ["--resume"], "error: argument --resume: expected one argument"),
    # check_runtime: devices this (CPU-only) machine does not have, combinations Lightning refuses
    ("accelerator-gpu", None, ["trainer.accelerator=gpu"], "error: trainer.accelerator=gpu: no CUDA device is visible"),
    ("accelerator-cuda", None, ["trainer.accelerator=cuda"], "trainer.accelerator=cuda: no CUDA device is visible"),
    ("accelerator-mps", None, ["trainer.accelerator=mps"], "trainer.accelerator=mps: no MPS device is available"),
    (
        "fsdp-cpu",
        None,
        ["trainer.strategy=fsdp"],
        "trainer.strategy=fsdp: needs CUDA devices, but the run uses the CPU",
    ),
    (
        "fp16-cpu",
        None,
        ["trainer.precision=16-mixed"],
        "trainer.precision=16-mixed: float16 mixed precision needs a GPU",
    ),
    ("device-ids-cpu", None, ["trainer.devices=[0]"], "trainer.devices=[0]: device ids need a GPU"),
    (
        "sweep-accelerator-gpu",  # refused before the sweep directory exists
        None,
        ["sweep.params={model.width: [4, 8]}", "trainer.accelerator=gpu"],
        "error: trainer.accelerator=gpu: no CUDA device is visible",
    ),
]
RUNTIME = {"accelerator-gpu", "accelerator-cuda", "accelerator-mps", "fsdp-cpu", "fp16-cpu", "device-ids-cpu"}
RUNTIME |= {"sweep-accelerator-gpu"}


def _argv(tmp_path: Path, text: str | bytes | None, args: list[str]) -> list[str]:
    if args[:1] == ["--resume"] or args[:1] == ["--config"]:
        return args if args[0] == "--config" else ["--config", "mlp", *args]
    if text is None:
        base = ["--config", "mlp"]
    else:
        path = tmp_path / "c.yaml"
        path.write_bytes(text if isinstance(text, bytes) else text.encode())
        base = ["--config", str(path)]
    # output_dir first, so that a case may override it
    return [*base, f"output_dir={tmp_path / 'runs'}", *TINY[1:], *args]


def _assert_one_error_line(err: str, out: str, culprit: str, tmp_path: Path, before: set[str]) -> None:
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), err
    assert culprit in lines[0], lines[0]
    assert "Traceback" not in err + out
    assert not (tmp_path / "runs").exists()  # nothing written
    assert {p.name for p in tmp_path.iterdir()} == before, "something was written in the working directory"


@pytest.mark.parametrize(("case", "text", "args", "culprit"), CASES, ids=[c[0] for c in CASES])
def test_every_family_of_mistake_is_one_error_line(
    case: str,
    text: str | bytes | None,
    args: list[str],
    culprit: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if case in RUNTIME and _cuda_or_mps():
        pytest.skip("needs a machine without CUDA and MPS")
    monkeypatch.chdir(tmp_path)
    argv = _argv(tmp_path, text, args)
    before = {p.name for p in tmp_path.iterdir()}
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code  # type: ignore[assignment]
    captured = capsys.readouterr()
    assert rc == 2, captured
    _assert_one_error_line(captured.err, captured.out, culprit, tmp_path, before)


@pytest.mark.parametrize("case", ["duplicate-section", "non-utf8", "argparse", "accelerator-gpu"])
def test_mistakes_in_a_real_process(case: str, tmp_path: Path) -> None:
    _, text, args, culprit = next(c for c in CASES if c[0] == case)
    if case in RUNTIME and _cuda_or_mps():
        pytest.skip("needs a machine without CUDA and MPS")
    argv = _argv(tmp_path, text, args)
    before = {p.name for p in tmp_path.iterdir()}
    r = run_cli(*argv, cwd=tmp_path)
    assert r.returncode == 2, r
    _assert_one_error_line(r.stderr, r.stdout, culprit, tmp_path, before)
    if case == "accelerator-gpu":  # the exact line the issue asks for
        assert r.stderr.strip() == "error: trainer.accelerator=gpu: no CUDA device is visible"


def test_user_error_messages_are_printed_on_one_line(capsys: pytest.CaptureFixture[str], monkeypatch) -> None:
    import deepnets.cli as cli

    def boom(args: Any) -> int:
        raise UserError("a library's message\nspread over\r\nlines")

    monkeypatch.setattr(cli, "_main", boom)
    assert cli.main(["--config", "mlp"]) == 2
    assert capsys.readouterr().err == "error: a library's message spread over lines\n"


def test_help_examples_are_on_their_own_lines(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert "examples:\n  deepnets --config mlp.yaml\n  deepnets --config resnet model.width=32" in out


# ---------------------------------------------------------------- (c) check_runtime


def _trainer(*overrides: str) -> TrainerConfig:
    return load_config(None, [f"trainer.{o}" for o in overrides]).trainer


@pytest.mark.parametrize(
    ("overrides", "visible", "message"),
    [
        (["accelerator=gpu"], Visible(), "trainer.accelerator=gpu: no CUDA device is visible"),
        (["accelerator=cuda"], Visible(mps=True), "trainer.accelerator=cuda: no CUDA device is visible"),
        (["accelerator=mps"], Visible(cuda=2), "trainer.accelerator=mps: no MPS device is available"),
        (["devices=2"], Visible(cuda=1), "trainer.devices=2: only 1 CUDA device is visible"),
        (["devices=3"], Visible(cuda=2), "trainer.devices=3: only 2 CUDA devices are visible"),
        (["devices=[0, 3]"], Visible(cuda=2), "trainer.devices=[0, 3]: CUDA device 3 does not exist (visible: 0, 1)"),
        (["devices=[0]"], Visible(), "trainer.devices=[0]: device ids need a GPU"),
        (["accelerator=cpu", "devices=[0]"], Visible(cuda=1), "trainer.devices=[0]: device ids need a GPU"),
        (["devices=2"], Visible(mps=True), "trainer.devices=2: an MPS machine has one device"),
        (["strategy=ddp"], Visible(mps=True), "trainer.strategy=ddp: MPS runs on one device only"),
        (["strategy=fsdp"], Visible(), "trainer.strategy=fsdp: needs CUDA devices, but the run uses the CPU"),
        (["strategy=fsdp", "accelerator=cpu"], Visible(cuda=1), "but the run uses the CPU"),
        (["strategy=fsdp", "precision=64"], Visible(cuda=2), "trainer.precision=64: not supported with"),
        (["precision=16-mixed"], Visible(), "trainer.precision=16-mixed: float16 mixed precision needs a GPU"),
        (["precision=16-mixed", "accelerator=cpu"], Visible(cuda=1), "trainer.precision=16-mixed"),
        (["precision=bf16-mixed"], Visible(cuda=1, bf16=False, cuda_name="Tesla P100"), "Tesla P100 has no bfloat16"),
        (["precision=64"], Visible(mps=True), "trainer.precision=64: MPS has no float64"),
    ],
)
def test_check_devices_refuses_what_the_machine_cannot_run(
    overrides: list[str], visible: Visible, message: str
) -> None:
    with pytest.raises(UserError) as err:
        check_devices(_trainer(*overrides), visible)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "visible", "resolved"),
    [
        ([], Visible(), "cpu"),
        ([], Visible(cuda=1), "cuda"),
        ([], Visible(mps=True), "mps"),  # Lightning's order: MPS first
        (["accelerator=gpu"], Visible(cuda=1), "cuda"),
        (["accelerator=gpu"], Visible(mps=True), "mps"),
        (["devices=4", "strategy=ddp"], Visible(), "cpu"),  # CPU "devices" are processes
        (["devices=[1, 0]", "strategy=fsdp", "precision=bf16-mixed"], Visible(cuda=2), "cuda"),
        (["precision=16-mixed"], Visible(cuda=1, bf16=False), "cuda"),
        (["precision=16-mixed"], Visible(mps=True), "mps"),
        (["precision=bf16-mixed"], Visible(), "cpu"),
    ],
)
def test_check_devices_accepts_what_runs(overrides: list[str], visible: Visible, resolved: str) -> None:
    assert check_devices(_trainer(*overrides), visible) == resolved


@pytest.mark.skipif("_cuda_or_mps()", reason="needs a machine without CUDA and MPS")
def test_check_runtime_on_this_cpu_machine(capsys: pytest.CaptureFixture[str]) -> None:
    for bad, message in [
        ("trainer.accelerator=gpu", "trainer.accelerator=gpu: no CUDA device is visible"),
        ("trainer.strategy=fsdp", "trainer.strategy=fsdp: needs CUDA devices"),
        ("trainer.precision=16-mixed", "trainer.precision=16-mixed"),
    ]:
        with pytest.raises(UserError) as err:
            check_runtime(load_config(None, [bad]))
        assert str(err.value).startswith(message)
    for good in ([], ["trainer.devices=2", "trainer.strategy=ddp"], ["trainer.precision=bf16-mixed"]):
        check_runtime(load_config(None, good))
    assert capsys.readouterr() == ("", "")  # the probe Trainer prints nothing


def test_check_runtime_asks_lightning_about_the_rest(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the explicit checks let through, Lightning's own Trainer construction still refuses, as a UserError."""
    monkeypatch.setattr(config_mod, "check_devices", lambda t, visible: "cpu")
    with pytest.raises(UserError, match=r"^trainer: Lightning refuses accelerator=cpu, devices=\[0\], strategy=auto"):
        check_runtime(load_config(None, ["trainer.accelerator=cpu", "trainer.devices=[0]"]))


@pytest.mark.skipif("_cuda_or_mps()", reason="needs a machine without CUDA and MPS")
def test_train_checks_the_runtime_before_writing_anything(tmp_path: Path) -> None:
    from deepnets.run import train

    cfg = load_config(None, [*TINY, f"output_dir={tmp_path / 'runs'}", "trainer.accelerator=cuda"])
    with pytest.raises(UserError, match="trainer.accelerator=cuda: no CUDA device is visible"):
        train(cfg)
    assert not (tmp_path / "runs").exists()
