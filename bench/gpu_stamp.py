"""The stamp of .gpu/: which source built it and what it holds, so that bench/gpu.sh refuses a
stale or half-carried folder in one line instead of measuring the wrong code.

``write`` (bench/gpu_prepare.sh, last) records in ``.gpu/stamp.json``: the commit (and whether
the working tree had changes), a SHA-256 over the files that made the data or run on the GPU
machine (`SOURCES`: every file under ``src/`` and ``stages/``, ``bench/gpu*``,
``bench/harness.py`` and ``params.yaml``, by relative path and content; caches left out), and
the size and SHA-256 of every file packed in ``.gpu/`` (and the machine line of the CPU that
built it, `harness.machine`). ``check`` (bench/gpu.sh, first)
computes the same over the working tree it runs in and exits 2 with one line naming the first
difference. Standard library only: it runs before anything else is known to import.

    python bench/gpu_stamp.py write [--gpu .gpu]
    python bench/gpu_stamp.py check [--gpu .gpu]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import subprocess
import sys
from pathlib import Path

from harness import machine

STAMP = "stamp.json"
SOURCES = ("src", "stages", "bench/gpu*", "bench/harness.py", "params.yaml")
SKIP_PARTS = {"__pycache__", ".mypy_cache", ".ruff_cache", ".pytest_cache"}
SKIP_SUFFIXES = (".pyc", ".pyo")
REBUILD = "rebuild it here with: bash bench/gpu_prepare.sh"


def source_files(root: Path) -> list[Path]:
    """The files `SOURCES` names under ``root``, sorted, caches and build leftovers left out."""
    found: set[Path] = set()
    for pattern in SOURCES:
        for top in root.glob(pattern):
            for path in [top] if top.is_file() else top.rglob("*"):
                rel = path.relative_to(root)
                skipped = any(p in SKIP_PARTS or p.endswith(".egg-info") for p in rel.parts)
                if path.is_file() and not skipped and not path.name.endswith(SKIP_SUFFIXES):
                    found.add(rel)
    return sorted(found, key=lambda p: p.as_posix())


def source_hash(root: Path) -> str:
    """SHA-256 (hex) over `source_files`: each relative path and its bytes."""
    digest = hashlib.sha256()
    for rel in source_files(root):
        data = (root / rel).read_bytes()
        digest.update(f"{rel.as_posix()}\0{len(data)}\0".encode())
        digest.update(data)
    return digest.hexdigest()


def packed(gpu: Path) -> dict[str, dict[str, object]]:
    """Every file in ``gpu`` but the stamp: relative path -> size and SHA-256."""
    files = {}
    for path in sorted(gpu.rglob("*")):
        if path.is_file() and path.name != STAMP:
            data = path.read_bytes()
            rel = path.relative_to(gpu).as_posix()
            files[rel] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    return files


def _git(root: Path, *args: str) -> str:
    try:
        proc = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return ""
    return proc.stdout.strip() if proc.returncode == 0 else ""


def write(root: Path, gpu: Path) -> dict:
    """Write ``gpu/stamp.json`` for the working tree at ``root``; return it."""
    commit = _git(root, "rev-parse", "HEAD") or "?"
    changes = bool(_git(root, "status", "--porcelain", "--untracked-files=no"))
    source, files = source_hash(root), packed(gpu)
    stamp = {
        "commit": commit, "changes": changes, "source_sha256": source, "files": files,
        "built_on": machine(),
    }  # fmt: skip
    (gpu / STAMP).write_text(json.dumps(stamp, indent=1) + "\n")
    total = sum(int(str(f["bytes"])) for f in files.values())
    print(
        f"gpu_stamp: {gpu / STAMP}: commit {commit[:10]}{' with changes' if changes else ''}, "
        f"source {source[:12]}, {len(files)} files, {total / 2**20:.1f} MiB"
    )
    return stamp


def check(root: Path, gpu: Path) -> str | None:
    """Why ``gpu`` does not belong to the working tree at ``root`` (one line), or None."""
    path = gpu / STAMP
    try:
        stamp = json.loads(path.read_text())
        want_source, want_files = stamp["source_sha256"], stamp["files"]
    except (OSError, ValueError, KeyError, TypeError) as err:
        return f"{path}: missing or unreadable ({type(err).__name__}); {REBUILD}"
    built = f"commit {str(stamp.get('commit', '?'))[:10]}"
    here = source_hash(root)
    if here != want_source:
        return (
            f"{gpu} is stale: built from source {want_source[:12]} ({built}), this working tree "
            f"is {here[:12]} (src/, stages/, bench/gpu*, params.yaml); {REBUILD}"
        )
    have = packed(gpu)
    for rel, want in want_files.items():
        got = have.get(rel)
        if got is None:
            return f"{gpu}/{rel} is missing (not carried whole?); {REBUILD}, carry {gpu.name}"
        if got != want:
            return (
                f"{gpu}/{rel} has {got['bytes']} bytes, the stamp {want['bytes']} (or another "
                f"checksum): carried partly or changed; {REBUILD}"
            )
    extra = sorted(set(have) - set(want_files))
    if extra:
        return f"{gpu}/{extra[0]} is not in the stamp; {REBUILD}"
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("action", choices=("write", "check"))
    parser.add_argument("--gpu", type=Path, default=Path(".gpu"), help="the folder (.gpu)")
    parser.add_argument("--root", type=Path, default=Path("."), help="the working tree")
    args = parser.parse_args()
    if args.action == "write":
        write(args.root, args.gpu)
        return
    problem = check(args.root, args.gpu)
    if problem is not None:
        print(f"gpu.sh: {problem}", file=sys.stderr)
        sys.exit(2)
    print(f"stamp: {args.gpu} matches this working tree")


if __name__ == "__main__":
    main()
