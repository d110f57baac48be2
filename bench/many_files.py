"""Benchmark of DVC with many small files, and of a push + pull round trip through S3.

1. The same images two ways, each `dvc add`-ed in its own temporary git + DVC repository:
   ``--files`` small PNG files in one folder, and one packed ``.npz`` array file holding them
   all. Times `dvc add`, a no-op `dvc status` (median of ``--repeats``), `dvc push` to an S3
   server, and `dvc pull` into a fresh clone.
2. The default pipeline's outputs (the ones this repository's ``dvc.lock`` names): `dvc push`
   to the S3 server and `dvc pull` into a fresh clone. The outputs come from ``--cache``, a DVC
   cache that holds them (e.g. ``.dvc/cache`` after a `dvc repro`), read as a local
   remote and never written; without it this part is skipped.

The S3 server is moto's standalone server on 127.0.0.1 (its objects live in memory), so the
times are DVC's own cost per file and per byte, not a network's. Prints a Markdown table.

    python bench/many_files.py
    python bench/many_files.py --files 10000 --cache .dvc/cache
"""

from __future__ import annotations

import argparse
import io
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
BUCKET = "bench"
KEYS = {"AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench"}


def env() -> dict[str, str]:
    out = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    out.update(KEYS, AWS_DEFAULT_REGION="us-east-1", AWS_EC2_METADATA_DISABLED="true")
    out.update(GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b")
    out.update(GIT_COMMITTER_EMAIL="b@b")
    out["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{out.get('PATH', '')}"
    return out


def sh(cwd: Path, *args: str) -> float:
    """Run ``git ...`` or ``dvc ...`` in ``cwd``; return its wall time in seconds."""
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=env(), capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"{' '.join(args)} failed in {cwd}:\n{proc.stdout}\n{proc.stderr}")
    return seconds


@contextmanager
def moto_server() -> Iterator[str]:
    """moto's S3 server on a free port of 127.0.0.1 with an empty bucket; yields its URL."""
    import boto3

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(150):
            try:
                urllib.request.urlopen(f"{url}/moto-api/", timeout=1).close()
                break
            except OSError:
                time.sleep(0.2)
        client = boto3.client(
            "s3",
            endpoint_url=url,
            aws_access_key_id="bench",
            aws_secret_access_key="bench",
            region_name="us-east-1",
        )
        client.create_bucket(Bucket=BUCKET)
        yield url
    finally:
        proc.terminate()
        proc.wait()


def new_repo(path: Path, s3_url: str, prefix: str) -> Path:
    """Make ``path`` (new or holding files) a git + DVC repository with the S3 default remote."""
    path.mkdir(parents=True, exist_ok=True)
    sh(path, "git", "init", "-q")
    sh(path, "dvc", "init", "-q")
    sh(path, "dvc", "config", "core.analytics", "false")
    sh(path, "dvc", "remote", "add", "-d", "s3", f"s3://{BUCKET}/{prefix}")
    sh(path, "dvc", "remote", "modify", "s3", "endpointurl", s3_url)
    return path


def round_trip(repo: Path, clone: Path, targets: list[str]) -> tuple[float, float]:
    """Commit, `dvc push`, clone, `dvc pull`; return (push seconds, pull seconds)."""
    sh(repo, "git", "add", "-A")
    sh(repo, "git", "commit", "-qm", "bench")
    push = sh(repo, "dvc", "push", *targets)
    sh(repo.parent, "git", "clone", "-q", str(repo), str(clone))
    pull = sh(clone, "dvc", "pull", *targets)
    return push, pull


def many_vs_packed(root: Path, s3_url: str, n: int, size: int, repeats: int) -> list[list[str]]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(n, size, size), dtype=np.uint8)
    rows = []
    for kind in ("many", "packed"):
        repo = new_repo(root / kind, s3_url, kind)
        data = repo / "data"
        data.mkdir()
        if kind == "many":
            (data / "images").mkdir()
            for i, image in enumerate(images):
                Image.fromarray(image).save(data / "images" / f"{i:05d}.png")
            target = "data/images"
        else:
            buffer = io.BytesIO()
            np.savez(buffer, images=images)
            (data / "images.npz").write_bytes(buffer.getvalue())
            target = "data/images.npz"
        nbytes = sum(p.stat().st_size for p in data.rglob("*") if p.is_file())
        add = sh(repo, "dvc", "add", target)
        status = statistics.median(sh(repo, "dvc", "status") for _ in range(repeats))
        # new modification times (a copy, an rsync, a restore): DVC must hash every file again
        stamp = time.time() + 10
        for path in data.rglob("*"):
            if path.is_file():
                os.utime(path, (stamp, stamp))
        rehash = sh(repo, "dvc", "status")
        push, pull = round_trip(repo, root / f"{kind}-clone", [])
        files = n if kind == "many" else 1
        rows.append(
            [
                f"{files} file{'s' if files > 1 else ''} ({kind})",
                f"{nbytes / 2**20:.1f}",
                f"{add:.2f}",
                f"{status:.2f}",
                f"{rehash:.2f}",
                f"{push:.2f}",
                f"{pull:.2f}",
            ]
        )
    return rows


def pipeline_round_trip(root: Path, s3_url: str, cache: Path) -> list[str]:
    repo = root / "pipeline"
    repo.mkdir()
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, repo / name)
    for name in ("stages", "src", "results"):
        shutil.copytree(REPO / name, repo / name, ignore=shutil.ignore_patterns("__pycache__"))
    new_repo(repo, s3_url, "pipeline")
    sh(repo, "dvc", "remote", "add", "source", str(cache.resolve()))
    sh(repo, "dvc", "pull", "-r", "source")  # the outputs, from the given cache, read only
    outs = [p for p in ("data", "models", "results") if (repo / p).exists()]
    nbytes = sum(p.stat().st_size for o in outs for p in (repo / o).rglob("*") if p.is_file())
    push, pull = round_trip(repo, root / "pipeline-clone", [])
    return [
        "default pipeline outputs",
        f"{nbytes / 2**20:.1f}",
        "-",
        "-",
        "-",
        f"{push:.2f}",
        f"{pull:.2f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--files", type=int, default=10_000, help="number of small images")
    parser.add_argument("--size", type=int, default=32, help="their side in pixels")
    parser.add_argument("--repeats", type=int, default=3, help="no-op `dvc status` runs")
    parser.add_argument("--cache", type=Path, help="a DVC cache holding the pipeline outputs")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="medseg-many-files-") as tmp, moto_server() as url:
        root = Path(tmp)
        rows = many_vs_packed(root, url, args.files, args.size, args.repeats)
        if args.cache is not None:
            if not (args.cache / "files" / "md5").is_dir():
                sys.exit(f"--cache {args.cache}: not a DVC 3 cache (no files/md5 inside)")
            rows.append(pipeline_round_trip(root, url, args.cache))

    header = [
        "data",
        "MiB",
        "dvc add s",
        "no-op dvc status s",
        "dvc status, files touched s",
        "dvc push s",
        "dvc pull s",
    ]
    print("| " + " | ".join(header) + " |")
    print("|" + "|".join(" --- " for _ in header) + "|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    many, packed = rows[0], rows[1]
    columns = (("dvc add", 2), ("no-op dvc status", 3), ("dvc status, files touched", 4))
    for name, col in (*columns, ("dvc push", 5), ("dvc pull", 6)):
        ratio = float(many[col]) / max(float(packed[col]), 1e-9)
        print(f"{name}: {ratio:.1f}x slower with {args.files} files than with one packed file")


if __name__ == "__main__":
    main()
