"""Pseudonyms for ``convert.names: hash``: case ids and sources as keyed hashes (HMAC-SHA256)
of the paths, the key's file, and messages with every name from a path taken out. The same key
hashes the patient groups (`medseg.convert.groups`).

The secret key matters: without it, anyone with a list of candidate names could hash them and
recognise the ids. It comes from an environment variable, else from a git-ignored file in the
repository (created on first use).
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import secrets
import stat
from pathlib import Path

from medseg.errors import MedsegError
from medseg.io.case_files import Problem

log = logging.getLogger(__name__)

ID_KEY_ENV = "MEDSEG_ID_KEY"
ID_KEY_FILE = Path(".medseg") / "id_key"
_KEY_HEX = re.compile(r"^[0-9a-fA-F]{32,}$")  # 128 bits at least


def relative(path: Path, root: Path) -> str:
    """``path`` relative to ``root``, with forward slashes."""
    return Path(os.path.relpath(path, root)).as_posix()


def hashed_source(path: Path, root: Path, key: bytes) -> str:
    """The token that names a file under ``root`` in every output: ``hmac:`` and 16 hex digits."""
    return "hmac:" + digest(path, root, key)[:16]


def digest(path: Path, root: Path, key: bytes) -> str:
    """HMAC-SHA256 of the path relative to the root: the same file gets the same id on every
    machine that holds the same key."""
    return hmac.new(key, relative(path, root).encode("utf-8"), hashlib.sha256).hexdigest()


def skip_row(problem: Problem, root: Path, key: bytes | None) -> dict[str, str]:
    """A row of ``skipped.csv``; with ``names: hash`` the file is named by its hash only."""
    if key is None:
        return {"source": relative(problem.path, root), "reason": problem.reason}
    return {
        "source": hashed_source(problem.path, root, key),
        "reason": redact(problem.reason, [problem.path], root, key),
    }


# A word of a message that names a file: it holds a path separator, ends like an image file,
# or is a DICOM UID. Such words are replaced when no name may reach the outputs.
_FILE_WORD = re.compile(
    r"[^\s'\"(),;]*[/\\][^\s'\"(),;]*"
    r"|[^\s'\"(),;/\\]+\.(?:dcm|dicom|dic|ima|png|tif|tiff|gif|jpe?g|bmp|csv)\b"
    r"|\b\d+(?:\.\d+){3,}\b",
    re.IGNORECASE,
)


def redact(
    text: str, paths: list[Path], root: Path, key: bytes, keep: tuple[Path, ...] = ()
) -> str:
    """``text`` without a name from the paths under ``root``.

    Steps: 1. each known file (absolute path, path under the root, name, stem) becomes its token,
    the one ``skipped.csv`` and the manifest give it; 2. any other word that names a file
    (see `_FILE_WORD`) becomes ``<path>``, except the root itself and ``keep`` (params and
    outputs, not data) and absolute paths outside the root."""
    tokens: dict[str, str] = {}
    for path in reversed(paths):  # the first path's token wins a name that two paths share
        token = hashed_source(path, root, key)
        names = {str(path), relative(path, root), path.name}
        names |= {path.stem} if len(path.stem) >= 3 else set()  # "a" would eat the prose
        tokens.update(dict.fromkeys(names, token))
    for name in sorted(tokens, key=len, reverse=True):  # whole paths before their names
        text = text.replace(name, tokens[name])
    kept = {form for p in (root, *keep) for form in (str(p), p.as_posix(), f"{p.as_posix()}/")}
    top = os.path.abspath(root)

    def word(match: re.Match[str]) -> str:
        name = match[0].rstrip(":.")
        if (
            name in kept
            or not re.search(r"[^\W\d]", name)  # "0/255" names nothing
            or (os.path.isabs(name) and not Path(os.path.abspath(name)).is_relative_to(top))
        ):
            return match[0]
        return "<path>" + match[0][len(name) :]

    return _FILE_WORD.sub(word, text)


def find_sources(root: Path, tokens: list[str], key: bytes) -> dict[str, list[Path]]:
    """The files under ``root`` behind ``hmac:...`` tokens (from ``skipped.csv``, the manifest's
    ``source`` column or a message), found by hashing every path with the key.

    Returns:
        Token -> the files it names (empty where none does).
    """
    found: dict[str, list[Path]] = {token: [] for token in tokens}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        token = hashed_source(path, root, key)
        if token in found:
            found[token].append(path)
    return found


def id_key(start: Path | None = None, create: bool = True) -> bytes:
    """The secret key of ``convert.names: hash``.

    Looked for in this order: the environment variable ``MEDSEG_ID_KEY`` (hex, 32+ digits);
    ``.medseg/id_key`` in the working folder or a folder above it (so that a ``dvc exp run``
    in a temporary copy under ``.dvc/tmp`` finds the repository's key); else a new random key
    is written (mode 0600) at the repository root, unless ``create`` is false. A different key
    gives different ids.

    Raises:
        MedsegError: the key is malformed, or its file is readable by others.
    """
    if (value := os.environ.get(ID_KEY_ENV)) is not None:
        return _parse_key(value, f"${ID_KEY_ENV}")
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ID_KEY_FILE).is_file():
            return _read_key(folder / ID_KEY_FILE)
    home = Path(*here.parts[: here.parts.index(".dvc")]) if ".dvc" in here.parts else here
    if not create:
        raise MedsegError(
            f"no id key: neither ${ID_KEY_ENV} nor {ID_KEY_FILE} in {here} or a folder above it"
        )
    return _create_key(home / ID_KEY_FILE)


def key_fingerprint(key: bytes) -> str:
    """A short public name of a key (it tells keys apart, and reveals nothing of them)."""
    return hmac.new(key, b"medseg id key fingerprint", hashlib.sha256).hexdigest()[:12]


def _parse_key(text: str, where: str) -> bytes:
    text = text.strip()
    if not _KEY_HEX.match(text) or len(text) % 2:
        raise MedsegError(
            f"{where}: the id key of convert.names: hash must be an even number of 32 or more "
            "hex digits (make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return bytes.fromhex(text)


def _read_key(path: Path) -> bytes:
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise MedsegError(f"{path}: the id key is readable by other users; run `chmod 600 {path}`")
    try:
        return _parse_key(path.read_text(encoding="ascii"), str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise MedsegError(f"{path}: cannot read the id key ({err})") from None


def _create_key(path: Path) -> bytes:
    """Write a new random key, readable by its owner only; another process's key wins a race."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    ignore = path.parent / ".gitignore"  # never committed, whatever the repository's .gitignore
    if not ignore.exists():
        ignore.write_text("*\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32) + "\n")
    log.warning(
        "%s: new id key for convert.names: hash and the keyed hashes of patient groups; keep "
        "it (ids and groups change with the key) and copy it to every machine that converts "
        "this data set", path
    )  # fmt: skip
    return _read_key(path)
