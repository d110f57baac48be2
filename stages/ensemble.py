"""ensemble (crossval/dvc.yaml): the folds' models + test cases -> metrics.json of every fold and
of their ensemble (mean probabilities), the ensemble's per_image.csv, probabilities/."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from medseg.config import load_params
from medseg.config.sections import CrossvalConfig, EvaluateConfig
from medseg.evaluation.crossval import ensemble_folds, fold_name
from medseg.stage import run_stage, stage_args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(
        __doc__,
        argv,
        {
            "data": "output folder of the preprocess stage",
            "models": "folder of the folds' model bundles",
            "out": "folder for metrics, table and images",
        },
        optional={"plan": "the plan stage's plans.json (needed where a key is auto)"},
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, EvaluateConfig, args.plan)
    folds = load_params(args.params, CrossvalConfig).folds
    models = [Path(args.models) / fold_name(k) for k in folds]
    ensemble_folds(cfg, data_dir=args.data, models=models, out=args.out)


if __name__ == "__main__":
    run_stage(main)
