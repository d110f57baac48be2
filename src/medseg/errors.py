"""The one exception type for errors a user can cause, and the wrapper that prints it."""

from __future__ import annotations

import errno
import os
import signal
import sys
from collections.abc import Callable, Sequence
from pathlib import Path


class MedsegError(Exception):
    """A problem with the user's input: a bad file, parameter or data set.

    The message names the file or parameter and says what to do; the command line prints it
    as one line, without a traceback, and exits non-zero.
    """


class OutputError(MedsegError):
    """A failure on the output side (disk full, read-only file system, permission): no input is
    to blame, so it stops the run whatever ``convert.on_error`` says."""


class Interrupted(KeyboardInterrupt):
    """A stop signal (SIGTERM) raised like Ctrl-C, so that unfinished outputs are removed."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# errno -> what to do. These come from the file system that is written to, never from an input.
OUTPUT_ERRNOS: dict[int, str] = {
    errno.ENOSPC: "free space on that disk or choose an output folder on another one",
    errno.EDQUOT: "free space within your quota or choose an output folder elsewhere",
    errno.EFBIG: "that file system takes no file this large; choose an output folder elsewhere",
    errno.EROFS: "remount it writable or choose an output folder elsewhere",
    errno.EXDEV: "keep the output folder and its temporary files on one file system",
    errno.EBUSY: "it is in use (a mount point?); choose another output folder",
}
# errno -> what to do, where it is the output's fault only when the path is the output's.
ACCESS_ERRNOS: dict[int, str] = {
    errno.EACCES: "make it writable for you or choose another output folder",
    errno.EPERM: "make it writable for you or choose another output folder",
}


def describe_os_error(
    err: OSError, out: str | Path | None = None, inside: Path | None = None
) -> str:
    """One line: the path, the OS's reason and what to do.

    Args:
        err: the failure.
        out: the output it hit (named first), or ``None`` to name ``err``'s own file.
        inside: a temporary folder of ``out``: a file there is named relative to it.
    """
    code = err.errno if err.errno is not None else 0
    reason = err.strerror or os.strerror(code)
    advice = OUTPUT_ERRNOS.get(code) or ACCESS_ERRNOS.get(code) or "check that file system"
    name = err.filename if isinstance(err.filename, str) else None
    if out is None:  # the side is unknown: an input may be unreadable as well
        if code in ACCESS_ERRNOS:
            advice = "check its permissions and its folder's"
        return f"{name or 'a file'}: {reason}; {advice}"
    detail = ""
    if name:
        shown = name
        if inside is not None and Path(name).is_relative_to(inside):
            shown = Path(name).relative_to(inside).as_posix()
        detail = f" (writing {shown})" if shown not in (".", str(out)) else ""
    return f"{out}: {reason}{detail}; {advice}. Nothing was written there"


def run_cli(main: Callable[[Sequence[str] | None], None], argv: Sequence[str] | None = None) -> int:
    """Run a command-line ``main``; turn a `MedsegError` into one ``error:`` line and exit code 2.

    A disk that is full or read-only is named the same way (the OS error, without a traceback);
    Ctrl-C or SIGTERM ends with one line and 128 + the signal number.

    Args:
        main: the entry point, called with ``argv``.
        argv: arguments; ``None`` means ``sys.argv[1:]``.

    Returns:
        The process exit code: 0 on success, 2 on a user or output error, 130/143 when stopped.
    """
    try:
        main(argv)
    except MedsegError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as stop:
        signum = stop.signum if isinstance(stop, Interrupted) else signal.SIGINT
        name = signal.Signals(signum).name
        print(f"error: stopped by {name}; unfinished outputs were removed", file=sys.stderr)
        return 128 + signum
    except OSError as err:
        if err.errno not in OUTPUT_ERRNOS and not (err.errno in ACCESS_ERRNOS and err.filename):
            raise
        print(f"error: {describe_os_error(err)}", file=sys.stderr)
        return 2
    return 0


def shown(value: object, limit: int = 60) -> str:
    """``repr(value)`` cut to about ``limit`` characters, for messages that quote user input."""
    return cut(repr(value), limit)


def cut(text: str, limit: int) -> str:
    """``text`` cut to ``limit`` characters, ``...`` marking the cut."""
    return text if len(text) <= limit else text[: limit - 3] + "..."
