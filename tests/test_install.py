"""deepnets installed as users install it: a wheel (not editable) in a fresh venv, run from another directory.

The fresh venv gets the running interpreter's third-party packages (torch, Lightning, ...) through a .pth
line instead of a copy (torch is gigabytes). A plain path line in a .pth file adds the directory to sys.path
but does not run the .pth files inside it, so the editable install of the dev checkout (its finder hook lives
in such a .pth) stays out, and the venv's own site-packages comes first: the wheel's deepnets is the one
imported, which every test here asserts. PYTHONPATH (the test command sets it to the worktree) is dropped for
the same reason.

Also here: how `--config NAME_OR_PATH` resolves (deepnets.config.resolve_config_path) and `--list-configs`.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from pathlib import Path

import pytest

from deepnets.cli import main
from deepnets.config import CONFIGS_DIR, describe_config, load_config, resolve_config_path, shipped_configs
from deepnets.errors import UserError

ROOT = Path(__file__).resolve().parent.parent
SOURCE_CONFIGS = ROOT / "deepnets" / "configs"


def _source_config_files() -> list[str]:
    """Every file in the source configs dir, as a path inside the package (`deepnets/configs/mlp.yaml`)."""
    return sorted(
        f"deepnets/configs/{p.relative_to(SOURCE_CONFIGS).as_posix()}"
        for p in SOURCE_CONFIGS.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts and not p.name.startswith(".") and not p.name.endswith("~")
    )


def _run(cmd: list[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """A subprocess without the test command's PYTHONPATH (which points at the source tree)."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1", PYTHONNOUSERSITE="1")
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def _check(r: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert r.returncode == 0, f"exit {r.returncode}: {r.args}\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}"
    return r


def _source_copy(dest: Path) -> Path:
    """What a build reads (pyproject.toml, README.md, the package), copied: building in the checkout itself
    would leave build/ and *.egg-info there, and two test runs at once would share them."""
    dest.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(ROOT / name, dest / name)
    shutil.copytree(ROOT / "deepnets", dest / "deepnets", ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


@pytest.fixture(scope="module")
def dists(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The wheel (`pip wheel`, as `pip install .` builds it) and the sdist, built from a copy of the source."""
    tmp = tmp_path_factory.mktemp("dists")
    src = _source_copy(tmp / "src")
    out = tmp / "dist"
    # --no-build-isolation: the build backend (setuptools) of this interpreter, no index needed
    _check(_run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index",
                 "-q", "-w", str(out), str(src)], cwd=tmp))  # fmt: skip
    _check(_run([sys.executable, "-c", f"from setuptools import build_meta; build_meta.build_sdist({str(out)!r})"],
                cwd=src))  # fmt: skip
    (wheel,) = out.glob("deepnets-*.whl")
    (sdist,) = out.glob("deepnets-*.tar.gz")
    return {"wheel": wheel, "sdist": sdist, "src": src}


def _fresh_venv(path: Path) -> Path:
    """A venv without pip whose sys.path ends with this interpreter's site-packages; returns its bin/."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(path)], check=True, timeout=120)
    bindir = path / "bin"
    code = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = Path(_check(_run([str(bindir / "python"), "-c", code], cwd=path)).stdout.strip())
    ours = sysconfig.get_paths()
    deps = dict.fromkeys([ours["purelib"], ours["platlib"]])  # the same directory on most systems
    (purelib / "_deepnets_test_deps.pth").write_text("".join(f"{d}\n" for d in deps))
    return bindir


def _pip_into(bindir: Path, *args: str) -> None:
    """This interpreter's pip installing into the fresh venv (`pip --python`: the venv has no pip of its own)."""
    _check(_run([sys.executable, "-m", "pip", "--python", str(bindir / "python"), "install", "--no-deps",
                 "--no-index", "--no-build-isolation", "-q", *args], cwd=bindir))  # fmt: skip


@pytest.fixture(scope="module")
def installed(dists: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """bin/ of a fresh venv with the wheel installed (not editable)."""
    bindir = _fresh_venv(tmp_path_factory.mktemp("wheel") / "venv")
    _pip_into(bindir, str(dists["wheel"]))
    return bindir


def _where(bindir: Path, cwd: Path) -> dict[str, str]:
    code = "import json, deepnets, deepnets.config as c; print(json.dumps([deepnets.__file__, str(c.CONFIGS_DIR)]))"
    module, configs = json.loads(_check(_run([str(bindir / "python"), "-c", code], cwd=cwd)).stdout)
    return {"module": module, "configs": configs}


# ---------------------------------------------------------------- what the wheel and sdist hold
# (a config added to deepnets/configs/ is in them with no other edit: the package-data glob; the test below
# fails for any file the glob misses)


def test_every_source_config_is_in_the_wheel_and_sdist(dists: dict[str, Path]) -> None:
    files = _source_config_files()
    assert "deepnets/configs/mlp.yaml" in files and len(files) >= 10, files
    with zipfile.ZipFile(dists["wheel"]) as z:
        in_wheel = set(z.namelist())
        assert z.read("deepnets/configs/mlp.yaml") == (SOURCE_CONFIGS / "mlp.yaml").read_bytes()
    missing = [f for f in files if f not in in_wheel]
    assert not missing, f"not in the wheel (add a pattern to [tool.setuptools.package-data]): {missing}"
    with tarfile.open(dists["sdist"]) as t:
        prefix = t.getnames()[0].split("/")[0]  # deepnets-0.1.0
        in_sdist = {n.removeprefix(f"{prefix}/") for n in t.getnames()}
    missing = [f for f in files if f not in in_sdist]
    assert not missing, f"not in the sdist: {missing}"


def test_repo_configs_path_is_the_package_data() -> None:
    # `configs/...` (README, scripts, Dockerfile, bench) is a symlink to the package's configs, committed in git
    assert (ROOT / "configs").is_symlink() and os.readlink(ROOT / "configs") == "deepnets/configs"
    assert (ROOT / "configs").resolve() == SOURCE_CONFIGS.resolve() == CONFIGS_DIR
    assert sorted(shipped_configs()) == sorted(p.name for p in SOURCE_CONFIGS.glob("*.yaml"))


# ---------------------------------------------------------------- the installed wheel


def test_installed_wheel_lists_and_loads_configs_from_another_directory(installed: Path, tmp_path: Path) -> None:
    where = _where(installed, tmp_path)
    venv = installed.parent.resolve()
    assert Path(where["module"]).resolve().is_relative_to(venv), where  # the wheel's deepnets, not the checkout
    assert Path(where["configs"]).is_relative_to(venv) and Path(where["configs"], "mlp.yaml").is_file(), where

    r = _check(_run([str(installed / "deepnets"), "--list-configs"], cwd=tmp_path))
    lines = r.stdout.splitlines()
    assert [line.split()[0] for line in lines] == sorted(shipped_configs()), r.stdout
    assert r.stderr == ""

    for name in ("mlp", "mlp.yaml"):
        r = _check(_run([str(installed / "deepnets"), "--config", name, "--print-config"], cwd=tmp_path))
        assert "name: mlp\n" in r.stdout and "arch: mlp\n" in r.stdout
    r = _run([str(installed / "deepnets"), "--config", "mpl"], cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == "", r
    assert r.stderr.splitlines() == [r.stderr.strip()] and "did you mean mlp.yaml?" in r.stderr, r.stderr
    assert not list(tmp_path.iterdir()), "nothing is written for a config that fails"


@pytest.mark.slow
def test_installed_wheel_trains_a_shipped_config(installed: Path, tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    overrides = ["trainer.max_epochs=1", "model.depth=1", "model.width=16", "trainer.progress_bar=false",
                 "trainer.accelerator=cpu", "trainer.devices=1", "trainer.threads=1", f"output_dir={runs}"]  # fmt: skip
    r = _check(_run([str(installed / "deepnets"), "--config", "mlp.yaml", *overrides], cwd=tmp_path))
    run_dir = runs / "mlp" / "version_0"
    assert f"completed: {run_dir}" in r.stdout, r.stdout
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["status"] == "completed" and metrics["epochs"] == 1, metrics
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    # the resolved config is the shipped mlp.yaml with the overrides (digits, its optimiser, ...)
    shipped = load_config(str(SOURCE_CONFIGS / "mlp.yaml"), overrides)
    assert load_config(str(run_dir / "config.yaml")) == shipped


@pytest.mark.slow
def test_editable_install_finds_the_configs_in_the_source_tree(dists: dict[str, Path], tmp_path: Path) -> None:
    # `pip install -e .` (the README's quick start, .ci/run): CONFIGS_DIR is the checkout's deepnets/configs
    bindir = _fresh_venv(tmp_path / "venv")
    _pip_into(bindir, "-e", str(dists["src"]))
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    where = _where(bindir, elsewhere)
    assert Path(where["module"]) == dists["src"] / "deepnets" / "__init__.py", where
    assert Path(where["configs"]) == (dists["src"] / "deepnets" / "configs").resolve(), where
    r = _check(_run([str(bindir / "deepnets"), "--config", "resnet", "--print-config"], cwd=elsewhere))
    assert "name: resnet\n" in r.stdout


# ---------------------------------------------------------------- --list-configs


def test_list_configs_is_one_line_per_shipped_config(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-configs"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    lines = out.splitlines()
    shipped = shipped_configs()
    assert len(lines) == len(shipped) >= 10
    for line, (name, path) in zip(lines, shipped.items(), strict=True):
        assert line.split("  ", 1)[0] == name
        assert line[len(name) :].strip() == describe_config(path)
        assert describe_config(path), f"{name}: starts without a comment line (its --list-configs description)"
    assert "mlp.yaml" in out and "A sensible ReLU MLP on scikit-learn's bundled 8x8 digits (offline)." in out


def test_list_configs_takes_no_other_arguments(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--list-configs", "--config", "mlp"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err == "error: --list-configs takes no other arguments (got --config)\n"


def test_list_configs_to_a_closed_pipe_or_a_full_disk(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "deepnets.cli", "--list-configs"]
    # the reader is gone before the listing is written (`deepnets --list-configs | head -0`): no traceback
    with subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=tmp_path) as proc:
        proc.stdout.close()
        err = proc.stderr.read()
    assert proc.returncode == 0 and err == b"", err
    if Path("/dev/full").exists():
        with open("/dev/full", "w") as full:
            r = subprocess.run(cmd, stdout=full, stderr=subprocess.PIPE, text=True, cwd=tmp_path, timeout=60)
        assert r.returncode == 2
        assert r.stderr == "error: cannot write the list of configs to stdout: No space left on device\n"


@pytest.mark.parametrize(
    ("first_line", "description"),
    [
        ("# A sensible MLP (offline).\n", "A sensible MLP (offline)."),
        ("# Dense MLP on digits: inside a block each layer reads the concatenation of\n", "Dense MLP on digits"),
        ("# a line that runs on\n", "a line that runs on ..."),
        ("\ufeff# with a BOM.\n", "with a BOM."),
        ("name: x\n", ""),
        ("#\n", ""),
    ],
)
def test_describe_config(tmp_path: Path, first_line: str, description: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(f"{first_line}name: x\n", encoding="utf-8")
    assert describe_config(path) == description


# ---------------------------------------------------------------- config names (a hostile pass)


def _error(name: str) -> str:
    with pytest.raises(UserError) as e:
        resolve_config_path(name)
    assert "\n" not in str(e.value)
    return str(e.value)


def test_shipped_names_resolve_from_any_directory(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert resolve_config_path("mlp") == resolve_config_path("mlp.yaml") == CONFIGS_DIR / "mlp.yaml"
    (tmp_path / "resnet").mkdir()  # a directory of the user's, named like a shipped config, is not in the way
    assert resolve_config_path("resnet") == CONFIGS_DIR / "resnet.yaml"
    (tmp_path / "mlp.yaml").write_text("name: mine\n")  # a file here is a path: it wins over the shipped name
    assert load_config("mlp.yaml").name == "mine"
    assert load_config("mlp").name == "mlp"
    link = tmp_path / "linked.yaml"
    link.symlink_to(CONFIGS_DIR / "densenet.yaml")  # a symlink to a file is that file
    assert load_config("linked.yaml").name == "densenet"


def test_unknown_names_get_did_you_mean(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert _error("mpl") == (
        "config 'mpl' not found (no such file, nor a shipped config); did you mean mlp.yaml? "
        "(deepnets --list-configs shows the shipped configs)"
    )
    assert "did you mean resnet.yaml?" in _error("RESNET")
    assert "did you mean resnet.yaml?" in _error("resnet.yml")
    assert _error("nope").endswith("; deepnets --list-configs shows the shipped configs")
    # the repo's path from another directory: the name that works
    assert _error("configs/mlp.yaml") == (
        "config 'configs/mlp.yaml' not found (no such file); the shipped mlp.yaml is found by name from any "
        "directory: --config mlp.yaml"
    )
    assert _error("my/own.yaml") == "config 'my/own.yaml' not found (no such file)"


def test_names_cannot_reach_outside_the_shipped_configs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    # joined to CONFIGS_DIR these would be package files (deepnets/config.py, pyproject.toml in a checkout)
    for name in ("../config.py", "../__init__.py", "../../pyproject.toml", "../configs/mlp.yaml"):
        assert not (tmp_path / name).exists()
        assert "not found (no such file)" in _error(name)
    assert _error(".") == "config '.' is a directory, not a config file"
    assert _error("..") == "config '..' is a directory, not a config file"
    assert _error(str(CONFIGS_DIR)).endswith("is a directory, not a config file")
    assert _error("/dev/null") == "config '/dev/null' is a device, FIFO or socket, not a config file"
    assert _error("").startswith("--config is empty")
    # an absolute path is a path: it is read (and must then be a valid config)
    assert resolve_config_path(str(CONFIGS_DIR / "mlp.yaml")) == CONFIGS_DIR / "mlp.yaml"


def test_broken_symlinks_and_odd_bytes_are_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "mlp.yaml").symlink_to("gone.yaml")  # dangling, named like a shipped config
    assert _error("mlp.yaml") == (
        "config 'mlp.yaml' is a symlink to 'gone.yaml', which does not resolve to a file, not a config file"
    )  # not a silent fall-back to the shipped mlp.yaml
    (tmp_path / "loop.yaml").symlink_to("loop.yaml")
    assert "which does not resolve to a file" in _error("loop.yaml")
    assert "not found" in _error("mlp\0.yaml")  # argv never holds a NUL; the Python API may
    assert "File name too long" in _error("x" * 5000)
    odd = os.fsdecode(b"caf\xe9\xff.yaml")  # not UTF-8: argv gives lone surrogates
    assert _error(odd) == (
        "config 'caf\\udce9\\udcff.yaml' not found (no such file, nor a shipped config); "
        "deepnets --list-configs shows the shipped configs"
    )
    (tmp_path / odd).write_bytes(b"name: odd\n")  # the file of that byte name exists: it is read
    assert os.fsencode(odd) in os.listdir(os.fsencode(tmp_path))
    assert load_config(odd).name == "odd"


def test_cli_config_errors_are_one_line_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                               monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    monkeypatch.chdir(tmp_path)
    for args in (["--config", "mpl"], ["--config", "."], ["--config", ""], ["--config", "../x.yaml"]):
        assert main(args) == 2, args
        out, err = capsys.readouterr()
        assert out == "", out
        assert err.startswith(("error: config ", "error: --config is empty")) and err.count("\n") == 1, err
    assert not list(tmp_path.iterdir())
