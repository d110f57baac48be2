"""Outputs that appear whole or not at all, never in place of an input, with the user's umask.

A stage writes into a hidden temporary sibling of its output and renames it into place only when
everything succeeded, so a crash or a bad input never leaves a half-written output behind.
Temporary names follow one pattern, ``.<output>.tmp-<pid>-<random>``: a run that was killed
outright (SIGKILL, power loss) leaves one, and the next run removes it. A failure of the output
side (disk full, read-only file system, permission) is raised as `OutputError` naming the output.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import secrets
import shutil
import signal
import threading
from collections.abc import Iterator, Mapping
from pathlib import Path
from types import FrameType
from typing import Any

from medseg.errors import (
    ACCESS_ERRNOS,
    OUTPUT_ERRNOS,
    Interrupted,
    MedsegError,
    OutputError,
    describe_os_error,
)

TMP = ".tmp-"  # in every temporary name: .<output>.tmp-<pid>-<random>
_OWNER = re.compile(r"(\d+)-")  # the pid that owns a temporary name


def check_output(out: str | Path, inputs: Mapping[str, str | Path | None] | None = None) -> None:
    """Refuse an output folder that would replace, delete or change something the user has.

    The output may not be, contain or lie inside any of ``inputs``, and may not be or contain the
    working folder or the home folder. Links are resolved first. Nothing is touched.

    Args:
        out: the output folder (it need not exist).
        inputs: name (a params key or option, e.g. ``data.root``) -> path; ``None`` paths skipped.

    Raises:
        MedsegError: naming the output, the input and what to do.
    """
    real = _real(out)
    for what, path in (inputs or {}).items():
        if path is None:
            continue
        where = _real(path)
        if real == where or real in where.parents:
            verb = "is" if real == where else "contains"
            raise MedsegError(
                f"{out}: the output folder {verb} {what} ({path}), an input; writing the output "
                "replaces the folder and would delete it. Choose another output folder"
            )
        if where in real.parents:
            raise MedsegError(
                f"{out}: the output folder lies inside {what} ({path}), an input; writing there "
                "would change the input. Choose an output folder outside it"
            )
    for what, path in (("the working folder", Path.cwd()), ("your home folder", Path.home())):
        where = _real(path)
        if real == where or real in where.parents:
            raise MedsegError(
                f"{out}: the output folder is or contains {what} ({path}); writing the output "
                "replaces the folder and would delete it. Choose a folder of its own"
            )


@contextlib.contextmanager
def atomic_dir(
    out: str | Path, inputs: Mapping[str, str | Path | None] | None = None
) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``out`` when the block ends without an exception.

    On an exception (or SIGTERM) the temporary folder is removed and ``out`` is left as it was.
    Temporary folders of ``out`` left by a killed run are removed first. The folder gets the
    permissions the umask gives (not 0700 as `tempfile.mkdtemp` would).

    Args:
        out: the output folder.
        inputs: checked first with `check_output`, before anything is removed.

    Raises:
        MedsegError: ``out`` overlaps an input or is a mount point.
        OutputError: the output side failed (its OS error, named, replaces the original).
    """
    out = Path(out)
    check_output(out, inputs)
    if os.path.ismount(out):
        raise MedsegError(
            f"{out}: a mount point; a stage output is replaced as a whole, which a mount point "
            "cannot be. Use a folder inside it"
        )
    with output_errors(out):
        out.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(out.parent, f".{out.name}{TMP}")
        tmp = temp_dir(out.parent, f".{out.name}{TMP}")
    with cleaned_up(tmp, out):
        yield tmp
    with output_errors(out):
        _swap(tmp, out)


@contextlib.contextmanager
def cleaned_up(tmp: Path, out: Path) -> Iterator[None]:
    """Remove ``tmp`` (a temporary folder of ``out``) when the block fails or SIGTERM comes.

    Raises:
        OutputError: the failure was the output side's (see `output_failure`).
    """
    try:
        with sigterm_raises():
            yield
    except BaseException as err:
        failure = output_failure(err, out, tmp)  # before the removal frees the disk again
        shutil.rmtree(tmp, ignore_errors=True)
        if failure is not None:
            raise failure from err
        raise


@contextlib.contextmanager
def output_errors(out: Path) -> Iterator[None]:
    """Raise an `OutputError` naming ``out`` for any OS error of the block's, which only makes
    or moves ``out`` and its temporary files (a permission error is then the output's too)."""
    try:
        yield
    except OSError as err:
        failure = output_failure(err, out, writing=True)
        if failure is None:
            raise
        raise failure from err


def output_failure(
    err: BaseException, out: Path, tmp: Path | None = None, writing: bool = False
) -> OutputError | None:
    """``err`` as an `OutputError` naming ``out`` when the output side failed, else ``None``.

    The output side failed when: the OS error is one that only writing raises (no space, quota,
    read-only file system, cross-device rename, busy); it is a permission error on a path of the
    output (``out``, a folder on the way to it, or inside ``tmp``) or while the block did
    nothing but ``writing``; or some other error (a library's own, e.g. the safetensors writer)
    came while ``tmp``'s file system is full or read-only.
    """
    if isinstance(err, MedsegError | KeyboardInterrupt) or not isinstance(err, Exception):
        return None
    if isinstance(err, OSError) and err.errno is not None:
        if err.errno in OUTPUT_ERRNOS:
            return OutputError(describe_os_error(err, out, tmp))
        if err.errno in ACCESS_ERRNOS and (writing or _on_output(err, out, tmp)):
            return OutputError(describe_os_error(err, out, tmp))
        return None
    code = _disk_state(tmp or out.parent)
    if code is None:
        return None
    reason = OSError(code, f"{os.strerror(code)} ({type(err).__name__})")
    return OutputError(describe_os_error(reason, out))


