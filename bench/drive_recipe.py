"""The DRIVE recipe: train time and test metrics against the targets, from a clean clone.

Clones this repository's committed state into a temporary folder and runs the README's DRIVE
recipe there with the real `dvc exp run`, timing each stage from DVC's own output. Prints a
Markdown table: the train stage's wall time (model building, every epoch and the validations
included) and the DRIVE test metrics (scored inside the FOV, pooled), each beside its target.

    python bench/drive_recipe.py --drive ../shared/datasets/DRIVE
    python bench/drive_recipe.py --drive /data/DRIVE --keep    # keep the clone to look at it
    python bench/drive_recipe.py --drive ../shared/datasets/DRIVE --previous daa71ce

With ``--previous REF`` the same recipe then runs on commit REF too (one run, the same machine),
and the table gives both, with the ratio of their training throughput (the median of the
train stage's per-epoch images/s, validation excluded).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# The README gives exactly these overrides (a test checks it); hyperparameters chosen on the
# validation split only.
RECIPE = (
    "-S preprocess.contrast=clahe -S train.epochs=40 -S train.patches_per_epoch=1024 "
    "-S train.lr=3.0e-3 -S train.val_every=5 -S evaluate.tta=true"
)
EPOCH_RATE = re.compile(r"epoch \d+/\d+ .*\(([0-9.]+) images/s\)")
TARGETS = {"train minutes": ("<=", 10.0), "dice": (">=", 0.815), "auc_roc": (">=", 0.975)}


def stage_times(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds from each "Running stage 'X'" line to the next one (or to ``end``)."""
    starts = [(t, line.split("'")[1]) for t, line in lines if line.startswith("Running stage '")]
    bounds = [t for t, _ in starts[1:]] + [end]
    return {name: stop - start for (start, name), stop in zip(starts, bounds, strict=True)}


def run_recipe(ref: str, drive: Path, work: Path) -> dict[str, float]:
    """Clone ``ref`` of this repository into ``work`` and run the recipe there with DVC."""
    clone = work / ref
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", ref], check=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(clone / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable, "-m", "dvc", "exp", "run",
        "-S", f"data.root={drive}", "-S", "data.layout=drive", *RECIPE.split(),
    ]  # fmt: skip
    print(f"$ ({ref})", " ".join(cmd[2:]), flush=True)
    proc = subprocess.Popen(
        cmd, cwd=clone, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    assert proc.stdout is not None
    lines = []
    for line in proc.stdout:
        lines.append((time.perf_counter(), line.strip()))
        print(line, end="", flush=True)
    if proc.wait() != 0:
        sys.exit(f"{ref}: dvc exp run failed (exit code {proc.returncode}); see the output above")
    end = next(t for t, line in lines if line.startswith("Ran experiment"))
    times = stage_times(lines, end)
    metrics = json.loads((clone / "results" / "evaluate" / "metrics.json").read_text())
    fov = metrics["test"]["fov"]
    rates = [float(m.group(1)) for _, line in lines if (m := EPOCH_RATE.search(line))]
    print(f"\n{ref}: DRIVE test, FOV, pooled:", ", ".join(f"{k} {v}" for k, v in fov.items()))
    if "second_observer" in metrics["test"]:
        print(f"{ref}: second observer:", metrics["test"]["second_observer"])
    print(f"{ref}: stage wall times (s):", {k: round(v, 1) for k, v in times.items()})
    return {
        "train minutes": times["train"] / 60,
        "dice": fov["dice"],
        "auc_roc": fov["auc_roc"],
        "train images/s (median epoch)": statistics.median(rates) if rates else float("nan"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--drive", type=Path, required=True, help="the DRIVE folder")
    parser.add_argument(
        "--previous",
        metavar="REF",
        help="also run the recipe on this commit, right after, and print both side by side",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temporary clones")
    args = parser.parse_args()
    drive = args.drive.resolve()
    if not (drive / "training").is_dir() or not (drive / "test").is_dir():
        sys.exit(f"{drive}: not the DRIVE folder (needs training/ and test/)")

    work = Path(tempfile.mkdtemp(prefix="medseg-drive-"))
    head = subprocess.run(
        ["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"],
        check=True, capture_output=True, text=True,
    ).stdout.strip()  # fmt: skip
    refs = [head] + ([args.previous] if args.previous else [])
    found = {ref: run_recipe(ref, drive, work) for ref in refs}

    header = "| measure | " + " | ".join(refs) + " | target | met |"
    print("\n" + header + "\n| --- |" + " ---: |" * len(refs) + " --- | --- |")
    for key in found[head]:
        values = " | ".join(f"{found[ref][key]:.4f}" for ref in refs)
        op, target = TARGETS.get(key, ("", None))
        if target is None:
            print(f"| {key} | {values} | | |")
            continue
        value = found[head][key]
        met = value <= target if op == "<=" else value >= target
        print(f"| {key} | {values} | {op} {target} | {'yes' if met else 'NO'} |")
    if args.previous:
        ratio = (
            found[head]["train images/s (median epoch)"]
            / found[args.previous]["train images/s (median epoch)"]
        )
        print(f"\ntrain throughput {head} / {args.previous}: {ratio:.3f} (target >= 0.90)")
    print(f"CPUs visible: {os.cpu_count()}")
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
