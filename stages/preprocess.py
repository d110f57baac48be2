"""preprocess: converted PNGs + manifest -> one case store per split ({train,val,test}.json +
shard files), split.csv, stats.json, the preprocess, convert and class records."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from medseg.config import load_params
from medseg.config.sections import ConvertConfig, PreprocessConfig
from medseg.io.atomic import check_output
from medseg.preprocess.dataset import preprocess_dataset
from medseg.stage import run_stage, stage_args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(
        __doc__,
        argv,
        {
            "converted": "output folder of the convert stage",
            "out": "folder for the model-ready arrays",
        },
        optional={"plan": "the plan stage's plans.json (needed where a key is auto)"},
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, PreprocessConfig, args.plan)
    check_output(args.out, {"--converted": args.converted, "--params": args.params})
    # the plan's FOV decision where convert left it auto (convert runs before the plan)
    fov = load_params(args.params, ConvertConfig, args.plan).fov_fallback
    preprocess_dataset(cfg, args.converted, args.out, fov_fallback=fov)


if __name__ == "__main__":
    run_stage(main)
