"""The plan against the hand recipes: default params (every planned key ``auto``, a training
budget) and the best hand recipe, side by side, on the real data sets in ``../shared/datasets``
and two synthetic variants. Prints one table. Not a timed test: each run trains for about the
budget (10 minutes by default) on the whole machine, so run it alone.

Each run is what a user gets: a clone of this repository's HEAD in a temporary folder, its
``params.yaml`` with ``data.root`` and ``data.layout`` (and, for a hand recipe, the recipe's
keys), then the real ``dvc repro``; the test metrics come from ``results/evaluate/metrics.json``
(scored once, inside the FOV, pooled), the plan from ``plans.json``. The auto runs give only
``data.root``, ``data.layout`` (and ``data.classes`` for the label map) and ``train.budget``.

Data sets (``--sets``, comma-separated; default all that are present):

- ``drive``: DRIVE; hand: the README's DRIVE recipe (the planned keys it leaves out at their
  values before the plan: green, 96 x 16, foreground 0.5, BCE + Dice, window 1024).
- ``chaos``: CHAOS_CT3, liver on 512 x 512 DICOM CT; hand: docs/layouts.md's large-structure
  recipe (max_side 256, patch 128, 288 patches an epoch, gray, whole_image, no contrast).
- ``isbi``: ISBI2012_EM, grey EM, cell interiors 80% of the pixels; hand: the defaults before
  the plan with gray, whole_image (the microscopy row of docs/layouts.md with grey data).
- ``lesion``: synthetic RGB lesions that differ from the skin in hue (written here, seeded);
  hand: docs/layouts.md's dermoscopy row (rgb, whole_image, the large-structure recipe at half
  resolution).
- ``labels``: the built-in synthetic set as a label map (1 vessel, 2 optic disc); hand: the
  defaults before the plan.

    python bench/auto.py [--sets drive,chaos] [--budget 10] [--datasets ../shared/datasets]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import yaml
from harness import machine, run, table

REPO = Path(__file__).resolve().parents[1]

# The planned keys at the values they had before the plan: what a hand recipe leaves unsaid.
BEFORE_PLAN: dict[str, dict[str, Any]] = {
    "convert": {"fov_fallback": "threshold"},
    "preprocess": {"channel": "green", "contrast": "none", "max_side": None},
    "train": {
        "epochs": 20, "patches_per_epoch": 512, "batch_size": 16, "patch_size": 96,
        "foreground_fraction": 0.5, "loss": "bce_dice", "postprocess": [],
    },
    "evaluate": {"window": 1024, "threshold": 0.5, "tta": False},
}  # fmt: skip
LARGE = {
    "preprocess": {"contrast": "none"},
    "train": {"patch_size": 128, "patches_per_epoch": 288},
    "convert": {"fov_fallback": "whole_image"},
}


@dataclass(frozen=True)
class DataSet:
    """One benchmark data set: where it is, its layout, and its hand recipe."""

    root: str  # under --datasets, or "synthetic:<kind>" (written by this script)
    layout: str
    hand: list[dict[str, dict[str, Any]]]  # params sections, applied in order
    data: dict[str, Any] = field(default_factory=dict)  # extra data.* keys for both runs
    synthesize: dict[str, Any] = field(default_factory=dict)


SETS = {
    "drive": DataSet("DRIVE", "drive", [{
        "preprocess": {"contrast": "clahe"},
        "train": {"epochs": 40, "patches_per_epoch": 1024, "lr": 3.0e-3, "val_every": 5},
        "evaluate": {"tta": True, "threshold": 0.5},
    }]),  # the README's DRIVE line
    "chaos": DataSet("CHAOS_CT3", "folders", [
        LARGE, {"preprocess": {"channel": "gray", "max_side": 256}},
    ]),
    "isbi": DataSet("ISBI2012_EM", "folders", [
        {"preprocess": {"channel": "gray"}, "convert": {"fov_fallback": "whole_image"}},
    ]),
    "lesion": DataSet("synthetic:lesion", "folders", [
        LARGE, {"preprocess": {"channel": "rgb", "max_side": 192}},
    ]),
    "labels": DataSet(
        "synthetic:labels", "drive", [{}],
        data={"classes": {"vessel": 1, "disc": 2}},
        synthesize={"labels": "vessels_disc"},
    ),
}  # fmt: skip


def write_lesions(out: Path, n_train: int = 40, n_test: int = 12, side: int = 384) -> None:
    """RGB "skin" with one lesion a case that differs from it mostly in hue, in the folders
    layout: a textured, vignetted background, an irregular blob (15-35% of the side across)."""
    from PIL import Image

    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:side, 0:side] / side
    for split, n in (("training", n_train), ("test", n_test)):
        (out / split / "images").mkdir(parents=True, exist_ok=True)
        (out / split / "masks").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            cy, cx = rng.uniform(0.3, 0.7, 2)
            r = rng.uniform(0.08, 0.18)
            angle = np.arctan2(yy - cy, xx - cx)
            wobble = 1 + sum(
                rng.uniform(0, 0.15) * np.cos(k * angle + rng.uniform(0, 6.3)) for k in (2, 3, 5)
            )
            mask = np.hypot(yy - cy, xx - cx) < r * wobble
            skin = np.array([0.80, 0.62, 0.52]) * rng.uniform(0.85, 1.1)
            lesion = skin * np.array([0.80, 0.78, 1.05])  # a hue shift, little brightness
            texture = rng.normal(0, 0.04, (side // 8, side // 8, 3))
            texture = np.kron(texture, np.ones((8, 8, 1)))
            vignette = 1 - 0.25 * np.hypot(yy - 0.5, xx - 0.5)[..., None]
            image = np.where(mask[..., None], lesion, skin) * vignette + texture
            image += rng.normal(0, 0.02, image.shape)
            rgb = (np.clip(image, 0, 1) * 255).astype(np.uint8)
            name = f"{split[:2]}{i:03d}.png"
            Image.fromarray(rgb).save(out / split / "images" / name)
            Image.fromarray((mask * 255).astype(np.uint8)).save(out / split / "masks" / name)


def merge(params: dict[str, Any], *overrides: dict[str, dict[str, Any]]) -> dict[str, Any]:
    for sections in overrides:
        for section, values in sections.items():
            params[section].update(values)
    return params


def run_one(name: str, recipe: str, ds: DataSet, root: Path, work: Path, budget: float) -> dict:
    """Clone HEAD, write the params, ``dvc repro``; the metrics, the plan, the train time."""
    clone = work / f"{name}-{recipe}"
    subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
    params = yaml.safe_load((clone / "params.yaml").read_text())
    data = {"root": str(root), "layout": ds.layout, **ds.data}
    sections: list[dict[str, dict[str, Any]]] = [{"data": data, "synthesize": ds.synthesize}]
    sections += [{"train": {"budget": budget}}]
    if recipe == "hand":
        sections += [BEFORE_PLAN, *ds.hand]
    if ds.data.get("classes"):
        sections += [{"train": {"classes": len(ds.data["classes"]) + 1}}]
    merge(params, *sections)
    (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(clone / "src"))
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    print(f"\n$ ({name}, {recipe}) dvc repro", flush=True)
    done = run([sys.executable, "-m", "dvc", "repro"], cwd=clone, env=env, echo=True, check=False)
    if done.returncode != 0:
        sys.exit(f"{name} {recipe}: dvc repro failed (exit code {done.returncode})")
    lines = [(t, line.strip()) for t, line in done.lines]
    starts = [(t, line.split("'")[1]) for t, line in lines if line.startswith("Running stage '")]
    ends = [t for t, _ in starts[1:]] + [lines[-1][0]]
    times = {stage: end - t for (t, stage), end in zip(starts, ends, strict=True)}
    metrics = json.loads((clone / "results" / "evaluate" / "metrics.json").read_text())["test"]
    plan = json.loads((clone / "plans.json").read_text())
    return {"metrics": metrics, "plan": plan, "times": times}


def score(metrics: dict) -> tuple[float, float | None]:
    """Test Dice inside the FOV (pooled; the mean over classes for a label map) and AUC."""
    if "classes" in metrics:
        dices = [c["fov"]["dice"] for c in metrics["classes"].values()]
        return float(np.mean(dices)), None
    return metrics["fov"]["dice"], metrics["fov"].get("auc_roc")


def summary(plan: dict) -> str:
    v = {k: s["value"] for k, s in plan["settings"].items()}
    kind = plan["structure"]["kind"]
    side = v["preprocess.max_side"] or "full"
    return (
        f"{kind}; {v['preprocess.channel']}, {v['preprocess.contrast']}, side {side}, "
        f"patch {v['train.patch_size']} x {v['train.batch_size']}, "
        f"{v['train.epochs']} x {v['train.patches_per_epoch']} patches"
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "--sets", default=",".join(SETS), help="comma-separated: " + ", ".join(SETS)
    )
    parser.add_argument("--budget", type=float, default=10.0, help="train.budget, minutes")
    parser.add_argument("--datasets", type=Path, default=REPO.parent / "shared" / "datasets")
    parser.add_argument("--recipes", default="auto,hand", help="auto, hand or both")
    parser.add_argument("--keep", action="store_true", help="keep the temporary clones")
    args = parser.parse_args()
    print(machine())
    work = Path(tempfile.mkdtemp(prefix="medseg-auto-"))
    rows = []
    for name in args.sets.split(","):
        ds = SETS[name]
        if ds.root == "synthetic:lesion":
            root = work / "data-lesion"
            write_lesions(root)
        elif ds.root == "synthetic:labels":
            root = Path("data/raw/synthetic")  # the clone's own synthesize stage
        else:
            root = (args.datasets / ds.root).resolve()
            if not root.is_dir():
                print(f"{name}: {root} absent, skipped")
                continue
        found = {}
        for recipe in args.recipes.split(","):
            found[recipe] = run_one(name, recipe, ds, root, work, args.budget)
            result = found[recipe]
            dice, auc = score(result["metrics"])
            rows.append([
                name, recipe, f"{dice:.4f}", "-" if auc is None else f"{auc:.4f}",
                f"{result['times'].get('train', float('nan')) / 60:.1f}",
                summary(result["plan"]) if recipe == "auto" else "hand recipe",
            ])  # fmt: skip
            print(table(["set", "recipe", "test Dice", "AUC", "train min", "plan"], rows))
        if {"auto", "hand"} <= set(found):
            gap = score(found["auto"]["metrics"])[0] - score(found["hand"]["metrics"])[0]
            rows.append([name, "auto - hand", f"{gap:+.4f}", "", "", "target >= -0.005"])
    print()
    print(machine())
    print(f"train.budget {args.budget:g} min for auto; hand recipes train their own epochs")
    print(table(["set", "recipe", "test Dice", "AUC", "train min", "plan"], rows))
    if not args.keep:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    else:
        print(f"clones kept in {work}")


if __name__ == "__main__":
    main()
