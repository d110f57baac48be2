"""train: model-ready arrays -> best and last weights (safetensors) + per-epoch curves (dvclive)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medseg.config import TrainConfig, load_params
from medseg.errors import run_cli
from medseg.training import fit


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="output folder of the preprocess stage")
    parser.add_argument("--models", required=True, help="folder for the weights")
    parser.add_argument("--logs", required=True, help="folder for the dvclive curves")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, TrainConfig)
    fit(cfg, data_dir=args.data, models_dir=args.models, logs_dir=args.logs)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(run_cli(main))
