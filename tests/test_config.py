from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml

from deepnets.config import CONFIGS_DIR, Config, load_config, markdown_table, parse_yaml, to_yaml
from deepnets.errors import UserError
from tests.conftest import run_cli


def test_scientific_notation_is_a_float() -> None:
    assert parse_yaml("lr: 1e-3", "x") == {"lr": 0.001}
    assert parse_yaml("a: 5E+2\nb: -2e4\nc: 1.5", "x") == {"a": 500.0, "b": -20000.0, "c": 1.5}
    cfg = load_config(None, ["optim.lr=1e-3"])
    assert cfg.optim.lr == pytest.approx(1e-3) and isinstance(cfg.optim.lr, float)


def test_python_tags_are_refused_and_never_run(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"name: !!python/object/apply:os.system ['touch {marker}']\n")
    with pytest.raises(UserError, match=r"bad.yaml:1: invalid YAML.*python/object/apply:os.system"):
        load_config(str(bad))
    assert not marker.exists()


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.widht=3", "unknown key model.widht; did you mean model.width?"),
        ("optim.lrr=0.1", "unknown key optim.lrr; did you mean optim.lr?"),
        ("optim.lr=-1", "optim.lr: -1.0 is out of range (allowed: > 0)"),
        ("model.dropout=1.0", "model.dropout: 1.0 is out of range (allowed: >= 0 and < 1)"),
        ("model.depth=0", "model.depth: 0 is out of range (allowed: >= 1)"),
        ("optim.name=lbfgs", "optim.name: 'lbfgs' is not an optimizer; did you mean LBFGS? (allowed: sgd,"),
        ("model.depth=two", "model.depth: expected int, got 'two'"),
        ("trainer.precision=8", "trainer.precision: expected one of 32, bf16-mixed, 16-mixed, 64, got 8"),
        ("data=3", "data must be a mapping"),
        ("optim.betas=[0.9, x]", "optim.betas: expected list[float]"),
    ],
)
def test_bad_values_name_the_key(override: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert message in str(err.value)


def test_types_are_coerced_and_defaults_filled() -> None:
    cfg = load_config(None, ["trainer.precision=32", "optim.momentum=0", "model.width=[8, 16]", "model.depth=2"])
    assert cfg.trainer.precision == "32"
    assert cfg.optim.momentum == 0.0 and isinstance(cfg.optim.momentum, float)
    assert cfg.model.width == [8, 16]
    assert cfg.data.name == "digits"  # default: offline data


def test_config_names_resolve_to_configs_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # no configs/ here: falls back to the package's
    assert load_config("mlp").name == "mlp"
    assert load_config("mlp.yaml").name == "mlp"
    with pytest.raises(UserError, match="config 'nope' not found"):
        load_config("nope")


def test_round_trip_through_yaml(tmp_path: Path) -> None:
    cfg = load_config("mlp", ["optim.lr=1e-4"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg


def test_every_key_is_documented() -> None:
    table = markdown_table()
    cfg = Config().to_dict()
    for section, value in cfg.items():
        keys = [f"{section}.{k}" for k in value] if isinstance(value, dict) else [section]
        for key in keys:
            row = next(line for line in table.splitlines() if line.startswith(f"| `{key}`"))
            assert row.rstrip(" |").split("|")[-1].strip(), f"{key} has no documentation"


def test_shipped_configs_validate() -> None:
    configs = sorted(CONFIGS_DIR.glob("*.yaml"))
    assert configs
    for path in configs:
        load_config(str(path))


def test_cli_errors_are_one_line_exit_2(tmp_path: Path) -> None:
    r = run_cli("--config", "mlp", "model.widht=3")
    assert r.returncode == 2
    assert r.stderr.strip().splitlines() == ["error: unknown key model.widht; did you mean model.width?"]
    assert "Traceback" not in r.stderr
    r = run_cli("--config", "mlp", "--print-config", "optim.lr=1e-2")
    assert r.returncode == 0
    assert parse_yaml(r.stdout, "stdout")["optim"]["lr"] == 0.01


def test_readme_config_table_is_current() -> None:
    readme = (CONFIGS_DIR.parent.parent / "README.md").read_text()
    missing = [row for row in markdown_table().splitlines() if row not in readme]
    assert not missing, "README config table is stale; regenerate with python -m deepnets.config --markdown"


# ---------------------------------------------------------------- YAML 1.2


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("1:20", "1:20"),  # YAML 1.1: 80 (base 60)
        ("0100", 100),  # YAML 1.1: 64 (octal)
        ("0o17", 15),
        ("0x1f", 31),
        ("-12", -12),
        ("+7", 7),
        ("1_000", "1_000"),  # YAML 1.1: 1000
        ("1e5", 100000.0),
        ("1.5e-3", 0.0015),
        (".5", 0.5),
        ("5.", 5.0),
        ("-.inf", -math.inf),
        ("yes", "yes"),  # YAML 1.1: True
        ("on", "on"),
        ("n", "n"),
        ("True", True),
        ("false", False),
        ("~", None),
        ("null", None),
        ("", None),
        ("2020-01-01", "2020-01-01"),  # YAML 1.1: a date
        ("2020-13-45", "2020-13-45"),  # YAML 1.1 (PyYAML): ValueError
        ("=", "="),  # PyYAML: an unconstructable !!value
        ("!!str 12", "12"),
        ("!!int 0x10", 16),
        ("!!float 3", 3.0),
        ("[1, 0100, 1:20]", [1, 100, "1:20"]),
    ],
)
def test_scalars_are_read_as_yaml_1_2_core(text: str, value: object) -> None:
    got = parse_yaml(text, "x")
    assert got == value and type(got) is type(value)


def test_nan_is_a_float_and_refused_by_float_fields() -> None:
    assert math.isnan(parse_yaml(".nan", "x"))
    with pytest.raises(UserError, match=r"^optim\.lr: nan is not a finite number \(allowed: > 0\)$"):
        load_config(None, ["optim.lr=.nan"])


def test_yaml_1_1_readings_never_reach_a_config() -> None:
    assert load_config(None, ["model.width=0100"]).model.width == 100
    with pytest.raises(UserError, match=r"model\.depth: expected int, got '1:20' \(YAML 1\.2 numbers"):
        load_config(None, ["model.depth=1:20"])
    with pytest.raises(UserError, match=r"model\.bias: expected bool, got 'yes' \(YAML 1\.2: only true and false"):
        load_config(None, ["model.bias=yes"])
    assert load_config(None, ["name=2020-13-45"]).name == "2020-13-45"


def test_shipped_configs_read_the_same_as_under_yaml_1_1() -> None:
    """The 1.2 reading changes no value of a shipped config (same values, same types)."""
    for path in sorted(CONFIGS_DIR.glob("*.yaml")):
        text = path.read_text()
        assert repr(parse_yaml(text, str(path))) == repr(yaml.safe_load(text)), path.name


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (
            "model:\n  depth: 2\nmodel:\n  depth: 3\n",
            r"c\.yaml:3: invalid YAML: duplicate key 'model' \(first at line 1\)",
        ),
        (
            "model:\n  depth: 2\n  width: 8\n  depth: 3\n",
            r"c\.yaml:4: invalid YAML: duplicate key 'depth' \(first at line 2\)",
        ),
        (
            "sweep:\n  params: {model.width: [1], model.width: [2]}\n",
            r"c\.yaml:2: invalid YAML: duplicate key 'model\.width'",
        ),
        ("name: !!timestamp 2020-01-01\n", r"c\.yaml:1: invalid YAML: tag !!timestamp is not allowed"),
        ("name: !!binary aGk=\n", r"c\.yaml:1: invalid YAML: tag !!binary is not allowed"),
        ("model:\n  depth: !!int abc\n", r"c\.yaml:2: invalid YAML: !!int 'abc' is not an integer"),
        ("model:\n  bias: !!bool maybe\n", r"c\.yaml:2: invalid YAML: !!bool 'maybe' is not a boolean"),
        ("base: &b {depth: 2}\nmodel:\n  <<: *b\n", r"c\.yaml:3: invalid YAML: merge keys \(<<\) are YAML 1\.1"),
        ("name: &a [*a]\n", r"c\.yaml: a value contains itself \(recursive alias\)"),
        ("name: " + "[" * 3000 + "\n", r"c\.yaml:1: invalid YAML: nested more than 64 levels deep"),
        ("name: x\n\tseed: 1\n", r"c\.yaml:2: invalid YAML: "),
        ("- 1\n- 2\n", r"c\.yaml: the top level must be a mapping of sections, got \[1, 2\]"),
        ('name: "\\ud800"\n', r"c\.yaml: the string '\\ud800' is not valid Unicode"),
    ],
)
def test_config_file_problems_name_the_file_and_line(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(UserError, match=message) as err:
        load_config(str(path))
    assert "\n" not in str(err.value)


def test_billion_laughs_stops_early(tmp_path: Path) -> None:
    lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 9)]
    path = tmp_path / "c.yaml"
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(UserError, match=r"c\.yaml: more than 100,000 values after expanding aliases"):
        load_config(str(path))


