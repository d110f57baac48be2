"""Same results before and after a change: the default run and a short DRIVE run, bit for bit.

A refactoring must change no result. This clones two commits of this repository, runs on each
(one after the other, on this machine) the default `dvc repro` on the built-in synthetic data
and a short DRIVE run (the recipe's CLAHE, 2 epochs of 256 patches, fixed seed), and compares
their metrics files and per-image tables: every value the base commit wrote must be equal in the
head commit's files; keys and columns the head adds are listed.

    python bench/same_results.py --base 78e742e --drive ../shared/datasets/DRIVE
    python bench/same_results.py --compare OUT_BASE OUT_HEAD   # compare two earlier runs
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd
import yaml
from harness import machine, table

REPO = Path(__file__).resolve().parents[1]
RUNS = ("default", "drive")
# the default run's step time, fixed (the committed plan's probe, 0.1161 s): the plan then buys
# the same steps on any machine, so two commits are compared on the same training run
DEFAULT_RUN = {"train": {"step_seconds": 0.1161}}
SHORT_DRIVE = {
    "preprocess": {"contrast": "clahe"},
    "train": {"epochs": 2, "patches_per_epoch": 256, "val_every": 1},
}


def run_commit(ref: str, drive: Path, out: Path) -> None:
    """Clone ``ref``, run both pipelines there, copy their metrics and tables into ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        clone = Path(tmp) / "clone"
        subprocess.run(["git", "clone", "-q", str(REPO), str(clone)], check=True)
        subprocess.run(["git", "-C", str(clone), "checkout", "-q", ref], check=True)
        env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONPATH=str(clone / "src"))
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        for name in RUNS:
            params = yaml.safe_load((clone / "params.yaml").read_text())
            if name == "drive":
                params["data"].update(root=str(drive.resolve()), layout="drive")
            for section, values in (SHORT_DRIVE if name == "drive" else DEFAULT_RUN).items():
                params[section].update(values)
            (clone / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
            start = time.perf_counter()
            cmd = [sys.executable, "-m", "dvc", "repro", "-q"]
            subprocess.run(cmd, cwd=clone, env=env, check=True)
            print(f"{ref} {name}: {time.perf_counter() - start:.0f} s", flush=True)
            for src, dst in (("evaluate/metrics.json", "eval.json"),
                             ("evaluate/per_image.csv", "per_image.csv"),
                             ("train/metrics.json", "train.json")):  # fmt: skip
                (out / f"{name}_{dst}").write_bytes((clone / "results" / src).read_bytes())


def _flat(tree: dict, prefix: str = "") -> dict:
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out.update(_flat(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def compare(base: Path, head: Path) -> list[tuple]:
    """One row per compared file: values in common, how many differ, what the head adds."""
    rows = []
    for name in RUNS:
        for kind in ("eval.json", "train.json"):
            a = _flat(json.loads((base / f"{name}_{kind}").read_text()))
            b = _flat(json.loads((head / f"{name}_{kind}").read_text()))
            differ = sorted(k for k in set(a) & set(b) if a[k] != b[k])
            gone = sorted(set(a) - set(b))
            rows.append((f"{name} {kind}", len(set(a) & set(b)), len(differ) + len(gone),
                         len(set(b) - set(a)), ", ".join(differ + gone) or "-"))  # fmt: skip
        a = pd.read_csv(base / f"{name}_per_image.csv")
        b = pd.read_csv(head / f"{name}_per_image.csv")
        same = set(a.columns) <= set(b.columns) and a.equals(b[list(a.columns)])
        added = len(set(b.columns) - set(a.columns))
        rows.append((f"{name} per_image.csv", a.size, 0 if same else a.size, added,
                     "-" if same else "values differ"))  # fmt: skip
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--base", default="78e742e", help="the commit before the change")
    parser.add_argument("--head", default="HEAD", help="the commit after it")
    parser.add_argument("--drive", type=Path, default=REPO.parent / "shared/datasets/DRIVE")
    parser.add_argument("--out", type=Path, help="keep the outputs here (default: a temp dir)")
    parser.add_argument("--compare", nargs=2, type=Path, metavar=("BASE_OUT", "HEAD_OUT"))
    args = parser.parse_args()
    if args.compare:
        base, head = args.compare
    else:
        work = args.out or Path(tempfile.mkdtemp(prefix="same-results-"))
        base, head = work / "base", work / "head"
        run_commit(args.base, args.drive, base)
        run_commit(args.head, args.drive, head)
    print(f"\n{machine()}\n")
    print(table(("file", "values in common", "differing", "new keys or columns", "which differ"),
                compare(base, head)))  # fmt: skip


if __name__ == "__main__":
    main()
