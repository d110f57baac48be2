"""folds (crossval/dvc.yaml): preprocessed training cases -> one data folder per fold (views into
preprocess's shards, no copy) + a table of each case's fold."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from medseg.config import load_params
from medseg.config.sections import CrossvalConfig
from medseg.evaluation.crossval import write_folds
from medseg.stage import run_stage, stage_args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(
        __doc__,
        argv,
        {
            "data": "output folder of the preprocess stage",
            "manifest": "manifest.csv of the convert stage",
            "out": "folder for the fold folders",
            "table": "CSV of each training case's fold",
        },
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, CrossvalConfig)
    write_folds(cfg, args.data, args.manifest, args.out, args.table)


if __name__ == "__main__":
    run_stage(main)
