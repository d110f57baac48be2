"""The skeleton every ``stages/<stage>.py`` shares: its arguments (``--params`` and the paths
that ``dvc.yaml`` gives it) and how it runs as a script (time-stamped log lines around progress
bars, one ``error:`` line and a non-zero exit on a user error)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import NoReturn

from medseg.errors import run_cli
from medseg.progress import logged


def stage_args(
    doc: str | None,
    argv: Sequence[str] | None,
    paths: Mapping[str, str],
    optional: Mapping[str, str] | None = None,
) -> argparse.Namespace:
    """A stage's arguments: ``--params`` (default ``params.yaml``), then one required
    ``--<name>`` per entry of ``paths`` (name -> help) and one optional per entry of
    ``optional`` (default ``None``)."""
    parser = argparse.ArgumentParser(description=doc)
    parser.add_argument("--params", default="params.yaml")
    for name, text in paths.items():
        parser.add_argument(f"--{name}", required=True, help=text)
    for name, text in (optional or {}).items():
        parser.add_argument(f"--{name}", default=None, help=text)
    return parser.parse_args(argv)


def run_stage(main: Callable[[Sequence[str] | None], None]) -> NoReturn:
    """Run a stage script's ``main`` on the command line's arguments, logging at INFO with a
    time stamp and around its progress bars (`medseg.progress.logged`); exit with
    `medseg.errors.run_cli`'s code."""
    with logged(logging.INFO):
        code = run_cli(main)
    sys.exit(code)
