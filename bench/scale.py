"""Memory and time of preprocess, train and evaluate as the data set grows (run by hand).

Generates data sets of ``--cases`` (default 500 and 5,000) grey cases whose sides are drawn
log-uniformly from 256 to 2048 pixels, with the extremes pinned in every split (the first test
case and the first training case are 2048x2048, the second of each 256x2048), so that the
largest case met is the same at every size and the figures measure the number of cases; blob-shaped
masks, written as the convert stage writes its output (PNG + manifest.csv). Each stage then runs
in a fresh process, through its own stage script, and reports its peak resident memory
(`harness.run`) and the wall time of the stage's ``main`` (imports excluded):

- preprocess: every case;
- train: a fixed number of steps (``--steps`` batches of 16 patches of 96 pixels), with
  ``train.cache: auto`` (at these sizes: memory-mapped shards) and a small validation split
  (``--val`` cases), so the figure is the data layer's, not the step count's;
- evaluate: the test split (``--test-share`` of the cases), whole-image sliding-window inference
  with an untrained model (speed and memory do not depend on the weights).

Prints one table: peak RSS per stage and size, the ratio of the largest to the smallest size,
and time per case. Disk: about 6 bytes per pixel for the case store (5,000 cases: ~30 GB), in
``--work`` (default: a temporary folder, removed at the end).

    python bench/scale.py                   # 500 and 5,000 cases
    python bench/scale.py --cases 200 1000  # quicker
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd
import yaml
from harness import machine, run, table

REPO = Path(__file__).resolve().parents[1]

RUN_STAGE = """
import importlib.util, sys, time
spec = importlib.util.spec_from_file_location("stage", sys.argv[1])
stage = importlib.util.module_from_spec(spec)
spec.loader.exec_module(stage)
start = time.perf_counter()
stage.main(sys.argv[2:])
print("SECONDS", time.perf_counter() - start)
"""


def generate(out: Path, n: int, test_share: float, seed: int) -> tuple[int, int]:
    """Write ``n`` cases in the convert stage's layout; return (test cases, total pixels)."""
    from medseg.io.images import write_png

    rng = np.random.default_rng(seed)
    for sub in ("images", "masks", "fov"):
        (out / sub).mkdir(parents=True, exist_ok=True)
    rows, pixels, n_test = [], 0, max(1, round(test_share * n))
    pinned = {0: (2048, 2048), 1: (256, 2048), n_test: (2048, 2048), n_test + 1: (256, 2048)}
    for i in range(n):
        h, w = (round(256 * 8 ** rng.random()) for _ in range(2))  # drawn always: same stream
        h, w = pinned.get(i, (h, w))
        yy, xx = np.ogrid[:h, :w]
        image = (40 + 120 * (yy / h) + 60 * (xx / w)).astype(np.float32)
        mask = np.zeros((h, w), bool)
        for _ in range(3):
            cy, cx = rng.integers(h), rng.integers(w)
            r = rng.uniform(0.03, 0.15) * min(h, w)
            mask |= (yy - cy) ** 2 + (xx - cx) ** 2 < r * r
        image[mask] -= 30
        image += rng.normal(0, 4, (h, w)).astype(np.float32)
        cid = f"c{i:05d}"
        write_png(out / "images" / f"{cid}.png", np.clip(image, 0, 255).astype(np.uint8))
        write_png(out / "masks" / f"{cid}.png", mask)
        write_png(out / "fov" / f"{cid}.png", np.ones((h, w), bool))
        split = "test" if i < n_test else "train"
        rows.append({"case_id": cid, "split": split, "image": f"images/{cid}.png",
                     "mask": f"masks/{cid}.png", "fov": f"fov/{cid}.png", "source": cid,
                     "mask2": "", "height": h, "width": w})  # fmt: skip
        pixels += h * w
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    return n_test, pixels


