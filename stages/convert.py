"""convert: ${data.root} (layout data.layout) -> lossless PNGs + manifest.csv."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from medseg.config import load_params
from medseg.config.sections import ConvertConfig, DataConfig
from medseg.convert.dataset import convert_dataset
from medseg.io.atomic import check_output
from medseg.stage import run_stage, stage_args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(__doc__, argv, {"out": "folder for PNGs and manifest.csv"})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    data = load_params(args.params, DataConfig)
    cfg = load_params(args.params, ConvertConfig)
    check_output(args.out, {"data.root": data.root, "--params": args.params})
    convert_dataset(data, cfg, args.out)


if __name__ == "__main__":
    run_stage(main)
