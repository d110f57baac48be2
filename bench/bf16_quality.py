"""bf16 autocast on CPU against fp32: validation Dice at equal steps, and the time each took.

Converts and preprocesses DRIVE once (the DRIVE recipe's preprocessing: CLAHE green channel,
4 of the 20 training images held out for validation), then trains the same network from the
same seed twice with the public `medseg.training.fit`, once in fp32 and once under bf16
autocast (``train.amp_cpu: true``), with the same patches in the same order and validation after
every ``--val-every`` epochs. Prints a Markdown table with a row per validation: the Dice of
each (whole validation images inside the FOV, pooled, threshold 0.5) and the threshold with the
best validation Dice; then the time per epoch and which CPU features the run had.

    python bench/bf16_quality.py                          # DRIVE from ../shared/datasets/DRIVE
    python bench/bf16_quality.py --epochs 20 --patches 1024

The question it answers: does ``amp_cpu`` change what the network learns? The speed it shows
is this machine's: on a CPU without AVX-512 bf16 or AMX, bf16 is emulated and slow.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import tempfile
import time
from pathlib import Path

import torch
import yaml

from medseg.config import ConvertConfig, DataConfig, PreprocessConfig, TrainConfig, parse
from medseg.convert import convert_dataset
from medseg.preprocess import preprocess_dataset
from medseg.training import Callback, Trainer, fit
from medseg.training.loop import cpu_bf16_native

REPO = Path(__file__).resolve().parents[1]


class Curve(Callback):
    """The validation records and the wall time of each epoch."""

    def __init__(self) -> None:
        self.records: list[dict[str, float]] = []
        self.seconds: list[float] = []
        self.start = 0.0

    def on_epoch_start(self, trainer: Trainer) -> None:
        self.start = time.perf_counter()

    def on_epoch_end(self, trainer: Trainer, record: dict[str, float]) -> None:
        self.seconds.append(time.perf_counter() - self.start)
        self.records.append(dict(record, epoch=trainer.epoch))  # the epoch just finished


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--drive", type=Path, default=REPO.parent / "shared" / "datasets" / "DRIVE")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--epochs", type=int, default=16)
    parser.add_argument("--patches", type=int, default=1024, help="patches per epoch")
    parser.add_argument("--val-every", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3.0e-3)
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    raw = yaml.safe_load(args.params.read_text())
    pre = parse(
        PreprocessConfig, dict(raw["preprocess"], contrast="clahe"), prefix="preprocess.",
        source=str(args.params),
    )  # fmt: skip
    train = parse(TrainConfig, raw["train"], prefix="train.", source=str(args.params))
    train = dataclasses.replace(
        train, epochs=args.epochs, patches_per_epoch=args.patches, lr=args.lr,
        val_every=args.val_every, device="cpu",
    )  # fmt: skip
    capability = torch.backends.cpu.get_cpu_capability()
    print(
        f"DRIVE, {args.epochs} epochs x {args.patches} patches of {train.patch_size}, batch "
        f"{train.batch_size}, lr {args.lr}; CPU capability {capability}, native bf16 (AVX-512 "
        f"bf16 or AMX): {cpu_bf16_native()}; torch threads {torch.get_num_threads()}"
    )
    curves: dict[str, Curve] = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        data = DataConfig(str(args.drive), "drive")
        convert_dataset(data, ConvertConfig(None, None, workers=1), work / "converted")
        preprocess_dataset(pre, work / "converted", work / "processed")
        for name, amp in (("fp32", False), ("bf16", True)):
            curves[name] = Curve()
            fit(
                dataclasses.replace(train, amp_cpu=amp), work / "processed", work / name,
                work / f"{name}-logs", callbacks=[curves[name]],
            )  # fmt: skip
    print()
    print("| epoch | fp32 val Dice | bf16 val Dice | bf16 - fp32 | fp32 best threshold "
          "| bf16 best threshold |")  # fmt: skip
    print("| ---: | ---: | ---: | ---: | ---: | ---: |")
    for a, b in zip(curves["fp32"].records, curves["bf16"].records, strict=True):
        if "val/dice" in a:
            print(
                f"| {a['epoch']} | {a['val/dice']:.4f} | {b['val/dice']:.4f} | "
                f"{b['val/dice'] - a['val/dice']:+.4f} | {a.get('val/threshold', '-')} | "
                f"{b.get('val/threshold', '-')} |"
            )
    print()
    for name, curve in curves.items():
        per_epoch = sorted(curve.seconds)[len(curve.seconds) // 2]
        print(f"{name}: median {per_epoch:.1f} s per epoch (validation included when due)")


if __name__ == "__main__":
    main()
