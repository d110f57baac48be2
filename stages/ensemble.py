"""ensemble (crossval/dvc.yaml): the folds' models + test cases -> metrics.json of every fold and
of their ensemble (mean probabilities), the ensemble's per_image.csv, probabilities/."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from medseg.config import CrossvalConfig, EvaluateConfig, load_params
from medseg.crossval import ensemble_folds, fold_name
from medseg.errors import run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="output folder of the preprocess stage")
    parser.add_argument("--models", required=True, help="folder of the folds' model bundles")
    parser.add_argument("--out", required=True, help="folder for metrics, table and images")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, EvaluateConfig)
    folds = load_params(args.params, CrossvalConfig).folds
    models = [Path(args.models) / fold_name(k) for k in folds]
    ensemble_folds(cfg, data_dir=args.data, models=models, out=args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(run_cli(main))
