"""evaluate: model bundle + test cases -> metrics.json, per_image.csv, roc.csv, overlays/."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medseg.config import EvaluateConfig, load_params
from medseg.errors import run_cli
from medseg.evaluation import evaluate_model
from medseg.io.atomic import check_output


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="output folder of the preprocess stage")
    parser.add_argument("--model", required=True, help="model bundle folder (or its weights)")
    parser.add_argument("--out", required=True, help="folder for metrics, tables and images")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, EvaluateConfig)
    check_output(args.out, {"--data": args.data, "--model": args.model, "--params": args.params})
    evaluate_model(cfg, data_dir=args.data, model_path=args.model, out=args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(run_cli(main))
