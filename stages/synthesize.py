"""synthesize: params.yaml `synthesize` -> the built-in fundus-like data set in the DRIVE layout."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medseg.config import SynthesizeConfig, load_params
from medseg.errors import run_cli
from medseg.io.atomic import atomic_dir
from medseg.synthetic import write_dataset


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--out", required=True, help="folder to write the data set into")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, SynthesizeConfig)
    with atomic_dir(args.out, {"--params": args.params}) as tmp:
        n = write_dataset(cfg, tmp)
    logging.getLogger("medseg").info("wrote %d synthetic cases to %s", n, args.out)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(run_cli(main))
