"""Training throughput on CPU: the train stage's loop against a naive loop, in the same run.

The naive loop is what a first tutorial does (and the seed article did): every sample reads and
decodes its image, vessel mask and FOV mask files from disk (DRIVE: LZW TIFF and GIF), takes the
green channel, normalises it inside the FOV, crops a random patch and flips it; a plain fp32
PyTorch loop with Adam and the same loss. Ours is the train stage's own training step
(`medseg.training`) on the same images, decoded once into a case store: patches cut from the
cases held in RAM or memory-mapped,
augmentation on the batch, channels-last, AdamW with warm-up and schedule, gradient clipping,
optionally bf16 autocast or DataLoader workers. Same model, batch and patch size (from
params.yaml unless overridden). Each loop first runs a few untimed steps (the first convolutions
of a process are slow); then the loops take turns, ``--steps`` timed steps each, for
``--rounds`` rounds, so that a change in the machine's load hits all of them alike.

    python bench/train_throughput.py                      # DRIVE from ../shared/datasets/DRIVE
    python bench/train_throughput.py --rounds 5 --batch-size 8

Prints a Markdown table: the median images/s of each loop and the median of its per-round ratio
to the naive loop. On a shared machine the absolute figures move with the other load; the
ratio is the figure to read.
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import logging
import os
import statistics
import tempfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch
import yaml
from harness import machine, table, turns

from medseg.config.keys import parse
from medseg.config.train import TrainConfig
from medseg.io.case_files import CaseFiles
from medseg.io.images import binarize, read_raster
from medseg.io.layouts import scan_cases
from medseg.io.shards import ShardWriter
from medseg.model import build_model
from medseg.preprocess.dataset import case_arrays
from medseg.preprocess.transforms import normalize_in_fov, select_channel
from medseg.spec import ModelSpec
from medseg.training.data import Batch
from medseg.training.loop import Trainer
from medseg.training.losses import bce_dice_loss
from medseg.training.precision import cpu_bf16_native

REPO = Path(__file__).resolve().parents[1]


def load_case(case: CaseFiles) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read and decode one case from disk: normalised green channel (1, H, W), mask and FOV
    (H, W)."""
    assert case.fov is not None
    fov = binarize(read_raster(case.fov))
    image = normalize_in_fov(select_channel(read_raster(case.image), "green"), fov)
    return image, binarize(read_raster(case.mask)), fov


class NaiveLoop:
    """The naive loop (see the module docstring), run a few steps at a time."""

    def __init__(self, cases: list[CaseFiles], cfg: TrainConfig, seed: int) -> None:
        self.cases, self.cfg = cases, cfg
        self.rng = np.random.default_rng(seed)
        torch.manual_seed(seed)
        self.model = build_model(ModelSpec.from_config(cfg, in_channels=1)).train()
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)

    def step(self) -> None:
        cfg, rng, p = self.cfg, self.rng, self.cfg.patch_size
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        vs: list[torch.Tensor] = []
        for _ in range(cfg.batch_size):
            channels, mask, fov = load_case(self.cases[int(rng.integers(len(self.cases)))])
            image = channels[0]
            top = int(rng.integers(image.shape[0] - p + 1))
            left = int(rng.integers(image.shape[1] - p + 1))
            crop = (slice(top, top + p), slice(left, left + p))
            flip = bool(rng.integers(2))
            for out, a in zip((xs, ys, vs), (image, mask, fov), strict=True):
                a = a[crop][:, ::-1] if flip else a[crop]
                out.append(torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)))
        x, y, v = (torch.stack(t)[:, None] for t in (xs, ys, vs))
        loss = bce_dice_loss(self.model(x), y, v, cfg.bce_weight)
        self.optimizer.zero_grad()
        loss.backward()
        self.optimizer.step()

    def run(self, steps: int) -> None:
        for _ in range(steps):
            self.step()


class OurLoop:
    """The train stage's own step (`medseg.training.loop.Trainer`): patches cut from memory (or
    gathered from the cases on the device), augmented on the batch, channels-last, AdamW,
    schedule, clipping, optional bf16; or patches cut by DataLoader workers, started once per
    block as the stage starts them once per epoch."""

    def __init__(self, data: Path, cfg: TrainConfig, total_steps: int) -> None:
        cfg = dataclasses.replace(
            cfg, epochs=1, patches_per_epoch=total_steps * cfg.batch_size, device="cpu"
        )
        self.cfg = cfg
        self.trainer = Trainer.from_config(cfg, data)
        self.plan = self.trainer.plan_epoch()
        self.trainer.parts.net.train()
        self.next = 0

    def run(self, steps: int) -> None:
        first, self.next = self.next, self.next + steps
        batches: Iterator[Batch] = itertools.islice(self.trainer.batches(self.plan, first), steps)
        for batch in batches:
            self.trainer.train_step(batch)


