"""Run directories: fresh numbered ones (`version_<n>`, `sweep_<n>`) that are never reused, the lock that
gives one of them to one process at a time, and the files written into them atomically."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
from pathlib import Path
from typing import Any

from deepnets.errors import UserError

LOCK = ".lock"  # holds the owner's pid and host while a run writes into the directory
# Temp files of atomic writes (`.last.ckpt.<random>.tmp`, `.metrics.json.tmp`): a process killed while
# writing leaves them behind; the next owner of the directory removes them.
TMP_GLOBS = (".*.tmp", "checkpoints/.*.tmp")
# Writes that fail because the disk (or the process's file-size limit, or a quota) is full.
FULL = (errno.ENOSPC, errno.EFBIG, errno.EDQUOT)


def check_writable(path: str | Path, key: str = "output_dir") -> None:
    """Fail now, without writing anything, if directories cannot be created under `path`.

    The nearest existing ancestor must be a writable directory; the run directory itself is made
    only once the config, data and model are known to be good.
    """
    path = Path(path).absolute()
    probe = path
    while not probe.exists():
        probe = probe.parent
    if not probe.is_dir():
        raise UserError(f"{key} {path} is not writable: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UserError(f"{key} {path} is not writable: Permission denied ({probe})")


def next_dir(parent: str | Path, prefix: str = "version", key: str = "output_dir") -> Path:
    """Create and return `<parent>/<prefix>_<n>/` with the next free n.

    mkdir without exist_ok is the lock: two processes racing for the same n get
    different directories. A write probe makes an unwritable location fail here,
    before any work starts; the error names the config key (or flag) `key`.
    """
    parent = Path(parent)
    try:
        parent.mkdir(parents=True, exist_ok=True)
        cut = len(prefix) + 1
        taken = [int(p.name[cut:]) for p in parent.glob(f"{prefix}_*") if p.name[cut:].isdigit()]
        n = max(taken, default=-1) + 1
        while True:
            try:
                (parent / f"{prefix}_{n}").mkdir()
                break
            except FileExistsError:
                n += 1
        path = parent / f"{prefix}_{n}"
        probe = path / ".write_test"
        probe.write_text("")
        probe.unlink()
    except OSError as e:
        raise UserError(f"{key} {parent.parent} is not writable: {e.strerror or e}") from None
    return path


class RunLock:
    """`<run_dir>/.lock`, held with `flock` while one process writes into the run directory.

    The kernel drops a flock when its process dies, however it dies, so a lock left by a killed run
    is free and simply taken over; the pid inside is only there to name the holder. The file is
    removed on release while still locked, so an acquirer checks that the file it locked is still
    the one at the path (else it locked a removed file and tries again).
    """

    def __init__(self, run_dir: Path) -> None:
        self.path = run_dir / LOCK
        self._fd: int | None = None

    def acquire(self) -> None:
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                holder = os.read(fd, 200).decode(errors="replace").strip() or "a process that is starting"
                os.close(fd)
                raise UserError(
                    f"{self.path.parent} is in use by another run ({holder}); wait for it to end, "
                    "or start a new run (without --resume)"
                ) from None
            try:
                same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
            except FileNotFoundError:
                same = False
            if same:
                break
            os.close(fd)  # released and removed between our open and flock: lock the new file
        os.ftruncate(fd, 0)
        os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
        self._fd = fd

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


def remove_stale_temps(run_dir: Path) -> list[Path]:
    """Delete the temp files of interrupted atomic writes. Only the lock holder may call this."""
    removed = []
    for pattern in TMP_GLOBS:
        for p in run_dir.glob(pattern):
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
                removed.append(p)
    return removed


def write_json_atomic(path: Path, payload: dict[str, Any]) -> None:
    """Write `path` through a temp file and a rename: readers see the old file or the new one, never a
    part; a failed write (a full disk) removes its temp file and raises a UserError naming `path`."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "w") as f:
            f.write(json.dumps(payload, indent=2, sort_keys=True) + "\n")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(f"cannot write {path}: {e.strerror or e}") from None


def read_json(path: Path) -> dict[str, Any] | None:
    """`path` as a JSON object, or None when it is missing or not one (a record we cannot trust)."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
