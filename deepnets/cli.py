"""`python train.py` / `deepnets`: parse arguments, call `deepnets.run.train`, map outcomes to exit codes."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import NoReturn

from deepnets import console
from deepnets.errors import UserError

EXIT_USER_ERROR = 2
EXIT_FAILED = 1  # diverged or interrupted: the run ended, but not well


class _Parser(argparse.ArgumentParser):
    """argparse, but a usage mistake is one `error:` line and exit 2, like every other mistake."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {one_line(message)} (see {self.prog} --help)", file=sys.stderr)
        sys.exit(EXIT_USER_ERROR)


def one_line(text: str) -> str:
    """A message on one line: newlines (from a value or a library's message) become spaces."""
    return " ".join(text.split())


def parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="deepnets",
        description="Train a deep network from a YAML config and log its gradient flow.",
        # Raw: argparse would join the example lines into one
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  deepnets --config mlp.yaml\n  deepnets --config resnet model.width=32 optim.lr=0.05",
    )
    p.add_argument("--config", "-c", metavar="NAME|FILE", help="a shipped config (mlp, mlp.yaml) or a config file")
    p.add_argument("--list-configs", action="store_true", help="list the shipped configs (name, description) and exit")
    p.add_argument("overrides", nargs="*", metavar="dotted.key=value", help="override config values (YAML scalars)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument(
        "--resume", metavar="last|PATH", help="continue from the run's newest last.ckpt, a checkpoint, or a SWEEP_DIR"
    )
    p.add_argument(
        "--sweep-worker", metavar="SWEEP_DIR|STORAGE_URL", help="join an existing sweep as one more worker and exit"
    )
    p.add_argument("--study", metavar="NAME", help="with --sweep-worker STORAGE_URL: the sweep's study name")
    p.add_argument("--export", metavar="RUN_DIR", help="write RUN_DIR/export/{model.safetensors,config.yaml} and exit")
    p.add_argument("--evaluate", metavar="EXPORT_DIR", help="test an exported model (no pickle involved) and exit")
    p.add_argument(
        "--predict", metavar="RUN_DIR|EXPORT_DIR", help="apply a trained model to --input; CSV to stdout or --output"
    )
    p.add_argument("--input", metavar="FILE.csv|FILE.npz|FOLDER", help="with --predict: the inputs")
    p.add_argument("--output", metavar="FILE.csv", help="with --predict: write here (never overwrites a file)")
    return p


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    console.configure()  # drop the libraries' banners and warnings about their own internals
    if argv[:1] == ["compare"]:  # `deepnets compare RUN_DIR... [--out DIR]`
        from deepnets.compare import main as compare_main

        try:
            return compare_main(argv[1:])
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            return EXIT_USER_ERROR
    args = parser().parse_args(argv)
    try:
        return _main(args)
    except UserError as e:
        print(f"error: {one_line(str(e))}", file=sys.stderr)
        return EXIT_USER_ERROR


def _main(args: argparse.Namespace) -> int:
    if args.list_configs:
        return _list_configs(args)
    from deepnets.config import SweepConfig, load_config, to_yaml

    for flag in ("resume", "export", "evaluate", "predict", "input", "output"):  # `--x=~/y`: unexpanded by the shell
        value = getattr(args, flag)
        if value and value != "last":
            setattr(args, flag, os.path.expanduser(value))

    if args.predict or args.input or args.output:
        from deepnets.predict import main as predict_main

        if not args.predict:
            raise UserError("--input / --output go with --predict RUN_DIR|EXPORT_DIR")
        return predict_main(args.predict, args.input, args.output)

    if args.export or args.evaluate:
        from deepnets.export import evaluate, export_run

        if args.export:
            print(f"exported: {export_run(args.export)}")
        if args.evaluate:
            print(" ".join(f"{k}={v:.4f}" for k, v in evaluate(args.evaluate).items()))
        return 0
    if args.sweep_worker or args.study:
        from deepnets.sweep import worker_command

        if args.sweep_worker is None:
            raise UserError("--study NAME needs --sweep-worker STORAGE_URL")
        if args.config or args.overrides:
            raise UserError("--sweep-worker takes the sweep's own config; drop --config and overrides")
        return worker_command(args.sweep_worker, args.study)
    if args.resume and (Path(args.resume) / "sweep.yaml").is_file():  # a sweep directory
        from deepnets.sweep import resume_command

        # overrides alone apply to the sweep's own config (only sweep.workers may change on resume)
        own = args.config or (str(Path(args.resume) / "sweep.yaml") if args.overrides else None)
        cfg = load_config(own, args.overrides) if own else None
        return resume_command(args.resume, cfg)
    if args.config is None:
        raise UserError("--config is required (e.g. --config mlp.yaml; deepnets --list-configs lists the shipped ones)")
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(to_yaml(cfg), end="")
        return 0
    if cfg.sweep != SweepConfig():
        from deepnets.config import check_runtime
        from deepnets.sweep import resume_command, sweep_command

        check_runtime(cfg)  # before the sweep directory exists (train() checks each point again)
        return resume_command(args.resume, cfg) if args.resume else sweep_command(cfg)

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


def _list_configs(args: argparse.Namespace) -> int:
    """`--list-configs`: the shipped configs, one line each (file name, first comment line), exit 0."""
    from deepnets.config import describe_config, shipped_configs

    others = [
        "dotted.key=value overrides" if k == "overrides" else f"--{k.replace('_', '-')}"
        for k, v in vars(args).items()
        if v and k != "list_configs"
    ]
    if others:
        raise UserError(f"--list-configs takes no other arguments (got {', '.join(others)})")
    shipped = shipped_configs()
    width = max(map(len, shipped), default=0)
    # a run takes the name (--config NAME) from any directory
    text = "".join(f"{f'{name:<{width}}  {describe_config(path)}'.rstrip()}\n" for name, path in shipped.items())
    try:
        print(text, end="", flush=True)  # print: a closed stdout (sys.stdout None) is no error
    except BrokenPipeError:  # `deepnets --list-configs | head -3`: the reader left; no traceback at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except OSError as e:  # `> /dev/full`
        raise UserError(f"cannot write the list of configs to stdout: {e.strerror or e}") from None
    return 0


if __name__ == "__main__":
    sys.exit(main())
