"""The DRIVE recipe: train time and test metrics against the targets, from a clean clone.

Clones this repository's committed state into a temporary folder and runs the README's DRIVE
recipe there with the real `dvc exp run`, timing each stage from DVC's own output. Prints a
Markdown table: the train stage's wall time (model building, every epoch and the validations
included), the DRIVE test metrics (scored inside the FOV, pooled), each beside its target, and
the peak resident memory of the run's process tree (`harness.run`).

    python bench/drive_recipe.py --drive ../shared/datasets/DRIVE
    python bench/drive_recipe.py --drive /data/DRIVE --keep    # keep the clone to look at it
    python bench/drive_recipe.py --drive ../shared/datasets/DRIVE --previous daa71ce
    python bench/drive_recipe.py --drive ../shared/datasets/DRIVE -S train.amp_cpu=false

``-S`` adds overrides after the recipe's: on a CPU with native bf16 (AVX-512 bf16 or AMX, where
``train.amp_cpu: auto`` trains in bf16), ``-S train.amp_cpu=false`` gives the fp32 run to compare
the bf16 one with at the recipe's full length.

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
from pathlib import Path

from harness import machine, run, table

REPO = Path(__file__).resolve().parents[1]

# The README gives exactly these overrides (a test checks it); hyperparameters chosen on the
# validation split only.
RECIPE = (
    "-S preprocess.contrast=clahe -S train.epochs=40 -S train.patches_per_epoch=1024 "
    "-S train.lr=3.0e-3 -S train.val_every=5 -S evaluate.tta=true -S evaluate.threshold=0.5"
)
EPOCH_RATE = re.compile(r"epoch \d+/\d+ .*\(([0-9.]+) images/s\)")
TARGETS = {"train minutes": ("<=", 10.0), "dice": (">=", 0.815), "auc_roc": (">=", 0.975)}


def stage_times(lines: list[tuple[float, str]], end: float) -> dict[str, float]:
    """Seconds from each "Running stage 'X'" line to the next one (or to ``end``)."""
    starts = [(t, line.split("'")[1]) for t, line in lines if line.startswith("Running stage '")]
    bounds = [t for t, _ in starts[1:]] + [end]
    return {name: stop - start for (start, name), stop in zip(starts, bounds, strict=True)}


def run_recipe(ref: str, drive: Path, work: Path, overrides: list[str]) -> dict[str, float]:
    """Clone ``ref`` of this repository into ``work`` and run the recipe there with DVC."""
    clone = work / ref
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    subprocess.run(["git", "-C", str(clone), "checkout", "-q", ref], check=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(clone / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        sys.executable, "-m", "dvc", "exp", "run",
        "-S", f"data.root={drive}", "-S", "data.layout=drive", *RECIPE.split(),
        *(arg for key in overrides for arg in ("-S", key)),
    ]  # fmt: skip
    print(f"$ ({ref})", " ".join(cmd[2:]), flush=True)
    done = run(cmd, cwd=clone, env=env, echo=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{ref}: dvc exp run failed (exit code {done.returncode}); see the output above")
    lines = [(t, line.strip()) for t, line in done.lines]
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
        "peak RSS of the process tree (GiB)": done.peak_rss / 2**30,
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
    parser.add_argument(
        "-S", "--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
        help="a params override after the recipe's (repeatable)",
    )  # fmt: skip
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
    found = {ref: run_recipe(ref, drive, work, args.overrides) for ref in refs}

    rows = []
    for key in found[head]:
        values = [f"{found[ref][key]:.4f}" for ref in refs]
        op, target = TARGETS.get(key, ("", None))
        if target is None:
            rows.append((key, *values, "", ""))
            continue
        value = found[head][key]
        met = value <= target if op == "<=" else value >= target
        rows.append((key, *values, f"{op} {target}", "yes" if met else "NO"))
    print(f"\n{machine()}; overrides: {' '.join(args.overrides) or 'none'}\n")
    print(table(("measure", *refs, "target", "met"), rows))
    if args.previous:
        ratio = (
            found[head]["train images/s (median epoch)"]
            / found[args.previous]["train images/s (median epoch)"]
        )
        print(f"\ntrain throughput {head} / {args.previous}: {ratio:.3f} (target >= 0.90)")
    if args.keep:
        print(f"kept: {work}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
