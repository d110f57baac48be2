"""convert: ${data.root} (layout data.layout) -> lossless PNGs + manifest.csv."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medseg.config import ConvertConfig, DataConfig, load_params
from medseg.convert import convert_dataset
from medseg.errors import run_cli
from medseg.io.atomic import check_output


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="folder for PNGs and manifest.csv")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    data = load_params(args.params, DataConfig)
    cfg = load_params(args.params, ConvertConfig)
    check_output(args.out, {"data.root": data.root, "--params": args.params})
    convert_dataset(data, cfg, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(run_cli(main))
