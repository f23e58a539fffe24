from __future__ import annotations

from pathlib import Path

import pytest

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
        ("optim.name=lbfgs", "optim.name: expected one of sgd, adam, adamw, rmsprop, adagrad, got 'lbfgs'"),
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
    readme = (CONFIGS_DIR.parent / "README.md").read_text()
    missing = [row for row in markdown_table().splitlines() if row not in readme]
    assert not missing, "README config table is stale; regenerate with python -m deepnets.config --markdown"
