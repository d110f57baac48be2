"""The leak of a per-file split, measured: test Dice with a per-file split against a per-patient
split, on the same 2D slice set, side by side.

Builds a 2D slice set with patient ids from the Medical Segmentation Decathlon hippocampus MRI
(``HIPPO_MSD``, NIfTI read with nibabel): the axial slices with foreground of ``--subjects``
training subjects, each a 16-bit PNG image and an 8-bit PNG label map (1 anterior, 2 posterior)
named ``<patient>_<slice>.png`` in a ``folders`` layout (the test split drawn by
``data.test_fraction``). Then runs the real pipeline (`dvc repro` on a temporary copy of this
repository) twice with the same params and training budget:

- per file: ``data.group: file``, every slice its own group (the split of earlier versions:
  slices of one patient on both sides of the test and the validation split);
- per patient: ``data.group: '^(.+)_\\d+\\.png$'``, every patient's slices on one side.

The second run trains for the same number of steps as the first: the first measures the step
cost (the plan's probe), the second is given it (``train.step_seconds``).

    python bench/leak.py --hippo ../shared/datasets/HIPPO_MSD --subjects 60 --budget 2
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

import nibabel as nib
import numpy as np
import yaml
from harness import machine, table
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PER_PATIENT = r"^(.+)_\d+\.png$"
CLASSES = {"anterior": 1, "posterior": 2}


def write_slices(hippo: Path, out: Path, subjects: int, seed: int) -> tuple[int, int]:
    """The axial slices with foreground of ``subjects`` training volumes (a seeded choice) as
    ``out/images/<patient>_<slice>.png`` (uint16, the volume scaled to its maximum) and
    ``out/masks/<patient>_<slice>.png`` (uint8 labels). Returns (patients, slices)."""
    volumes = sorted((hippo / "imagesTr").glob("*.nii.gz"))
    chosen = sorted(np.random.default_rng(seed).choice(len(volumes), subjects, replace=False))
    (out / "images").mkdir(parents=True)
    (out / "masks").mkdir()
    n = 0
    for i in chosen:
        path = volumes[i]
        patient = path.name.removesuffix(".nii.gz").replace("hippocampus_", "p")
        image = np.asarray(nib.load(path).dataobj, dtype=np.float64)
        labels = np.asarray(nib.load(hippo / "labelsTr" / path.name).dataobj).astype(np.uint8)
        scaled = np.round(np.clip(image, 0, None) / max(image.max(), 1e-6) * 65535)
        scaled = scaled.astype(np.uint16)
        for z in range(image.shape[2]):  # RAS: the third axis is inferior -> superior (axial)
            if not labels[:, :, z].any():
                continue
            name = f"{patient}_{z:03d}.png"
            Image.fromarray(scaled[:, :, z]).save(out / "images" / name)
            Image.fromarray(labels[:, :, z]).save(out / "masks" / name)
            n += 1
    return len(chosen), n


def run_pipeline(
    slices: Path, work: Path, group: str, budget: float, step_seconds: float | None
) -> dict:
    """`dvc repro evaluate` on a fresh copy of this repository; the test metrics, the plan's
    step cost and the split's sizes."""
    work.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, work / name)
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, work / name, ignore=shutil.ignore_patterns("__pycache__"))
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(
        root=str(slices), layout="folders", classes=CLASSES, group=group, test_fraction=0.2
    )
    params["convert"].update(fov_fallback="whole_image")  # MRI: no dark surround to cut
    params["train"].update(budget=budget, step_seconds=step_seconds, classes=len(CLASSES) + 1)
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = dict(os.environ, HF_HUB_OFFLINE="1", MEDSEG_ID_KEY="6c65616b" * 8)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env.update(GIT_AUTHOR_NAME="b", GIT_AUTHOR_EMAIL="b@b", GIT_COMMITTER_NAME="b",
               GIT_COMMITTER_EMAIL="b@b")  # fmt: skip
    dvc = [sys.executable, "-m", "dvc"]
    for cmd in (["git", "init", "-q"], [*dvc, "init", "-q"], ["git", "add", "-A"],
                ["git", "commit", "-qm", "b"]):  # fmt: skip
        subprocess.run(cmd, cwd=work, env=env, check=True, capture_output=True)
    start = time.perf_counter()
    proc = subprocess.run([*dvc, "repro", "evaluate"], cwd=work, env=env, capture_output=True,
                          text=True)  # fmt: skip
    if proc.returncode:
        raise SystemExit(f"dvc repro failed ({group}):\n{proc.stdout[-3000:]}\n{proc.stderr}")
    seconds = time.perf_counter() - start
    metrics = json.loads((work / "results" / "evaluate" / "metrics.json").read_text())
    plan = json.loads((work / "plans.json").read_text())
    split = (work / "data" / "processed" / "split.csv").read_text().splitlines()[1:]
    report = json.loads((work / "data" / "converted" / "report.json").read_text())
    return {
        "metrics": metrics,
        "step_seconds": plan["budget"]["step_seconds"],
        "steps": plan["budget"]["steps"],
        "split": {
            s: sum(line.endswith(f",{s}") for line in split) for s in ("train", "val", "test")
        },
        "groups": report["groups"],
        "seconds": seconds,
    }


def _dice(metrics: dict, name: str) -> float:
    return metrics["test"]["classes"][name]["fov"]["dice"]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--hippo", type=Path, default=REPO.parent / "shared/datasets/HIPPO_MSD")
    parser.add_argument("--subjects", type=int, default=60)
    parser.add_argument("--budget", type=float, default=2.0, help="train.budget, minutes")
    parser.add_argument("--seed", type=int, default=0, help="the choice of subjects")
    parser.add_argument("--keep", type=Path, help="keep the projects here")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="medseg-leak-") as tmp:
        work = args.keep or Path(tmp)
        slices = work / "slices"
        patients, n = write_slices(args.hippo, slices, args.subjects, args.seed)
        print(f"{patients} patients, {n} slices with foreground", flush=True)
        runs = {"per file": run_pipeline(slices, work / "file", "file", args.budget, None)}
        step = runs["per file"]["step_seconds"]
        runs["per patient"] = run_pipeline(slices, work / "patient", PER_PATIENT, args.budget, step)
    rows = []
    for name, r in runs.items():
        m = r["metrics"]
        rows.append((
            name, f"{r['split']['train']} / {r['split']['val']} / {r['split']['test']}",
            f"{r['groups']['train']} / {r['groups']['test']}",
            r["steps"], f"{_dice(m, 'anterior'):.4f}", f"{_dice(m, 'posterior'):.4f}",
            f"{m['test']['fov']['dice']:.4f}", f"{m['test']['fov_per_image_mean']['dice']:.4f}",
            f"{r['seconds']:.0f} s",
        ))  # fmt: skip
    print(f"\n{machine()}\n")
    print(
        f"HIPPO_MSD, {patients} training subjects, {n} axial slices with foreground; "
        f"train.budget {args.budget} min at {step} s a step (the first run's probe)\n"
    )
    headers = ("split", "slices train / val / test", "groups train / test", "steps",
               "test Dice anterior", "test Dice posterior", "test Dice, class mean",
               "per-slice mean", "time")  # fmt: skip
    print(table(headers, rows))


if __name__ == "__main__":
    main()
