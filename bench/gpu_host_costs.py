"""What the host costs a GPU per epoch, before and after: drawing the plan, writing a checkpoint.

On a GPU the train stage's steps run asynchronously, but drawing an epoch's plan and writing its
checkpoint are host work the GPU waits for. This measures both for the GPU recipe
(``.gpu/params.yaml``: 8192 patches of 128 pixels in batches of 64, resnet18 UNet) on DRIVE:

- plan drawing, ms per epoch: ``PatchSampler.plan`` as it was at commit ``BEFORE`` (one Python
  iteration per patch; its source read from git) and as it is now (vectorised numpy), from the
  same generator state; the two plans are checked to be identical, array by array;
- checkpoint, ms the training waits: a synchronous write (temporary file, fsync, rename: what
  every epoch cost before) against the background writer a GPU run uses now (the host copy of
  the state only; the write itself runs in a thread, its time is shown too).

Prints a Markdown table with the median of ``--rounds`` runs. On a shared 2-core machine the
figures are noisy; the ratio is what to read.

    bash bench/gpu_prepare.sh && python bench/gpu_host_costs.py
    python bench/gpu_host_costs.py --data data/processed --params params.yaml --rounds 5
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import subprocess
import sys
import tarfile
import tempfile
import types
from collections.abc import Callable
from pathlib import Path

import numpy as np
from harness import machine, rounds, table

from medseg.config import load_params
from medseg.config.sections import TrainConfig
from medseg.preprocess.processed import open_split
from medseg.training.checkpoint import CheckpointWriter
from medseg.training.data import Augmentation, PatchSampler
from medseg.training.loop import Trainer

REPO = Path(__file__).resolve().parents[1]
BEFORE = "78e742e"  # the last commit with the per-patch plan loop


def old_data_module() -> types.ModuleType:
    """``medseg.training.data`` as it was at ``BEFORE``, loaded from git under another name."""
    source = subprocess.run(
        ["git", "-C", str(REPO), "show", f"{BEFORE}:src/medseg/training/data.py"],
        check=True, capture_output=True, text=True,
    ).stdout  # fmt: skip
    module = types.ModuleType("medseg_data_before")
    sys.modules[module.__name__] = module  # dataclasses look their module up
    exec(compile(source, f"{BEFORE}:src/medseg/training/data.py", "exec"), module.__dict__)
    return module


def median_ms(fn: Callable[[], object], n: int) -> float:
    return rounds(fn, n, warmup=0).median * 1000


def plan_costs(cfg: TrainConfig, data: Path, rounds: int) -> tuple[float, float]:
    store = open_split(data, "train", ram=True)
    aug = Augmentation.from_config(cfg)
    steps = -(-cfg.patches_per_epoch // cfg.batch_size)
    old_cls = old_data_module().PatchSampler
    old = old_cls(store, cfg.patch_size, cfg.foreground_fraction, np.random.default_rng(0), aug)
    new = PatchSampler(
        store, cfg.patch_size, cfg.foreground_fraction, np.random.default_rng(0), aug
    )
    a, b = old.plan(steps, cfg.batch_size), new.plan(steps, cfg.batch_size)
    for field in dataclasses.fields(b):
        if not np.array_equal(getattr(a, field.name), getattr(b, field.name)):
            sys.exit(f"the plans differ in {field.name}: the vectorised draw is not exact")
    print(f"plans of {steps} x {cfg.batch_size} patches: identical, array by array")
    return (
        median_ms(lambda: old.plan(steps, cfg.batch_size), rounds),
        median_ms(lambda: new.plan(steps, cfg.batch_size), rounds),
    )


def checkpoint_costs(cfg: TrainConfig, data: Path, rounds: int) -> tuple[float, float, float]:
    trainer = Trainer.from_config(dataclasses.replace(cfg, device="cpu", cache="ram"), data)
    state = trainer.state()
    with tempfile.TemporaryDirectory() as tmp:
        sync = CheckpointWriter(Path(tmp) / "sync.pt", background=False)
        sync_ms = median_ms(lambda: sync.save(state), rounds)
        size = (Path(tmp) / "sync.pt").stat().st_size
        back = CheckpointWriter(Path(tmp) / "back.pt", background=True)
        blocked, written = [], []
        for _ in range(rounds):
            back.save(state)
            blocked.append(back.blocked_s * 1000)
            back.wait()
            written.append(back.write_s * 1000)
    print(f"checkpoint of the GPU recipe: {size / 2**20:.0f} MiB")
    return sync_ms, statistics.median(blocked), statistics.median(written)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=REPO / ".gpu" / "params.yaml")
    parser.add_argument(
        "--plan", type=Path, default=REPO / "plans.json", help="the plan of its auto params"
    )
    parser.add_argument("--data", type=Path, help="processed data (default: .gpu's, unpacked)")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    cfg = load_params(args.params, TrainConfig, args.plan)
    with tempfile.TemporaryDirectory() as tmp:
        data = args.data
        if data is None:
            with tarfile.open(args.params.parent / "processed.tar.gz") as tar:
                tar.extractall(tmp, filter="data")
            data = Path(tmp) / "processed"
        old_plan, new_plan = plan_costs(cfg, data, args.rounds)
        sync_ms, blocked_ms, write_ms = checkpoint_costs(cfg, data, args.rounds)
    print(
        f"\n{machine()}\nGPU recipe: {cfg.patches_per_epoch} patches of {cfg.patch_size} a "
        f"epoch, batch {cfg.batch_size}; median of {args.rounds}\n"
    )
    rows = [
        ("plan drawing (ms)", f"{old_plan:.1f}", f"{new_plan:.1f}", f"{old_plan / new_plan:.0f}x"),
        ("checkpoint, training waits (ms)", f"{sync_ms:.1f}", f"{blocked_ms:.1f}",
         f"{sync_ms / blocked_ms:.0f}x"),
        ("checkpoint write in the background thread (ms)", "-", f"{write_ms:.1f}", ""),
    ]  # fmt: skip
    print(table(("host cost per epoch", f"before ({BEFORE})", "now", "ratio"), rows))
    print(
        "\nThe background writer's wait here is a copy of CPU tensors; on a GPU it is a "
        "device-to-host copy, and the trainer uses the background writer there only (on a CPU "
        "it writes synchronously)."
    )


if __name__ == "__main__":
    main()
