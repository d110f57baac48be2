"""Progress bars and log lines of the stages and of ``medseg`` commands.

Every loop over cases shows a `progress` bar on standard error while that is a terminal, and
nothing when it is not (a pipe, a file, CI), as DVC's own output does; log lines come through
`logged`, which stamps each with the time and writes it above the bars instead of through them.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from typing import TypeVar

from tqdm import tqdm
from tqdm.contrib.logging import logging_redirect_tqdm

T = TypeVar("T")

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


class _Bar(tqdm):
    """A bar without tqdm's monitor thread, so that a later process pool may still fork."""

    monitor_interval = 0


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | None = None,
    initial: int = 0,
    desc: str = "",
    unit: str = "case",
    leave: bool = True,
    show: bool = True,
) -> tqdm:
    """A progress bar on standard error over ``iterable`` (or updated by hand), shown only when
    standard error is a terminal.

    Args:
        iterable: what to loop over; its ``len`` is the total when it has one.
        total: the number of items, where ``iterable`` has no length (a generator).
        initial: items done before (a resumed epoch's steps).
        desc: what the loop does, e.g. ``"evaluate"``.
        unit: what an item is.
        leave: keep the finished bar on the screen; ``False`` for an inner loop (validation
            after each epoch).
        show: ``False`` hides the bar whatever standard error is (e.g. on a DDP rank but the
            first).
    """
    # disable=None: tqdm turns itself off when its file (standard error) is not a terminal
    return _Bar(
        iterable, total=total, initial=initial, desc=desc, unit=unit, leave=leave,
        disable=None if show else True,
    )  # fmt: skip


@contextlib.contextmanager
def logged(level: int = logging.INFO) -> Iterator[None]:
    """Within the block, log records at ``level`` and above go to standard error as
    ``<date> <time> <LEVEL> <logger>: <message>``, written above any progress bar.

    Does not replace handlers set before (a test's, an embedding program's); it only routes
    those that write to standard output or error around the bars.
    """
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=DATE_FORMAT)
    with logging_redirect_tqdm(tqdm_class=_Bar):
        yield
