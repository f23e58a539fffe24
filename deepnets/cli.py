"""`python train.py` / `deepnets`: parse arguments, call `deepnets.run.train`, map outcomes to exit codes."""

from __future__ import annotations

import argparse
import sys
import warnings

from deepnets.errors import UserError

EXIT_USER_ERROR = 2
EXIT_FAILED = 1  # diverged or interrupted: the run ended, but not well


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="deepnets",
        description="Train a deep network from a YAML config and log its gradient flow.",
        epilog="examples: deepnets --config mlp.yaml   deepnets --config resnet model.width=32 optim.lr=0.05",
    )
    p.add_argument("--config", "-c", help="config file, or a name in configs/ (with or without .yaml)")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config values (YAML scalars)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--resume", metavar="last|PATH", help="continue from the run's newest last.ckpt, or a checkpoint")
    p.add_argument("--export", metavar="RUN_DIR", help="write RUN_DIR/export/{model.safetensors,config.yaml} and exit")
    p.add_argument("--evaluate", metavar="EXPORT_DIR", help="test an exported model (no pickle involved) and exit")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["compare"]:  # `deepnets compare RUN_DIR... [--out DIR]`
        from deepnets.compare import main as compare_main

        try:
            return compare_main(argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
    args = parser().parse_args(argv)
    # Lightning 2.6 on torch >= 2.10 warns about its own use of a deprecated pytree API on every run.
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    try:
        return _main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_USER_ERROR


def _main(args: argparse.Namespace) -> int:
    from deepnets.config import load_config, to_yaml

    if args.export or args.evaluate:
        from deepnets.export import evaluate, export_run

        if args.export:
            print(f"exported: {export_run(args.export)}")
        if args.evaluate:
            print(" ".join(f"{k}={v:.4f}" for k, v in evaluate(args.evaluate).items()))
        return 0
    if args.config is None:
        raise UserError("--config is required (e.g. --config mlp.yaml; shipped configs live in configs/)")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.sweep.params:
        from deepnets.sweep import run_sweep

        return 0 if run_sweep(cfg) else EXIT_FAILED

    from deepnets.run import train

    result = train(cfg, resume=args.resume)
    if result.run_dir is not None:
        summary = ", ".join(
            f"{k}={v:.4f}"
            for k, v in sorted(result.metrics.items())
            if k.startswith(("test/", "val/")) and isinstance(v, float)
        )
        print(f"{result.status}: {result.run_dir} {summary}")
    if result.ok:
        return 0
    print(f"error: run {result.status}: {result.error}", file=sys.stderr)
    return 128 + result.signum if result.signum else EXIT_FAILED


if __name__ == "__main__":
    sys.exit(main())