def test_non_utf8_and_huge_files_are_named(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes("name: run\n# caf\xe9\n".encode("latin-1"))
    with pytest.raises(UserError, match=r"latin1\.yaml:2: not UTF-8 text \(byte 0xe9\); save the file as UTF-8"):
        load_config(str(path))
    bom = tmp_path / "bom.yaml"
    bom.write_bytes(b"\xef\xbb\xbfname: bom\n")  # a UTF-8 BOM is fine
    assert load_config(str(bom)).name == "bom"
    big = tmp_path / "big.yaml"
    big.write_bytes(b"#" * (2 << 20))
    with pytest.raises(UserError, match=r"big\.yaml: 2,097,152 bytes is too large for a config file"):
        load_config(str(big))


# ---------------------------------------------------------------- ranges, paths, round trips


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("model.width=0", "model.width: 0 is out of range (allowed: >= 1)"),
        ("model.width=-5", "model.width: -5 is out of range (allowed: >= 1)"),
        ("model.width=[0]", "model.width[0]: 0 is out of range (allowed: >= 1)"),
        ("model.width=[8, -8, 8]", "model.width[1]: -8 is out of range (allowed: >= 1)"),
        ("model.width=[]", "model.width: [] is empty (allowed: at least 1 value)"),
        ("model.stage_depths=[2, 0]", "model.stage_depths[1]: 0 is out of range (allowed: >= 1)"),
        ("data.input_shape=[0]", "data.input_shape[0]: 0 is out of range (allowed: >= 1)"),
        ("data.input_shape=[]", "data.input_shape: [] is empty"),
        ("optim.lr=.inf", "optim.lr: inf is not a finite number (allowed: > 0)"),
        ("optim.eps=.inf", "optim.eps: inf is not a finite number (allowed: > 0)"),
        ("optim.weight_decay=.inf", "optim.weight_decay: inf is not a finite number (allowed: >= 0)"),
        ("optim.layer_decay=-0.5", "optim.layer_decay: -0.5 is out of range (allowed: >= 0)"),
        ("optim.layer_decay=[0.1, -1]", "optim.layer_decay[1]: -1.0 is out of range (allowed: >= 0)"),
        ("optim.betas=[0.9]", "optim.betas: [0.9] has 1 value (allowed: exactly 2)"),
        ("optim.betas=[0.9, 1.0]", "optim.betas[1]: 1.0 is out of range (allowed: >= 0 and < 1)"),
        ("logging.exploding_norm=.inf", "logging.exploding_norm: inf is not a finite number (allowed: > 0)"),
        ("trainer.max_epochs=0", "trainer.max_epochs: 0 is out of range (allowed: -1 for no limit, or >= 1)"),
        ("trainer.max_steps=0", "trainer.max_steps: 0 is out of range (allowed: -1 for no limit, or >= 1)"),
        ("trainer.max_epochs=-2", "trainer.max_epochs: -2 is out of range"),
        ("seed=-1", "seed: -1 is out of range (allowed: >= 0 and <= 4294967295)"),
        ("seed=4294967296", "seed: 4294967296 is out of range (allowed: >= 0 and <= 4294967295)"),
        ("data.split_seed=99999999999", "data.split_seed: 99999999999 is out of range"),
        ("trainer.devices=-1", "trainer.devices: -1 is out of range (allowed: auto, an int >= 1, or a non-empty"),
        ("trainer.devices=0", "trainer.devices: 0 is out of range"),
        ("trainer.devices=[]", "trainer.devices: [] is not a valid device list"),
        ("trainer.devices=[0, 0]", "trainer.devices: [0, 0] is not a valid device list"),
        ("trainer.devices=[-1]", "trainer.devices: [-1] is not a valid device list"),
        ("trainer.devices=banana", "trainer.devices: expected auto or int or list[int], got 'banana'"),
        ("trainer.overfit_batches=.inf", "trainer.overfit_batches: inf is not a finite number (allowed: an int >= 0,"),
        ("trainer.limit_val_batches=2.5", "trainer.limit_val_batches: 2.5 is out of range (allowed: an int >= 0, or a"),
        ("trainer.limit_val_batches=-1", "trainer.limit_val_batches: -1 is out of range"),
        ("trainer.fast_dev_run=-1", "trainer.fast_dev_run: -1 is out of range (allowed: >= 1)"),
        ("trainer.fast_dev_run=0", "trainer.fast_dev_run: 0 is out of range (allowed: >= 1)"),
        ("trainer.lr_probe=[]", "trainer.lr_probe: [] is empty"),
        ("trainer.lr_probe=[0.1, .inf]", "trainer.lr_probe[1]: inf is not a finite number (allowed: > 0)"),
        ("trainer.threads=0", "trainer.threads: 0 is out of range (allowed: >= 1 and <= 1024)"),
        ("model.depth=9223372036854775808", "model.depth: 9223372036854775808 does not fit in 64 bits"),
        (
            "model.arch=resnt",
            "model.arch: expected one of mlp, skipnet, resmlp, densemlp, resnet, densenet, "
            "got 'resnt'; did you mean resnet?",
        ),
        ("optim.name=adamm", "did you mean adam?"),
        ("name=1e5", "name: expected str, got 100000.0 (quote it to keep it a string)"),
        ("name=../../x", "name: '../../x' is not a relative path inside output_dir"),
        ("name=/etc/x", "name: '/etc/x' is not a relative path inside output_dir"),
        ("name=a//b", "name: 'a//b' is not a relative path"),
        ("name=a/", "name: 'a/' is not a relative path"),
        ("name=./a", "name: './a' is not a relative path"),
        ("name=~/a", "name: '~/a' is not a relative path"),
        ("name=''", "name: '' is not a relative path"),
        ('name="a\\nb"', "name: 'a\\nb' is not a relative path"),
        ("name=" + "x" * 256, "is longer than 255 bytes"),
        ("output_dir=''", "output_dir: '' is not a path"),
        ('output_dir="~a\\nb/x"', "output_dir: cannot expand '~a\\nb'"),
        ("output_dir=~no_such_user_x/runs", "output_dir: cannot expand '~no_such_user_x' (no such user"),
        ("sweep.params={1: [2]}", "sweep.params: key 1 is not a string"),
        ("model..depth=2", "override 'model..depth=2' must look like dotted.key=value"),
        ("model.depth=[[[", "override model.depth: invalid YAML:"),
        ("model.depth=" + "[" * 3000, "override model.depth: invalid YAML: nested more than 64 levels deep"),
    ],
)
def test_values_are_checked_at_load(override: str, message: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, [override])
    assert message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["checkpoint.monitor=val/ac"],
            "checkpoint.monitor: 'val/ac' is not a metric this run logs; did you mean "
            "val/acc? (allowed: train/loss, train/acc, val/loss, val/acc)",
        ),
        (["checkpoint.monitor=test/acc"], "checkpoint.monitor: 'test/acc' is not a metric this run logs"),
        (
            ["early_stopping.enabled=true", "early_stopping.monitor=val_loss"],
            "early_stopping.monitor: 'val_loss' is not a metric this run logs; did you mean val/loss?",
        ),
        (
            ["data.val_fraction=0"],
            "checkpoint.monitor: val/acc needs a validation split, but data.val_fraction=0.0 "
            "(allowed without one: train/loss, train/acc)",
        ),
        (
            ["trainer.limit_val_batches=0"],
            "checkpoint.monitor: val/acc needs a validation split, but trainer.limit_val_batches=0",
        ),
        (
            ["trainer.max_epochs=2", "trainer.check_val_every_n_epoch=3"],
            "checkpoint.monitor: val/acc needs a "
            "validation split, but trainer.check_val_every_n_epoch=3 > trainer.max_epochs=2",
        ),
        (
            ["checkpoint.enabled=false", "data.val_fraction=0", "early_stopping.enabled=true"],
            "early_stopping.monitor: val/loss needs a validation split, but data.val_fraction=0.0",
        ),
        (
            ["checkpoint.enabled=false", "data.val_fraction=0", "scheduler.name=plateau"],
            "scheduler.name: plateau watches val/loss, but there is no validation split (data.val_fraction=0.0)",
        ),
        (
            ["scheduler.name=plateau", "scheduler.warmup_steps=5"],
            "scheduler.warmup_steps: not supported with scheduler.name=plateau",
        ),
        (
            ["scheduler.name=onecycle", "trainer.max_epochs=-1"],
            "scheduler.name: onecycle needs the length of the run; set trainer.max_epochs or trainer.max_steps",
        ),
        (["trainer.lr_find=true", "trainer.lr_probe=[0.1]"], "trainer.lr_find and trainer.lr_probe both set"),
        (
            ["checkpoint.monitor=val/loss"],  # checkpoint.mode's default is max: the worst checkpoint would be kept
            "checkpoint.mode: max with checkpoint.monitor=val/loss would keep the worst value (lower is better); "
            "set checkpoint.mode=min",
        ),
        (
            ["early_stopping.enabled=true", "early_stopping.monitor=val/acc"],
            "early_stopping.mode: min with early_stopping.monitor=val/acc would keep the worst value (higher is "
            "better); set early_stopping.mode=max",
        ),
    ],
)
def test_cross_field_checks(overrides: list[str], message: str) -> None:
    with pytest.raises(UserError) as err:
        load_config(None, overrides)
    assert message in str(err.value)


