"""The ``medseg`` command: user-facing helpers; ``dvc repro`` runs the stages themselves."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medseg import __version__
from medseg.config import load_all_params
from medseg.errors import run_cli


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="validate a params file without running anything")
    check.add_argument("params", nargs="?", default="params.yaml")
    return parser.parse_args(argv)


def _main(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    if args.command == "check-params":
        load_all_params(args.params)
        print(f"{args.params}: ok")


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``medseg`` console script."""
    sys.exit(run_cli(_main, argv))
