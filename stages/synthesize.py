"""synthesize: params.yaml `synthesize` -> the built-in fundus-like data set in the DRIVE layout."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from medseg.config import load_params
from medseg.config.sections import SynthesizeConfig
from medseg.io.atomic import atomic_dir
from medseg.stage import run_stage, stage_args
from medseg.synthetic import write_dataset


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(__doc__, argv, {"out": "folder to write the data set into"})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, SynthesizeConfig)
    with atomic_dir(args.out, {"--params": args.params}) as tmp:
        n = write_dataset(cfg, tmp)
    logging.getLogger("medseg").info("wrote %d synthetic cases to %s", n, args.out)


if __name__ == "__main__":
    run_stage(main)
