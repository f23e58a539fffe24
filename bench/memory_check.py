"""What `deepnets.memory.check_fits` costs at the start of a run, per shipped config (median of rounds).

    python bench/memory_check.py            # 5 rounds
    python bench/memory_check.py --quick    # 1 round

Lightning is imported first, as in `train()`: torch's meta kernels then cost nothing extra to import.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import deepnets.run  # noqa: F401  (the imports a run has made before the check)
from deepnets.config import load_config
from deepnets.memory import check_fits

ROOT = Path(__file__).resolve().parent.parent


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--quick", action="store_true")
    rounds = 1 if p.parse_args().quick else 5
    check_fits(load_config(str(ROOT / "configs" / "mlp.yaml"), ["trainer.accelerator=cpu"]))  # warm-up
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(str(path), ["trainer.accelerator=cpu"])
        times = []
        for _ in range(rounds):
            t = time.perf_counter()
            check_fits(cfg)
            times.append(time.perf_counter() - t)
        print(f"{path.name:40s} {1000 * statistics.median(times):8.1f} ms")


if __name__ == "__main__":
    main()
