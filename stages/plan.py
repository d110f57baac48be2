"""plan: converted training cases -> plans.json, every ``auto`` param chosen from their
fingerprint, each with its reason (docs/plan.md). Test cases are never read.

The step time the budget is planned with is measured once (a probe) and kept: while the
measured step (network, patch, batch, precision, device, machine) stays the same, a rerun of
this stage takes it from the plan it replaces, so the same data and params plan the same steps.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medseg import names
from medseg.config import load_all_params, planned_values
from medseg.errors import MedsegError
from medseg.io.atomic import check_output
from medseg.io.records import read_json, read_yaml
from medseg.planning.fingerprint import fingerprint
from medseg.planning.plan import format_table, plan, write_plan
from medseg.planning.probe import probe_key, probe_step_seconds
from medseg.stage import run_stage, stage_args

log = logging.getLogger("plan")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(
        __doc__,
        argv,
        {"converted": "output folder of the convert stage", "out": "the plan file to write"},
    )


def previous_probe(path: Path) -> dict[str, Any] | None:
    """The measured step of the plan at ``path`` (``budget.probe`` and ``step_seconds``)."""
    try:
        budget = read_json(path, "plan").get("budget") or {}
        return {"probe": dict(budget["probe"]), "step_seconds": float(budget["step_seconds"])}
    except (MedsegError, KeyError, TypeError, ValueError, AttributeError):  # measure again
        return None


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_all_params(args.params)  # every key checked; auto keys by a stand-in
    explicit = planned_values(read_yaml(Path(args.params)))
    for key, value in (
        ("convert.fov_fallback", params.convert.fov_fallback),
        ("evaluate.threshold", params.evaluate.threshold),
    ):
        if value != names.AUTO:
            explicit[key] = value
    check_output(args.out, {"--converted": args.converted, "--params": args.params})
    train, out = params.train, Path(args.out)
    previous = previous_probe(out) if out.is_file() else None
    measured: dict[str, Any] = {}

    def probe(patch: int, batch: int, in_channels: int) -> float:
        loss = explicit.get("train.loss", "bce_dice")
        cfg = dataclasses.replace(train, patch_size=patch, batch_size=batch, loss=loss)
        measured["probe"] = probe_key(cfg, in_channels)
        if previous is not None and previous["probe"] == measured["probe"]:
            seconds = previous["step_seconds"]
            log.info("probe: %.3g s a step, kept from the plan it replaces (same step)", seconds)
            return seconds
        seconds = probe_step_seconds(cfg, in_channels)
        log.info("probe: %.3g s a training step at patch %d, batch %d", seconds, patch, batch)
        return seconds

    step_time = train.step_seconds if train.step_seconds is not None else probe
    fp = fingerprint(args.converted)
    log.info("fingerprint: %d training cases of %d groups (patients)", fp["cases"], fp["groups"])
    result = plan(fp, explicit, step_time, train.budget)
    if result["budget"] is not None and measured:
        result["budget"]["probe"] = measured["probe"]
    write_plan(out, result)
    log.info("%s\n\n%s", out, format_table(result))


if __name__ == "__main__":
    run_stage(main)
