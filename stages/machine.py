"""machine: this machine, as a training step's speed sees it -> machine.json (CPU model and
flags, cores, thread variables, GPUs, torch version). Always run (it is cheap and imports no
torch); the plan stage depends on the file, so a plan made on another machine is made again
here, and on the same machine the file is the same and nothing reruns."""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence

from medseg.io.atomic import write_json
from medseg.planning.machine import describe
from medseg.stage import run_stage, stage_args


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    return stage_args(__doc__, argv, {"out": "the machine file to write"})


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    record = describe()
    write_json(args.out, record)
    logging.getLogger("machine").info(
        "%s: %s, %s cores%s", args.out, record["cpu"], record["cores"],
        f", GPUs {', '.join(record['gpus'])}" if record["gpus"] else "",
    )  # fmt: skip


if __name__ == "__main__":
    run_stage(main)