def write_store(cases: list[CaseFiles], out: Path) -> None:
    """The cases decoded once into a case store, as the preprocess stage writes it (no
    validation split)."""
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, "train")
    for case in cases:
        image, mask, fov = load_case(case)
        h, w = mask.shape
        arrays = case_arrays(image, mask, fov, 2)
        writer.add(case.case_id, arrays, height=h, width=w, full_height=h, full_width=w)
    writer.close()
    ShardWriter(out, "val").close()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--drive", type=Path, default=REPO.parent / "shared" / "datasets" / "DRIVE")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--steps", type=int, default=8, help="timed steps per loop and round")
    parser.add_argument("--rounds", type=int, default=3, help="rounds of all loops in turn")
    parser.add_argument("--warmup", type=int, default=2, help="untimed first steps per loop")
    parser.add_argument("--batch-size", type=int, default=None)
    parser.add_argument("--patch-size", type=int, default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--bf16", action=argparse.BooleanOptionalAction, default=None,
        help="time the bf16 autocast loop too (default: where the CPU has AVX-512 bf16 or AMX; "
        "elsewhere bf16 is emulated, about 13x slower than fp32 on an AVX2 CPU)",
    )  # fmt: skip
    args = parser.parse_args()
    bf16 = cpu_bf16_native() if args.bf16 is None else args.bf16
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    raw = yaml.safe_load(args.params.read_text())["train"]
    if args.batch_size:
        raw["batch_size"] = args.batch_size
    if args.patch_size:
        raw["patch_size"] = args.patch_size
    cfg = parse(TrainConfig, raw, prefix="train.", source=str(args.params))
    cases = [c for c in scan_cases(args.drive, "drive").cases if c.split == "train"]
    print(
        f"{len(cases)} DRIVE training images; {cfg.arch}-{cfg.encoder} decoder "
        f"{cfg.decoder_channels}; batch {cfg.batch_size} x {cfg.patch_size}^2; "
        f"{args.rounds} rounds of {args.steps} timed steps per loop; "
        f"torch threads {torch.get_num_threads()}\n{machine()}"
    )
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        write_store(cases, data)
        total = args.warmup + args.rounds * args.steps
        fp32 = dataclasses.replace(cfg, amp_cpu=False)
        loops: dict[str, NaiveLoop | OurLoop] = {
            "naive: files read per sample, fp32": NaiveLoop(cases, cfg, args.seed),
            "ours: in RAM (train.cache ram), fp32": OurLoop(
                data, dataclasses.replace(fp32, cache="ram"), total
            ),
            "ours: memory-mapped (train.cache none), fp32": OurLoop(
                data, dataclasses.replace(fp32, cache="none"), total
            ),
            "ours: on the device (train.cache device), fp32": OurLoop(
                data, dataclasses.replace(fp32, cache="device"), total
            ),
            "ours: in RAM, fp32, 2 DataLoader workers cut patches": OurLoop(
                data, dataclasses.replace(fp32, cache="ram", workers=2), total
            ),
        }
        if bf16:
            loops["ours: in RAM, bf16 autocast (train.amp_cpu)"] = OurLoop(
                data, dataclasses.replace(cfg, cache="ram", amp_cpu=True), total
            )
        for loop in loops.values():  # the first steps of a process are slow: not timed
            loop.run(args.warmup)
        timings = turns(
            {name: lambda loop=loop: loop.run(args.steps) for name, loop in loops.items()},
            args.rounds, warmup=0,
        )  # fmt: skip
    images = args.steps * cfg.batch_size
    naive = timings[next(iter(loops))].wall
    rows = []
    for name, timing in timings.items():
        ratio = statistics.median(n / t for t, n in zip(timing.wall, naive, strict=True))
        rows.append((name, f"{images / timing.median:.2f}", f"{ratio:.2f}"))
    print()
    print(
        table(("loop", "images/s, median of rounds", "x naive, median of per-round ratios"), rows)
    )


if __name__ == "__main__":
    main()
