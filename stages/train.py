"""train: model-ready arrays -> best and last weights (safetensors) + per-epoch curves (dvclive).

Also runs under ``torchrun --nproc_per_node=N stages/train.py ...`` (DDP; rank 0 writes). With
``--checkpoints``, a preempted run (SIGTERM) saves a checkpoint there and the next run resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from medseg.config import load_params
from medseg.config.sections import TrainConfig
from medseg.io.atomic import check_output
from medseg.io.records import read_json
from medseg.stage import run_stage, stage_args
from medseg.training.callbacks import StepTimeCheck
from medseg.training.loop import fit


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(
        __doc__,
        argv,
        {
            "data": "output folder of the preprocess stage",
            "models": "folder for the weights",
            "logs": "folder for the dvclive curves",
        },
        optional={
            "plan": "the plan stage's plans.json (needed where a key is auto)",
            "checkpoints": "folder for the resume checkpoint (default: none)",
        },
    )


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, TrainConfig, args.plan)
    folders = {"--models": args.models, "--logs": args.logs, "--checkpoints": args.checkpoints}
    for option, folder in folders.items():  # each may be replaced or cleaned: none may hold another
        if folder is not None:
            others = {k: v for k, v in folders.items() if k != option}
            check_output(folder, {"--data": args.data, "--params": args.params, **others})
    fit(
        cfg,
        data_dir=args.data,
        models_dir=args.models,
        logs_dir=args.logs,
        checkpoint_dir=args.checkpoints,
        callbacks=step_time_check(args.plan, cfg),
    )


def step_time_check(plan: str | None, cfg: TrainConfig) -> list[StepTimeCheck]:
    """The check of this machine's step time against the plan's, where the plan bought the
    epochs with a budget (not where ``train.epochs`` was set)."""
    if plan is None:
        return []
    record = read_json(Path(plan), "plan")
    budget = record.get("budget") or {}
    epochs = (record.get("settings") or {}).get("train.epochs") or {}
    if "step_seconds" not in budget or epochs.get("source") != "plan":
        return []
    if epochs.get("value") != cfg.epochs:  # an explicit train.epochs: no budget to keep
        return []
    return [StepTimeCheck(float(budget["step_seconds"]))]


if __name__ == "__main__":
    run_stage(main)
