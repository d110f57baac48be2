"""train: model-ready arrays -> best and last weights (safetensors) + per-epoch curves (dvclive).

Also runs under ``torchrun --nproc_per_node=N stages/train.py ...`` (DDP; rank 0 writes). With
``--checkpoints``, a preempted run (SIGTERM) saves a checkpoint there and the next run resumes.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from medseg.config import TrainConfig, load_params
from medseg.errors import run_cli
from medseg.io.atomic import check_output
from medseg.training import fit


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--data", required=True, help="output folder of the preprocess stage")
    parser.add_argument("--models", required=True, help="folder for the weights")
    parser.add_argument("--logs", required=True, help="folder for the dvclive curves")
    parser.add_argument(
        "--checkpoints", default=None, help="folder for the resume checkpoint (default: none)"
    )
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    cfg = load_params(args.params, TrainConfig)
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
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    sys.exit(run_cli(main))
