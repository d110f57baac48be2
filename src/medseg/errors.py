"""The one exception type for errors a user can cause, and the wrapper that prints it."""

from __future__ import annotations

import sys
from collections.abc import Callable, Sequence


class MedsegError(Exception):
    """A problem with the user's input: a bad file, parameter or data set.

    The message names the file or parameter and says what to do; the command line prints it
    as one line, without a traceback, and exits non-zero.
    """


def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line ``main``; turn a `MedsegError` into one ``error:`` line and exit code 2.

    Args:
        main: the entry point, called with ``argv``.
        argv: arguments; ``None`` means ``sys.argv[1:]``.

    Returns:
        The process exit code: 0 on success, 2 on a user error.
    """
    try:
        main(argv)
    except MedsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    return 0
