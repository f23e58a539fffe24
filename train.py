"""Train a model from a YAML config: `python train.py --config mlp.yaml [dotted.key=value ...]`."""

import sys

from deepnets.cli import main

if __name__ == "__main__":
    sys.exit(main())