def params(n: int, val: int, steps: int) -> dict:
    p = yaml.safe_load((REPO / "params.yaml").read_text())
    p["preprocess"]["val_fraction"] = min(0.5, val / (n * 0.9))
    p["train"].update(
        epochs=1, patches_per_epoch=16 * steps, batch_size=16, patch_size=96, val_every=1,
        decoder_channels=[32, 16, 16, 8, 8], cache="auto", device="cpu",
    )  # fmt: skip
    p["evaluate"].update(window=512, device="cpu")
    return p


def stage(name: str, *args: str | Path) -> tuple[float, float]:
    """Run ``stages/<name>.py`` in a fresh process; return (seconds, peak RSS in GiB)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    done = run([sys.executable, "-c", RUN_STAGE, REPO / "stages" / f"{name}.py", *args], env=env)
    seconds = next(line for _, line in done.lines if line.startswith("SECONDS")).split()[1]
    return float(seconds), done.peak_rss / 2**30


def run_size(work: Path, n: int, args: argparse.Namespace) -> dict:
    root = work / f"n{n}"
    t0 = time.perf_counter()
    n_test, pixels = generate(root / "converted", n, args.test_share, args.seed)
    print(f"[{n} cases] generated in {time.perf_counter() - t0:.0f} s, {pixels / 1e9:.2f} Gpx",
          flush=True)  # fmt: skip
    p = root / "params.yaml"
    p.write_text(yaml.safe_dump(params(n, args.val, args.steps), sort_keys=False))
    proc, models = root / "processed", root / "models"
    pre = stage("preprocess", "--params", p, "--converted", root / "converted", "--out", proc)
    shutil.rmtree(root / "converted")  # the store holds it all now
    store_gb = sum(f.stat().st_size for f in proc.glob("*.bin")) / 1e9
    print(f"[{n} cases] preprocess {pre[0]:.0f} s, {pre[1]:.2f} GiB; store {store_gb:.1f} GB",
          flush=True)  # fmt: skip
    train = stage("train", "--params", p, "--data", proc, "--models", models,
                  "--logs", root / "logs", "--checkpoints", root / "ckpt")  # fmt: skip
    print(f"[{n} cases] train {train[0]:.0f} s, {train[1]:.2f} GiB", flush=True)
    ev = stage("evaluate", "--params", p, "--data", proc, "--model", models,
               "--out", root / "results")  # fmt: skip
    print(f"[{n} cases] evaluate {ev[0]:.0f} s, {ev[1]:.2f} GiB", flush=True)
    shutil.rmtree(root)
    return {"cases": n, "test": n_test, "gpx": pixels / 1e9, "store_gb": store_gb,
            "pre": pre, "train": train, "eval": ev}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, nargs="+", default=[500, 5000])
    parser.add_argument("--steps", type=int, default=32, help="training steps (batches of 16)")
    parser.add_argument("--val", type=int, default=8, help="validation cases")
    parser.add_argument("--test-share", type=float, default=0.05)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", type=Path, default=None)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="medseg-scale-", dir=args.work))
    try:
        results = [run_size(work, n, args) for n in args.cases]
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"\npython bench/scale.py {' '.join(sys.argv[1:])}\n{machine()}\n")
    headers = ("cases", "pixels (G)", "store (GB)", "preprocess RSS (GiB)", "train RSS",
               "evaluate RSS", "preprocess s/case", "train s (fixed steps)",
               "evaluate s/test case")  # fmt: skip
    rows: list[tuple[object, ...]] = [
        (r["cases"], f"{r['gpx']:.2f}", f"{r['store_gb']:.1f}", f"{r['pre'][1]:.2f}",
         f"{r['train'][1]:.2f}", f"{r['eval'][1]:.2f}", f"{r['pre'][0] / r['cases']:.3f}",
         f"{r['train'][0]:.1f}", f"{r['eval'][0] / r['test']:.3f}")
        for r in results
    ]  # fmt: skip
    if len(results) > 1:
        a, b = results[0], results[-1]
        ratios = [f"{b[k][1] / a[k][1]:.2f}" for k in ("pre", "train", "eval")]
        rows.append((f"RSS ratio {b['cases']} / {a['cases']}", "", "", *ratios, "", "", ""))
    print(table(headers, rows))


if __name__ == "__main__":
    main()
