"""Training throughput on CPU: the train stage's loop against a naive loop, in the same run.

The naive loop is what a first tutorial does (and the seed article did): every sample reads and
decodes its image, vessel mask and FOV mask files from disk (DRIVE: LZW TIFF and GIF), takes the
green channel, normalises it inside the FOV, crops a random patch and flips it; a plain fp32
PyTorch loop with Adam and the same loss. Ours is the train stage's own `fit` on the same images,
decoded once into memory: patches cut from arrays, augmentation on the batch, channels-last,
AdamW with warm-up and schedule, gradient clipping, optionally bf16 autocast. Same model, batch
and patch size (from params.yaml unless overridden). Each loop runs a few warm-up steps that are
not timed (the first convolutions of a process are slow), then ``--steps`` timed steps.

    python bench/train_throughput.py                      # DRIVE from ../shared/datasets/DRIVE
    python bench/train_throughput.py --steps 20 --batch-size 8

Prints a Markdown table. On a shared machine the absolute figures move with the other load;
the ratio of loops measured back to back in one run is the figure to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml

from medseg.config import TrainConfig, parse
from medseg.io.images import binarize, read_raster
from medseg.io.layouts import CaseFiles, find_cases
from medseg.losses import bce_dice_loss
from medseg.model import ModelSpec, build_model
from medseg.preprocess import SplitArrays, normalize_in_fov, pad_to, padded_size, select_channel
from medseg.training import fit

REPO = Path(__file__).resolve().parents[1]


def load_case(case: CaseFiles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and decode one case from disk: normalised green channel, mask, FOV (H, W) each."""
    assert case.fov is not None
    fov = binarize(read_raster(case.fov))
    image = normalize_in_fov(select_channel(read_raster(case.image), "green"), fov)
    return image, binarize(read_raster(case.mask)), fov


def naive_loop(
    cases: list[CaseFiles], cfg: TrainConfig, warmup: int, steps: int, seed: int
) -> float:
    """Images per second of the naive loop (see the module docstring)."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    model = build_model(ModelSpec.from_config(cfg, in_channels=1)).train()
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    p = cfg.patch_size
    start = 0.0
    for step in range(warmup + steps):
        if step == warmup:
            start = time.perf_counter()
        xs, ys, vs = [], [], []
        for _ in range(cfg.batch_size):
            image, mask, fov = load_case(cases[int(rng.integers(len(cases)))])
            top = int(rng.integers(image.shape[0] - p + 1))
            left = int(rng.integers(image.shape[1] - p + 1))
            crop = (slice(top, top + p), slice(left, left + p))
            flip = bool(rng.integers(2))
            for out, a in zip((xs, ys, vs), (image, mask, fov), strict=True):
                a = a[crop][:, ::-1] if flip else a[crop]
                out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
        x, y, v = (torch.stack(t)[:, None] for t in (xs, ys, vs))
        loss = bce_dice_loss(model(x), y, v, cfg.bce_weight)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return steps * cfg.batch_size / (time.perf_counter() - start)


def write_arrays(cases: list[CaseFiles], out: Path) -> None:
    """The cases decoded once, as the preprocess stage writes them (no validation split)."""
    loaded = [load_case(c) for c in cases]
    height, width = padded_size(
        max(a[0].shape[0] for a in loaded), max(a[0].shape[1] for a in loaded), 32
    )
    images = np.stack([pad_to(a[0], height, width) for a in loaded])[:, None]
    masks = np.stack([pad_to(a[1], height, width) for a in loaded]).astype(np.uint8)
    fovs = np.stack([pad_to(a[2], height, width) for a in loaded]).astype(np.uint8)
    shapes = np.array([a[0].shape for a in loaded], dtype=np.int64)
    ids = np.array([c.case_id for c in cases])
    train = SplitArrays(images.astype(np.float32), masks, fovs, shapes, ids)
    val = SplitArrays(images[:0], masks[:0], fovs[:0], shapes[:0], ids[:0])
    out.mkdir(parents=True, exist_ok=True)
    for name, split in (("train", train), ("val", val)):
        np.savez(out / f"{name}.npz", **split.__dict__)


def our_loop(data: Path, cfg: TrainConfig, warmup: int, steps: int, work: Path) -> float:
    """Images per second of the train stage's `fit`: its second epoch (the first warms up).

    The warm-up epoch has as many steps as the timed one; ``warmup`` only sets a lower bound.
    """
    steps = max(steps, warmup)
    cfg = dataclasses.replace(cfg, epochs=2, patches_per_epoch=steps * cfg.batch_size, device="cpu")
    summary = fit(cfg, data, work / "models", work / "logs")
    return float(summary["images_per_s"])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--drive", type=Path, default=REPO.parent / "shared" / "datasets" / "DRIVE")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per loop")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps of the naive loop")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    raw = yaml.safe_load(args.params.read_text())["train"]
    if args.batch_size:
        raw["batch_size"] = args.batch_size
    if args.patch_size:
        raw["patch_size"] = args.patch_size
    cfg = parse(TrainConfig, raw, prefix="train.", source=str(args.params))
    cases = [c for c in find_cases(args.drive, "drive") if c.split == "train"]
    print(
        f"{len(cases)} DRIVE training images; {cfg.arch}-{cfg.encoder} decoder "
        f"{cfg.decoder_channels}; batch {cfg.batch_size} x {cfg.patch_size}^2; "
        f"{args.steps} timed steps per loop; torch threads {torch.get_num_threads()}"
    )
    rows: list[tuple[str, float]] = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        write_arrays(cases, work / "data")
        rows.append(
            (
                "naive: files read per sample, fp32",
                naive_loop(cases, cfg, args.warmup, args.steps, args.seed),
            )
        )
        fp32 = dataclasses.replace(cfg, amp_cpu=False, workers=0)
        rows.append(
            (
                "ours: in memory, fp32",
                our_loop(work / "data", fp32, args.warmup, args.steps, work / "a"),
            )
        )
        workers = dataclasses.replace(fp32, workers=2)
        rows.append(
            (
                "ours: in memory, fp32, 2 DataLoader workers cut patches",
                our_loop(work / "data", workers, args.warmup, args.steps, work / "w"),
            )
        )
        bf16 = dataclasses.replace(cfg, amp_cpu=True, workers=0)
        rows.append(
            (
                "ours: in memory, bf16 autocast (train.amp_cpu)",
                our_loop(work / "data", bf16, args.warmup, args.steps, work / "b"),
            )
        )
    naive = rows[0][1]
    print()
    print("| loop | images/s | x naive |")
    print("| --- | ---: | ---: |")
    for name, value in rows:
        print(f"| {name} | {value:.2f} | {value / naive:.2f} |")
    if not all(math.isfinite(v) for _, v in rows):
        raise SystemExit("a loop did not finish")


if __name__ == "__main__":
    main()
