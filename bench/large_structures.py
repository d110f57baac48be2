"""Choose the large-structure recipe (organs, lesions) on a validation split, by measurement.

The defaults are tuned for thin vessels: 96-pixel patches at full resolution, which see only part
of an organ. This benchmark clones the repository's committed state into a temporary folder and,
with the real `dvc exp run`, trains each candidate on a large-structure data set, every
candidate with the same budget of training pixels (patches per epoch x patch side^2 x epochs)
and the same seed:

- ``full-96``: the defaults (patch 96, full resolution);
- ``full-192``: patch 192 at full resolution (more context, 4x fewer patches);
- ``half-128``: ``preprocess.max_side`` half the image side, patch 128;
- ``half-256``: the same downscale, patch 256 (the whole image in one patch at side 512);
- ``quarter-128``: a quarter of the side, patch 128 (the whole image).

Data sets (``--data``):

- ``synthetic`` (the default): independent 384x384 "abdomen" slices made here, in the folders
  layout: a textured body, a large organ on the left (the label) and, on the right, a smaller
  one of the same intensity and texture that is not labelled (as liver and spleen are alike on
  CT): a patch inside either cannot tell them apart, the whole image can. Cases are independent,
  so the validation split measures generalisation.
- a folder: any folders-layout set with ``training/`` and ``test/`` (e.g. the CHAOS CT liver
  slices in ``../shared/datasets/CHAOS_CT3``: contiguous slices of one patient, so a random
  validation split holds neighbours of training slices and flatters every candidate).

The choice is the best validation Dice (``best_val_dice`` of the train stage: Dice inside the
FOV on the held-out training cases, at the ground truth's resolution). Test metrics are printed
beside it but are not used to choose. Prints a Markdown table.

    python bench/large_structures.py                                   # synthetic, 20 epochs
    python bench/large_structures.py --data ../shared/datasets/CHAOS_CT3 --side 512
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

import numpy as np
from PIL import Image
from scipy import ndimage

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


def _blob(shape: tuple[int, int], centre: tuple[float, float], radius: float, rng) -> np.ndarray:
    """A smooth, irregular blob: an ellipse whose rim is moved by low-frequency noise."""
    yy, xx = np.mgrid[0 : shape[0], 0 : shape[1]].astype(np.float32)
    angle = rng.uniform(0, np.pi)
    ry, rx = radius * rng.uniform(0.75, 1.0), radius * rng.uniform(0.75, 1.0)
    dy, dx = yy - centre[0], xx - centre[1]
    u = (dy * np.cos(angle) + dx * np.sin(angle)) / ry
    v = (-dy * np.sin(angle) + dx * np.cos(angle)) / rx
    wobble = ndimage.gaussian_filter(rng.standard_normal(shape), 24) * 6.0
    return u**2 + v**2 < 1.0 + wobble


def make_synthetic(root: Path, n_train: int = 48, n_test: int = 16, side: int = 384) -> None:
    """The synthetic large-structure set (see the module text), seeded, in the folders layout."""
    rng = np.random.default_rng(0)
    for split, n in (("training", n_train), ("test", n_test)):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            shape = (side, side)
            body = _blob(shape, (side / 2, side / 2), side * 0.46, rng)
            organ = _blob(shape, (side * rng.uniform(0.4, 0.6), side * 0.33), side * 0.2, rng)
            other = _blob(shape, (side * rng.uniform(0.4, 0.6), side * 0.72), side * 0.12, rng)
            organ &= body
            other &= body & ~organ
            texture = ndimage.gaussian_filter(rng.standard_normal(shape), 2) * 40
            image = np.where(body, 90.0, 10.0) + texture + 45.0 * (organ | other)
            image += rng.standard_normal(shape) * 12
            image = np.clip(image, 0, 255).astype(np.uint8)
            Image.fromarray(image).save(root / split / "images" / f"{i:03d}.png")
            Image.fromarray(organ.astype(np.uint8) * 255).save(
                root / split / "masks" / f"{i:03d}.png"
            )


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> None:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"$ {' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout}\n{proc.stderr}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--data", default="synthetic",
        help="synthetic (made here), or a folders-layout data set with training/ and test/",
    )  # fmt: skip
    parser.add_argument("--side", type=int, default=384, help="the images' side (384)")
    parser.add_argument("--epochs", type=int, default=20)
    parser.add_argument("--only", nargs="*", help="run only these candidates")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clone")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medseg-large-"))
    if args.data == "synthetic":
        data = work / "synthetic"
        make_synthetic(data, side=args.side)
    else:
        data = Path(args.data).resolve()
        if not data.is_dir():
            sys.exit(f"{data}: not found; give a large-structure data set with --data")
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
