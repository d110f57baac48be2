"""The ``medseg`` command: user-facing helpers; ``dvc repro`` runs the stages themselves."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from medseg import __version__
from medseg.config import load_all_params
from medseg.errors import run_cli
from medseg.io.atomic import write_text


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="medseg", description=__doc__)
    parser.add_argument("--version", action="version", version=f"medseg {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check-params", help="validate a params file without running anything")
    check.add_argument("params", nargs="?", default="params.yaml")
    report = sub.add_parser(
        "report", help="params and metrics of the workspace against a base revision, as Markdown"
    )
    report.add_argument("--base", default="main", help="git revision to compare with (main)")
    report.add_argument("--all", action="store_true", help="list unchanged values too")
    report.add_argument("--repo", default=".", help="the repository (default: here)")
    report.add_argument("-o", "--out", help="write the Markdown to this file, not stdout")
    return parser.parse_args(argv)


def _main(argv: Sequence[str] | None) -> None:
    args = parse_args(argv)
    if args.command == "check-params":
        load_all_params(args.params)
        print(f"{args.params}: ok")
    elif args.command == "report":
        _report(args)


def _report(args: argparse.Namespace) -> None:
    from medseg.report import compare, to_markdown

    text = to_markdown(compare(args.repo, base=args.base, all_rows=args.all))
    if args.out:
        write_text(args.out, text)
    else:
        sys.stdout.write(text)


def main(argv: Sequence[str] | None = None) -> None:
    """Entry point of the ``medseg`` console script."""
    sys.exit(run_cli(_main, argv))
