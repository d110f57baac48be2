"""plan: converted training cases -> plans.json, every ``auto`` param chosen from their
fingerprint, each with its reason (docs/plan.md). Test cases are never read.

The step time the budget is planned with is measured once (a probe) and kept: while the
measured step (network, patch, batch, precision, device, machine) stays the same, a rerun of
this stage takes it from the plan it replaces, so the same data and params plan the same steps.
A probe that other processes disturbed (they kept a core busy while it measured) plans this run
with a warning and is marked ``busy`` in ``budget.probe``: the next run measures again.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
        {
            "converted": "output folder of the convert stage",
            "machine": "the machine stage's machine.json (another machine: a new probe)",
            "out": "the plan file to write",
        },
    )


def previous_probe(path: Path) -> dict[str, Any] | None:
    """The measured step of the plan at ``path`` (``budget.probe`` and ``step_seconds``); None
    where there is none, or where the machine was busy while it was measured."""
    try:
        budget = read_json(path, "plan").get("budget") or {}
        probe = dict(budget["probe"])
        seconds = float(budget["step_seconds"])
    except (MedsegError, KeyError, TypeError, ValueError, AttributeError):  # measure again
        return None
    return None if probe.get("busy") else {"probe": probe, "step_seconds": seconds}


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    params = load_all_params(args.params)  # every key checked; auto keys by a stand-in
    explicit = planned_values(read_yaml(Path(args.params)))
    check_output(
        args.out,
        {"--converted": args.converted, "--params": args.params, "--machine": args.machine},
    )
    machine = read_json(Path(args.machine), "machine record")
    train, out = params.train, Path(args.out)
    previous = previous_probe(out) if out.is_file() else None
    measured: dict[str, Any] = {}

    def probe(patch: int, batch: int, in_channels: int) -> float:
        loss = explicit.get("train.loss", "bce_dice")
        cfg = dataclasses.replace(train, patch_size=patch, batch_size=batch, loss=loss)
        measured["probe"] = {**probe_key(cfg, in_channels), "machine": machine}
        if previous is not None and previous["probe"] == measured["probe"]:
            seconds = previous["step_seconds"]
            log.info("probe: %.3g s a step, kept from the plan it replaces (same step)", seconds)
            return seconds
        step = probe_step_seconds(cfg, in_channels)
        log.info(
            "probe: %.3g s a training step at patch %d, batch %d (%d threads)",
            step.seconds, patch, batch, step.threads,
        )  # fmt: skip
        if step.busy:
            measured["probe"]["busy"] = step.other_cores
            log.warning(
                "probe: other processes kept %.1f CPU cores busy while it measured, so the step "
                "time is slower than this machine's; this plan uses it, the next run of the "
                "plan measures again (or fix train.step_seconds)",
                step.other_cores,
            )  # fmt: skip
        return step.seconds

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