def temp_dir(parent: Path, prefix: str) -> Path:
    """Make a new empty folder ``parent/<prefix><pid>-<random>`` with the umask's permissions."""
    while True:
        path = parent / f"{prefix}{os.getpid()}-{secrets.token_hex(4)}"
        try:
            path.mkdir(mode=0o777)
        except FileExistsError:
            continue
        return path


def remove_leftovers(parent: Path, prefix: str) -> None:
    """Remove ``parent/<prefix>*`` left by killed runs; a live process's are left alone."""
    for stale in parent.glob(f"{glob_escape(prefix)}*"):
        owner = _OWNER.match(stale.name[len(prefix) :])
        if owner is not None and int(owner.group(1)) != os.getpid() and _alive(int(owner.group(1))):
            continue
        if stale.is_dir() and not stale.is_symlink():
            shutil.rmtree(stale, ignore_errors=True)
        else:
            stale.unlink(missing_ok=True)


def glob_escape(text: str) -> str:
    """``text`` with glob's special characters taken literally."""
    return re.sub(r"([*?\[])", r"[\1]", text)


@contextlib.contextmanager
def sigterm_raises() -> Iterator[None]:
    """Within the block SIGTERM raises `Interrupted`, as Ctrl-C raises KeyboardInterrupt, so
    that cleanup runs. Only in the main thread, and only where SIGTERM would otherwise kill the
    process outright (a handler someone else set, e.g. training's, is kept)."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL
    ):
        yield
        return
    signal.signal(signal.SIGTERM, _interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def write_json(path: str | Path, data: Any) -> None:
    """Write ``data`` as indented JSON to ``path`` with `atomic_file`."""
    write_text(path, json.dumps(data, indent=2, sort_keys=False) + "\n")


def write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` with `atomic_file`."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


@contextlib.contextmanager
def atomic_file(path: str | Path, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary name beside ``path`` that replaces ``path`` when the block succeeds.

    The block writes the file (by name, with any library). On success the file is flushed to
    the disk (fsync) and renamed over ``path``, and the rename is flushed too, so ``path`` is
    the old file or the whole new one even after a power loss. On an exception (or SIGTERM)
    the temporary file is removed and ``path`` is left as it was. The name is unique
    (``.<name>.tmp-<pid>-<random><suffix>``), so two writers never share one; those left by a
    killed run are removed first.

    Args:
        path: the file to write.
        suffix: ends the temporary name, for a library that goes by the file's ending.

    Raises:
        OutputError: the output side failed (its OS error, named, replaces the original).
    """
    path = Path(path)
    prefix = f".{path.name}{TMP}"
    with output_errors(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        remove_leftovers(path.parent, prefix)
    tmp = path.with_name(f"{prefix}{os.getpid()}-{secrets.token_hex(4)}{suffix}")
    try:
        with sigterm_raises():
            yield tmp
        with output_errors(path):
            publish(tmp, path)
    except BaseException as err:
        failure = output_failure(err, path, tmp)  # before the removal frees the disk again
        tmp.unlink(missing_ok=True)
        if failure is not None:
            raise failure from err
        raise


def publish(tmp: str | Path, path: str | Path) -> None:
    """Rename the finished file ``tmp`` over ``path`` (same file system), both flushed to the
    disk first: the file's data, then the folder's entry."""
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(Path(path).parent)


def _fsync_dir(folder: Path) -> None:
    """Flush ``folder``'s entries (a rename) to the disk, where the OS lets a folder be opened."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on a folder; the rename is done anyway
        pass
    finally:
        os.close(fd)


def _swap(tmp: Path, out: Path) -> None:
    """Put ``tmp`` in the place of ``out``; the old ``out`` is removed only once that is done."""
    old = None
    if out.is_dir() and not out.is_symlink():
        old = out.parent / f".{out.name}{TMP}{os.getpid()}-old-{secrets.token_hex(4)}"
        os.rename(out, old)
    elif out.exists() or out.is_symlink():
        out.unlink()
    try:
        os.replace(tmp, out)
    except OSError:
        if old is not None:
            os.rename(old, out)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _interrupt(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


def _real(path: str | Path) -> Path:
    return Path(os.path.realpath(path))


def _on_output(err: OSError, out: Path, tmp: Path | None) -> bool:
    """Whether ``err``'s path is the output's: ``out`` or a folder on the way to it, or a path
    inside ``out`` or ``tmp``."""
    real_out = _real(out)
    for name in (err.filename, err.filename2):
        if not isinstance(name, str):
            continue
        path = _real(name)
        if path == real_out or path in real_out.parents or real_out in path.parents:
            return True
        if tmp is not None and (path == _real(tmp) or _real(tmp) in path.parents):
            return True
    return False


def _disk_state(path: Path) -> int | None:
    """ENOSPC or EROFS when ``path``'s file system is full or read-only, else ``None``."""
    try:
        stat = os.statvfs(path)
    except OSError:
        return None
    if stat.f_flag & os.ST_RDONLY:
        return errno.EROFS
    if stat.f_bavail == 0:
        return errno.ENOSPC
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True
