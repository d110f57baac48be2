"""Benchmark of the whole pipeline: `dvc repro` time, no-op `dvc repro` time, peak memory.

Runs the real `dvc repro` on a temporary copy of this repository (its params.yaml, or one given
with --params), sampling the resident memory of the whole process tree (dvc and the stage it
runs) every 0.1 s, then times no-op reruns. Prints a Markdown table.

    python bench/pipeline.py                 # the default pipeline on the built-in data
    python bench/pipeline.py --noop-runs 5
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
STAGES = ("synthesize", "convert", "preprocess", "train", "evaluate")


def tree_rss(proc: psutil.Process) -> int:
    """Resident bytes of a process and all its descendants."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        with contextlib.suppress(psutil.Error):
            total += p.memory_info().rss
    return total


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> tuple[float, int, str]:
    """Run ``cmd``; return (seconds, peak tree RSS in bytes, stdout)."""
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, tree_rss(ps))
            except psutil.Error:
                return
            time.sleep(0.1)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    out, _ = proc.communicate()
    seconds = time.perf_counter() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed with exit code {proc.returncode}")
    return seconds, peak, out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--noop-runs", type=int, default=3)
    args = parser.parse_args()

    env = dict(os.environ, HF_HUB_OFFLINE="1")
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(
        GIT_AUTHOR_NAME="b",
        GIT_AUTHOR_EMAIL="b@b",
        GIT_COMMITTER_NAME="b",
        GIT_COMMITTER_EMAIL="b@b",
    )
    dvc = [sys.executable, "-m", "dvc"]
    with tempfile.TemporaryDirectory(prefix="medseg-bench-") as tmp:
        work = Path(tmp) / "project"
        work.mkdir()
        for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
            shutil.copy(REPO / name, work / name)
        shutil.copy(args.params, work / "params.yaml")
        for name in ("stages", "src"):
            shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
        for cmd in (
            ["git", "init", "-q"],
            [*dvc, "init", "-q"],
            ["git", "add", "-A"],
            ["git", "commit", "-qm", "b"],
        ):
            subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)

        seconds, peak, out = timed([*dvc, "repro"], work, env)
        ran = [s for s in STAGES if f"Running stage '{s}'" in out]
        noop = [timed([*dvc, "repro"], work, env)[0] for _ in range(args.noop_runs)]
        metrics = (work / "results" / "evaluate" / "metrics.json").read_text()

    cpus = len(os.sched_getaffinity(0))
    print(
        f"\nmedseg pipeline benchmark ({cpus} CPUs, torch threads default, params: {args.params})\n"
    )
    print("| measure | value | target |")
    print("| --- | --- | --- |")
    print(f"| `dvc repro`, all stages ({len(ran)} ran) | {seconds:.1f} s | < 600 s |")
    print(f"| no-op `dvc repro`, median of {len(noop)} | {statistics.median(noop):.2f} s | < 2 s |")
    print(f"| peak RSS of the process tree | {peak / 2**30:.2f} GiB | < 4 GiB |")
    print(f"\nmetrics.json: {' '.join(metrics.split())}")


if __name__ == "__main__":
    main()
