"""plan: converted training cases -> plans.json, every ``auto`` param chosen from their
fingerprint, each with its reason (docs/plan.md). Test cases are never read."""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path

from medseg import names
from medseg.config import load_all_params, planned_values
from medseg.io.atomic import check_output
from medseg.io.records import read_yaml
from medseg.plan import format_table, plan_dataset
from medseg.stage import run_stage, stage_args
from medseg.training.probe import probe_step_seconds

log = logging.getLogger("plan")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(
        __doc__,
        argv,
        {"converted": "output folder of the convert stage", "out": "the plan file to write"},
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_all_params(args.params)  # every key checked; auto keys by a stand-in
    raw = read_yaml(Path(args.params))
    explicit = planned_values(raw)
    for key, value in (
        ("convert.fov_fallback", params.convert.fov_fallback),
        ("evaluate.threshold", params.evaluate.threshold),
    ):
        if value != names.AUTO:
            explicit[key] = value
    check_output(args.out, {"--converted": args.converted, "--params": args.params})
    train = params.train

    def probe(patch: int, batch: int, in_channels: int) -> float:
        loss = explicit.get("train.loss", "bce_dice")
        cfg = dataclasses.replace(train, patch_size=patch, batch_size=batch, loss=loss)
        seconds = probe_step_seconds(cfg, in_channels)
        log.info("probe: %.3g s a training step at patch %d, batch %d", seconds, patch, batch)
        return seconds

    result = plan_dataset(
        args.converted,
        args.out,
        explicit,
        train.step_seconds if train.step_seconds is not None else probe,
        train.budget,
    )
    log.info("%s\n\n%s", args.out, format_table(result))


if __name__ == "__main__":
    run_stage(main)