def test_cross_field_checks_allow_what_runs() -> None:
    # no validation split: fine when nothing watches a val/ metric
    load_config(None, ["data.val_fraction=0", "checkpoint.monitor=train/loss", "checkpoint.mode=min"])
    load_config(None, ["data.val_fraction=0", "checkpoint.enabled=false"])
    load_config(
        None,
        [
            "trainer.limit_val_batches=0",
            "checkpoint.enabled=false",
            "early_stopping.enabled=true",
            "early_stopping.monitor=train/loss",
        ],
    )
    load_config(None, ["checkpoint.enabled=false", "checkpoint.monitor=whatever"])  # off: not checked
    load_config(None, ["trainer.max_epochs=-1", "trainer.max_steps=100", "scheduler.name=cosine"])
    load_config(None, ["trainer.max_epochs=-1", "scheduler.name=step"])
    cfg = load_config(None, ["trainer.devices=[0, 1]", "trainer.overfit_batches=0.5", "trainer.limit_val_batches=3"])
    assert cfg.trainer.devices == [0, 1] and cfg.trainer.overfit_batches == 0.5 and cfg.trainer.limit_val_batches == 3


def test_home_is_expanded_once_at_load(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = load_config(None, ["output_dir=~/runs", "data.root=~/data"])
    assert cfg.output_dir == f"{tmp_path}/runs" and cfg.data.root == f"{tmp_path}/data"
    assert f"output_dir: {tmp_path}/runs" in to_yaml(cfg)  # config.yaml records the real path
    assert load_config(None, ["output_dir=runs/~x"]).output_dir == "runs/~x"  # only a leading ~ is a home


@pytest.mark.parametrize(
    "text",
    [
        "1e5",
        "0o17",
        "0x1F",
        "1:20",
        "0100",
        "yes",
        "null",
        "~",
        "true",
        "2020-01-01",
        ".inf",
        "-1",
        "1_000",
        "=",
        "<<",
        "a: b",
        "- x",
        "#x",
        " padded ",
        "'q'",
        "é",
    ],
)
def test_to_yaml_round_trips_strings_that_look_like_other_things(tmp_path: Path, text: str) -> None:
    cfg = load_config(None, [f"early_stopping.monitor={json.dumps(text)}"])  # unchecked while disabled
    assert cfg.early_stopping.monitor == text
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert load_config(str(path)) == cfg
    name = load_config(None, [f"name={json.dumps('1e5')}"])
    path.write_text(to_yaml(name))
    assert load_config(str(path)).name == "1e5"


def test_to_yaml_writes_sections_in_block_style() -> None:
    text = to_yaml(load_config("mlp"))
    assert "model:\n  arch: mlp\n" in text
    for line in text.splitlines():
        assert not line.rstrip().endswith(("{", "}")) or line.endswith(": {}"), line  # no flow mappings
    assert "  betas: [0.9, 0.999]\n" in text  # short lists stay on one line


def test_readme_error_examples_are_true(capsys: pytest.CaptureFixture[str]) -> None:
    from deepnets.cli import main

    readme = (CONFIGS_DIR.parent.parent / "README.md").read_text()
    examples = re.findall(r"^\$ python train\.py (--config mlp [^\n]+)\n(error: [^\n]+)$", readme, re.M)
    assert len(examples) >= 2
    for command, error in examples:
        if "data.name=" in command:
            continue  # needs the data files to be absent: tests/test_data.py
        assert main(command.split()) == 2
        assert capsys.readouterr().err.strip() == error


def test_control_characters_and_home_in_config_paths(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("name: x\nseed: \x01\n")
    with pytest.raises(UserError, match=r"c\.yaml:2: invalid YAML: character #x0001 is not allowed$"):
        load_config(str(path))
    with pytest.raises(UserError, match=r"^override name: invalid YAML: character #x0000 is not allowed$"):
        load_config(None, ["name=a\0b"])
    path.write_text("name: home\n")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert load_config("~/c.yaml").name == "home"


def test_cli_expands_home_in_path_flags(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    import deepnets.run
    from deepnets.cli import main

    seen: list[str | None] = []

    def fake_train(cfg: Config, resume: str | None = None) -> deepnets.run.RunResult:
        seen.append(resume)
        return deepnets.run.RunResult(None, "completed")

    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.setattr(deepnets.run, "train", fake_train)
    assert main(["--config", "mlp", "--resume=~/x/last.ckpt"]) == 0
    assert main(["--config", "mlp", "--resume", "last"]) == 0
    assert seen == [f"{tmp_path}/x/last.ckpt", "last"]
