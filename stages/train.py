"""train: model-ready arrays -> best and last weights (safetensors) + per-epoch curves (dvclive).

Also runs under ``torchrun --nproc_per_node=N stages/train.py ...`` (DDP; rank 0 writes). With
``--checkpoints``, a preempted run (SIGTERM) saves a checkpoint there and the next run resumes.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from medseg.config import TrainConfig, load_params
from medseg.io.atomic import check_output
from medseg.stage import run_stage, stage_args
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
    )


if __name__ == "__main__":
    run_stage(main)
