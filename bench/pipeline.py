"""Benchmark of the whole pipeline: `dvc repro` time, no-op `dvc repro` time, peak memory.

Runs the real `dvc repro` on a temporary copy of this repository (its params.yaml, or one given
with --params), with the peak resident memory of the whole process tree (dvc and the stage it
runs; `harness.run`), then times no-op reruns. Prints a Markdown table.

    python bench/pipeline.py                 # the default pipeline on the built-in data
    python bench/pipeline.py --noop-runs 5
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import machine, run, table

REPO = Path(__file__).resolve().parents[1]
STAGES = ("synthesize", "convert", "plan", "preprocess", "train", "evaluate")


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

        repro = run([*dvc, "repro"], cwd=work, env=env)
        ran = [s for s in STAGES if f"Running stage '{s}'" in repro.output]
        noop = [run([*dvc, "repro"], cwd=work, env=env).seconds for _ in range(args.noop_runs)]
        metrics = (work / "results" / "evaluate" / "metrics.json").read_text()

    print(f"\nmedseg pipeline benchmark (torch threads default, params: {args.params})")
    print(machine() + "\n")
    rows = [
        (f"`dvc repro`, all stages ({len(ran)} ran)", f"{repro.seconds:.1f} s", "< 600 s"),
        (f"no-op `dvc repro`, median of {len(noop)}", f"{statistics.median(noop):.2f} s", "< 2 s"),
        ("peak RSS of the process tree", f"{repro.peak_rss / 2**30:.2f} GiB", "< 4 GiB"),
    ]
    print(table(("measure", "value", "target"), rows))
    print(f"\nmetrics.json: {' '.join(metrics.split())}")


if __name__ == "__main__":
    main()
