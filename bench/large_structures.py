"""Choose the large-structure recipe (organs, lesions) on a validation split, by measurement.

The defaults are tuned for thin vessels: 96-pixel patches at full resolution, which see only part
of an organ. This benchmark clones the repository's committed state into a temporary folder and,
with the real `dvc exp run`, trains each candidate on a large-structure data set (default: the
CHAOS CT liver slices in ``../shared/datasets/CHAOS_CT3``, folders layout, DICOM), every
candidate with the same budget of training pixels (patches per epoch x patch side^2 x epochs)
and the same seed:

- ``full-96``: the defaults (patch 96, full resolution);
- ``full-192``: patch 192 at full resolution (more context, 4x fewer patches);
- ``half-128``: ``preprocess.max_side`` half the image side (256 for 512^2 CT), patch 128;
- ``half-256``: the same downscale, patch 256 (the whole slice in one patch);
- ``quarter-128``: a quarter of the side (128), patch 128 (the whole slice).

The choice is the best validation Dice (``best_val_dice`` of the train stage: Dice inside the
FOV on the held-out training cases, at the ground truth's resolution). Test metrics are printed
beside it but are not used to choose. Prints a Markdown table.

    python bench/large_structures.py                          # CHAOS_CT3, 20 epochs
    python bench/large_structures.py --data /data/lits2d --side 512 --epochs 30
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BASE_PATCHES = 512  # patches per epoch at patch 96; the others keep patches x side^2


def candidates(side: int) -> dict[str, tuple[int | None, int]]:
    """Name -> (preprocess.max_side, train.patch_size)."""
    return {
        "full-96": (None, 96),
        "full-192": (None, 192),
        "half-128": (side // 2, 128),
        "half-256": (side // 2, 256),
        "quarter-128": (side // 4, 128),
    }


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"$ {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--data", type=Path, default=REPO.parent / "shared" / "datasets" / "CHAOS_CT3",
        help="a folders-layout data set with training/ and test/ (CHAOS_CT3)",
    )  # fmt: skip
    parser.add_argument("--side", type=int, default=512, help="the images' side (512)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="run only these candidates")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args()
    data = args.data.resolve()
    if not data.is_dir():
        sys.exit(f"{data}: not found; give a large-structure data set with --data")

    work = Path(tempfile.mkdtemp(prefix="medseg-large-"))
    clone = work / "medseg"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(clone / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    common = [
        f"data.root={data}", "data.layout=folders", "convert.fov_fallback=whole_image",
        "preprocess.channel=gray", "preprocess.contrast=none", f"train.epochs={args.epochs}",
        "train.val_every=5", "evaluate.window=512",
    ]  # fmt: skip
    rows = []
    for name, (max_side, patch) in candidates(args.side).items():
        if args.only and name not in args.only:
            continue
        patches = max(8, round(BASE_PATCHES * 96**2 / patch**2))
        sets = [
            *common,
            f"preprocess.max_side={'null' if max_side is None else max_side}",
            f"train.patch_size={patch}",
            f"train.patches_per_epoch={patches}",
        ]
        cmd = [sys.executable, "-m", "dvc", "exp", "run", "-n", name]
        for s in sets:
            cmd += ["-S", s]
        print(f"$ dvc exp run -n {name} " + " ".join(f"-S {s}" for s in sets), flush=True)
        start = time.perf_counter()
        run(cmd, clone, env)
        wall = time.perf_counter() - start
        train = json.loads((clone / "results" / "train" / "metrics.json").read_text())
        test = json.loads((clone / "results" / "evaluate" / "metrics.json").read_text())["test"]
        row = {
            "candidate": name,
            "max_side": max_side or "-",
            "patch": patch,
            "patches/epoch": patches,
            "val dice": train["best_val_dice"],
            "best epoch": train["best_epoch"],
            "test dice": test["fov"]["dice"],
            "test iou": test["fov"]["iou"],
            "wall s": wall,
        }
        print(row, flush=True)
        rows.append(row)

    best = max(rows, key=lambda r: r["val dice"])
    keys = list(rows[0])
    print(f"\nData: {data}; {args.epochs} epochs; CPUs visible: {os.cpu_count()}")
    print("| " + " | ".join(keys) + " |\n|" + " --- |" * len(keys))
    for r in rows:
        cells = [f"{v:.4f}" if isinstance(v, float) else str(v) for v in r.values()]
        cells[-1] = f"{r['wall s']:.0f}"
        mark = " (chosen)" if r is best else ""
        print("| " + " | ".join(cells) + f"{mark} |")
    print(f"\nchosen on validation Dice: {best['candidate']}")
    if args.keep:
        print(f"kept: {clone}")
    else:
        shutil.rmtree(work)


if __name__ == "__main__":
    main()
