"""`python -m deepnets.experiments NAME [--out DIR] [--quick] [...]`: run one experiment."""

from __future__ import annotations

import importlib
import sys

from deepnets import console
from deepnets.errors import UserError

# name -> (module with `main(argv) -> int | None`, one-line description); imported only when chosen
EXPERIMENTS: dict[str, tuple[str, str]] = {
    "implicit": ("deepnets.experiments.implicit", "implicit regularisation of gradient descent"),
    "autodiff": ("deepnets.experiments.autodiff", "what automatic differentiation does (and gets wrong)"),
    "vanishing": ("deepnets.experiments.vanishing", "vanishing / exploding gradients through depth"),
    "double_descent": ("deepnets.experiments.double_descent", "double descent over model width"),
    "depth": ("deepnets.experiments.depth", "depth efficiency: the sawtooth a deep narrow net is exactly"),
    "init": ("deepnets.experiments.initialisation", "initialisation: small but different"),
    "optimizers": ("deepnets.experiments.optimizers", "momentum, per-coordinate steps, Adam's failure, whitening"),
}


def _usage() -> str:
    lines = ["usage: python -m deepnets.experiments NAME [--out DIR] [--quick] [...]", "", "experiments:"]
    lines += [f"  {name:<15} {desc}" for name, (_, desc) in EXPERIMENTS.items()]
    lines.append("\n`python -m deepnets.experiments NAME --help` lists an experiment's options.")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console.configure()  # drop the libraries' banners and warnings about their own internals
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage(), file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    name, rest = argv[0], argv[1:]
    if name not in EXPERIMENTS:
        print(f"error: unknown experiment {name!r}; choose from {', '.join(EXPERIMENTS)}", file=sys.stderr)
        return 2
    module_name = EXPERIMENTS[name][0]
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name != module_name:  # a genuinely missing dependency: show it
            raise
        print(f"error: experiment {name!r} is not available in this version ({module_name} missing)", file=sys.stderr)
        return 2
    try:
        return int(module.main(rest) or 0)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
