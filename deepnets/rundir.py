"""Fresh numbered directories (`version_<n>`, `sweep_<n>`) that are never reused."""

from __future__ import annotations

from pathlib import Path

from deepnets.errors import UserError


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
