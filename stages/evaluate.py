"""evaluate: model bundle + test cases -> metrics.json, per_image.csv, roc.csv, overlays/."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from medseg.config import load_params
from medseg.config.sections import EvaluateConfig
from medseg.evaluation.evaluate import evaluate_model
from medseg.io.atomic import check_output
from medseg.stage import run_stage, stage_args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(
        __doc__,
        argv,
        {
            "data": "output folder of the preprocess stage",
            "model": "model bundle folder (or its weights)",
            "out": "folder for metrics, tables and images",
        },
        optional={"plan": "the plan stage's plans.json (needed where a key is auto)"},
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, EvaluateConfig, args.plan)
    check_output(args.out, {"--data": args.data, "--model": args.model, "--params": args.params})
    evaluate_model(cfg, data_dir=args.data, model_path=args.model, out=args.out)


if __name__ == "__main__":
    run_stage(main)
