"""preprocess: converted PNGs + manifest -> one case store per split ({train,val,test}.json +
shard files), split.csv, stats.json, the preprocess, convert and class records."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medseg.config import PreprocessConfig, load_params
from medseg.errors import run_cli
from medseg.io.atomic import check_output
from medseg.preprocess import preprocess_dataset


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--converted", required=True, help="output folder of the convert stage")
    parser.add_argument("--out", required=True, help="folder for the model-ready arrays")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, PreprocessConfig)
    check_output(args.out, {"--converted": args.converted, "--params": args.params})
    preprocess_dataset(cfg, args.converted, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(run_cli(main))
