"""folds (crossval/dvc.yaml): preprocessed training cases -> one data folder per fold (views into
preprocess's shards, no copy) + a table of each case's fold."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medseg.config import CrossvalConfig, load_params
from medseg.crossval import write_folds
from medseg.errors import run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="output folder of the preprocess stage")
    parser.add_argument("--manifest", required=True, help="manifest.csv of the convert stage")
    parser.add_argument("--out", required=True, help="folder for the fold folders")
    parser.add_argument("--table", required=True, help="CSV of each training case's fold")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, CrossvalConfig)
    write_folds(cfg, args.data, args.manifest, args.out, args.table)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(run_cli(main))
