"""Result tables as CSV (full precision) and markdown, for sweeps, `deepnets compare` and the experiments."""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def fmt(v: Any) -> str:
    """Table cell text: floats in 4 significant digits, scientific when tiny or huge (1e-10 is never 0)."""
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def write_table(rows: Sequence[Mapping[str, Any]], path_stem: str | os.PathLike[str]) -> str:
    """`rows` to `<stem>.csv` (full precision) and `<stem>.md`; returns the markdown."""
    stem = Path(path_stem)
    cols = list(dict.fromkeys(k for r in rows for k in r))  # union of keys, first-seen order
    with open(stem.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols)
        w.writeheader()
        w.writerows(rows)
    esc = lambda v: fmt(v).replace("|", "\\|")  # noqa: E731  # a "|" in a cell would split it
    lines = ["| " + " | ".join(c.replace("|", "\\|") for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(esc(r.get(c, "")) for c in cols) + " |" for r in rows]
    md = "\n".join(lines) + "\n"
    stem.with_suffix(".md").write_text(md)
    return md
