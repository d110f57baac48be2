"""The volumes target of issue 27: a NIfTI data set in the nnunet layout (the Medical
Segmentation Decathlon hippocampus, ``../shared/datasets/HIPPO_MSD``) through every stage with
no params but ``data.root``, ``data.layout: nnunet`` and ``train.budget``; the mean per-volume
Dice and HD95 (mm, 3D) per class, and each stage's wall time and peak memory, as a table.

    python bench/volumes.py [--root ../shared/datasets/HIPPO_MSD] [--budget 10] [--keep DIR]

The stages run as the pipeline runs them (``stages/<stage>.py`` with the paths of
``dvc.yaml``), in a temporary folder (or ``--keep``), with the repository's params.yaml and
only those three keys changed.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import pandas as pd
import yaml
from harness import machine, run, table

REPO = Path(__file__).resolve().parents[1]


def stage_commands(work: Path) -> list[tuple[str, list[str]]]:
    """Each stage's command line, with the paths dvc.yaml gives it, under ``work``."""
    py, s = sys.executable, REPO / "stages"
    p, plan = str(work / "params.yaml"), str(work / "plans.json")
    conv, proc = str(work / "data" / "converted"), str(work / "data" / "processed")
    models, results = str(work / "models"), work / "results"
    return [
        ("convert", [py, str(s / "convert.py"), "--params", p, "--out", conv]),
        ("machine", [py, str(s / "machine.py"), "--out", str(work / "machine.json")]),
        (
            "plan",
            [
                py,
                str(s / "plan.py"),
                "--params",
                p,
                "--converted",
                conv,
                "--machine",
                str(work / "machine.json"),
                "--out",
                plan,
            ],
        ),
        (
            "preprocess",
            [
                py,
                str(s / "preprocess.py"),
                "--params",
                p,
                "--plan",
                plan,
                "--converted",
                conv,
                "--out",
                proc,
            ],
        ),
        (
            "train",
            [
                py,
                str(s / "train.py"),
                "--params",
                p,
                "--plan",
                plan,
                "--data",
                proc,
                "--models",
                models,
                "--logs",
                str(results / "train"),
                "--checkpoints",
                str(work / "checkpoints"),
            ],
        ),
        (
            "evaluate",
            [
                py,
                str(s / "evaluate.py"),
                "--params",
                p,
                "--plan",
                plan,
                "--data",
                proc,
                "--model",
                models,
                "--out",
                str(results / "evaluate"),
            ],
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--root", default=str(REPO.parent / "shared" / "datasets" / "HIPPO_MSD"))
    parser.add_argument("--budget", type=float, default=10.0, help="train.budget, minutes")
    parser.add_argument("--keep", help="run in this folder and keep it")
    args = parser.parse_args()
    work = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="medseg-volumes-"))
    work.mkdir(parents=True, exist_ok=True)
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["data"].update(root=str(Path(args.root).resolve()), layout="nnunet")
    params["train"]["budget"] = args.budget
    (work / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    print(machine())
    print(f"data.root {args.root}, data.layout nnunet, train.budget {args.budget:g}; in {work}")
    costs = []
    for name, cmd in stage_commands(work):
        done = run(cmd, cwd=work, env=env)
        costs.append((name, f"{done.seconds:.1f} s", f"{done.peak_rss / 2**30:.2f} GiB"))
        print(f"{name}: {done.seconds:.1f} s", flush=True)
    table_path = work / "results" / "evaluate" / "per_image.csv"
    per = pd.read_csv(table_path, dtype={"case_id": str})
    rows = []
    for name, group in per.groupby("class", sort=False):
        rows.append((
            name, len(group), f"{group['dice'].mean():.4f}", f"{group['dice'].median():.4f}",
            f"{group['hd95'].mean():.2f}", f"{group['hd95'].median():.2f}",
            f"{group['nsd'].mean():.4f}",
        ))  # fmt: skip
    print()
    print("per volume (3D, mm), test set:")
    print(table(["class", "volumes", "Dice mean", "Dice median", "HD95 mean (mm)",
                 "HD95 median (mm)", "NSD mean"], rows))  # fmt: skip
    print()
    print(table(["stage", "wall", "peak RSS"], costs))


if __name__ == "__main__":
    main()
