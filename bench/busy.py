"""Training beside a busy process: the train stage's own step, alone and beside one process that
keeps a core busy, under each thread policy.

Each measurement is a fresh child process (an OpenMP setting is read once, when torch loads):
it builds the train stage's `medseg.training.Trainer` on a small store of synthetic fundus
cases (patches cut in RAM, augmentation, channels-last, bf16 autocast where the CPU computes
bf16, AdamW, clipping), takes ``--warmup`` untimed steps, then times ``--steps`` steps. Beside
a busy process: a pure-Python spin loop, started a second before the child and pinned to no
core, as another user's job would be. The policies:

- default: torch's own, one thread per CPU, libgomp's default wait (spin, then sleep);
- passive: ``OMP_WAIT_POLICY=PASSIVE``, threads that wait sleep at once;
- free cores: `medseg.training.precision.cpu_threads`, what train and the plan's probe do: one
  thread per core that other processes left free over half a second before the start;
- free cores + passive: both;
- 1 thread.

    python bench/busy.py                        # under flock /tmp/medseg-heavy.lock
    python bench/busy.py --steps 30 --patch-size 64 --batch-size 8

Prints a Markdown table: images/s alone, beside the busy process, and their ratio (1/N on N
cores is a fair share: 0.5 on two).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from harness import machine, table

REPO = Path(__file__).resolve().parents[1]
SPIN = "while True:\n    pass\n"
POLICIES: dict[str, tuple[dict[str, str], bool, int | None]] = {
    # name: (environment, free cores, threads)
    "default (torch: one thread per CPU)": ({}, False, None),
    "OMP_WAIT_POLICY=PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, False, None),
    "free cores (medseg cpu_threads)": ({}, True, None),
    "free cores + PASSIVE": ({"OMP_WAIT_POLICY": "PASSIVE"}, True, None),
    "1 thread": ({}, False, 1),
}


def write_store(out: Path, n_cases: int, size: int) -> None:
    """``n_cases`` synthetic cases of ``size``^2, green channel, as the preprocess stage keeps
    them (a ``train`` split and an empty ``val``)."""
    import yaml

    from medseg.config.keys import parse
    from medseg.config.sections import SynthesizeConfig
    from medseg.io.shards import ShardWriter
    from medseg.preprocess.dataset import case_arrays
    from medseg.preprocess.transforms import normalize_in_fov, select_channel
    from medseg.synthetic import generate_case

    raw = yaml.safe_load((REPO / "params.yaml").read_text())["synthesize"]
    raw.update(height=size, width=size, n_train=n_cases)
    cfg = parse(SynthesizeConfig, raw, prefix="synthesize.", source="params.yaml")
    writer = ShardWriter(out, "train")
    for i in range(n_cases):
        case = generate_case(cfg, i)
        image = normalize_in_fov(select_channel(case.image, "green"), case.fov)
        arrays = case_arrays(image, case.vessels.astype("uint8"), case.fov, 2)
        meta = {"height": size, "width": size, "full_height": size, "full_width": size}
        writer.add(f"{i:03d}", arrays, **meta)
    writer.close()
    ShardWriter(out, "val").close()


def child(args: argparse.Namespace) -> None:
    """One measurement: print ``{"images_s", "threads", "cpu_per_wall"}`` as JSON."""
    import torch
    import yaml

    from medseg.config.keys import parse
    from medseg.config.sections import TrainConfig
    from medseg.training.loop import Trainer
    from medseg.training.precision import cpu_threads

    if args.free_cores:
        cpu_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    raw = yaml.safe_load((REPO / "params.yaml").read_text())["train"]
    raw.update(
        patch_size=args.patch_size, batch_size=args.batch_size, epochs=1, loss="bce_dice",
        foreground_fraction=0.5, patches_per_epoch=(args.warmup + args.steps) * args.batch_size,
        device="cpu", cache="ram", postprocess=[],
    )  # fmt: skip
    cfg = parse(TrainConfig, raw, prefix="train.", source="params.yaml")
    trainer = Trainer(dataclasses.replace(cfg), args.data)
    trainer.net.train()
    batches = trainer.batches(trainer.plan_epoch(), 0)
    for batch in itertools.islice(batches, args.warmup):
        trainer.train_step(batch)
    start, start_cpu = time.perf_counter(), time.process_time()
    for batch in itertools.islice(batches, args.steps):
        trainer.train_step(batch)
    wall = time.perf_counter() - start
    print(json.dumps({
        "images_s": args.steps * args.batch_size / wall, "threads": torch.get_num_threads(),
        "cpu_per_wall": (time.process_time() - start_cpu) / wall,
    }))  # fmt: skip


def measure(args: argparse.Namespace, policy: str, busy: bool) -> dict:
    """Run one child under ``policy``, beside a spinning process when ``busy``."""
    env_extra, free, threads = POLICIES[policy]
    env = {**os.environ, **env_extra, "HF_HUB_OFFLINE": "1"}
    cmd = [
        sys.executable, __file__, "--child", "--data", str(args.data), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--patch-size", str(args.patch_size),
        "--batch-size", str(args.batch_size), *(["--free-cores"] if free else []),
        *(["--threads", str(threads)] if threads else []),
    ]  # fmt: skip
    spinner = subprocess.Popen([sys.executable, "-c", SPIN]) if busy else None
    try:
        if spinner is not None:
            time.sleep(1.0)  # on a core before the child samples the machine
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode != 0:
        sys.exit(f"{policy}: the child failed\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=24, help="timed steps per measurement")
    parser.add_argument("--warmup", type=int, default=3, help="untimed first steps")
    parser.add_argument("--patch-size", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--policies", nargs="*", default=list(POLICIES), choices=list(POLICIES))
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--free-cores", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if args.child:
        child(args)
        return
    print(
        f"train step: batch {args.batch_size} x {args.patch_size}^2, {args.warmup} untimed + "
        f"{args.steps} timed steps, a fresh process per figure\n{machine()}"
    )
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        args.data = Path(tmp)
        write_store(args.data, 8, 256)
        for policy in args.policies:
            alone = measure(args, policy, busy=False)
            busy = measure(args, policy, busy=True)
            rows.append((
                policy, f"{alone['images_s']:.1f} ({alone['threads']})",
                f"{busy['images_s']:.1f} ({busy['threads']})",
                f"{busy['images_s'] / alone['images_s']:.2f}",
            ))  # fmt: skip
            print(f"{policy}: alone {alone}, busy {busy}", file=sys.stderr, flush=True)
    print()
    print(table(("policy", "images/s alone (threads)", "beside 1 busy process", "ratio"), rows))


if __name__ == "__main__":
    main()
