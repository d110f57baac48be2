"""One training step of the default network on CPU, taken apart: the optimizer's kernels, the
memory layout, bf16 autocast and ``torch.compile``, each against the train stage's setting.

Random input (batch and patch size of params.yaml), BCE loss, gradient clipping, AdamW; the
variants take turns for ``--rounds`` rounds of ``--steps`` steps, so that a change of the
machine's load hits all of them alike. Prints two Markdown tables: the optimizer step alone
(per-parameter loop, ``foreach``, ``fused``), then whole steps per variant (median seconds a
step, and the range over rounds).

    python bench/cpu_step.py
    python bench/cpu_step.py --bf16 --compile      # also emulated bf16 and a compiled network
    python bench/cpu_step.py --profile             # and where the step's CPU time goes
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
import yaml
from harness import machine, rounds, table, turns

from medseg.config.keys import parse
from medseg.config.sections import TrainConfig
from medseg.model import build_model
from medseg.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]


class Variant:
    """A network and its optimizer, stepped on one fixed batch."""

    def __init__(
        self, cfg: TrainConfig, *, fused: bool, channels_last: bool, bf16: bool, compile: bool
    ) -> None:
        torch.manual_seed(0)
        net = build_model(ModelSpec.from_config(cfg, in_channels=1)).train()
        layout = torch.channels_last if channels_last else torch.contiguous_format
        self.net = net.to(memory_format=layout)
        self.optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, fused=fused or None)
        self.model = torch.compile(self.net) if compile else self.net
        self.bf16, self.clip = bf16, cfg.grad_clip
        shape = (cfg.batch_size, 1, cfg.patch_size, cfg.patch_size)
        self.x = torch.randn(shape).to(memory_format=layout)
        self.y = (torch.rand(shape) > 0.9).float()

    def run(self, steps: int) -> None:
        """Take ``steps`` training steps."""
        for _ in range(steps):
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                logits = self.model(self.x)
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits.float(), self.y)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.net.parameters(), self.clip)
            self.optimizer.step()


def optimizer_steps(cfg: TrainConfig, steps: int) -> dict[str, float]:
    """Median seconds of an AdamW step over the network's parameters (random gradients), by
    kernel."""
    net = build_model(ModelSpec.from_config(cfg, in_channels=1))
    for p in net.parameters():
        p.grad = torch.randn_like(p)
    found = {}
    for name, kwargs in (("per-parameter loop", {}), ("foreach", {"foreach": True}),
                         ("fused", {"fused": True})):  # fmt: skip
        optimizer = torch.optim.AdamW(net.parameters(), lr=cfg.lr, **kwargs)
        found[name] = rounds(optimizer.step, steps, warmup=1).median
    return found


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument("--steps", type=int, default=6, help="timed steps per variant and round")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--bf16", action="store_true", help="also bf16 autocast")
    parser.add_argument("--compile", action="store_true", help="also torch.compile (slow start)")
    parser.add_argument(
        "--profile", action="store_true", help="also the share of the step's top operators"
    )
    args = parser.parse_args()
    raw = yaml.safe_load(args.params.read_text())["train"]
    cfg = parse(TrainConfig, raw, prefix="train.", source=str(args.params))
    print(
        f"{cfg.arch}-{cfg.encoder}, batch {cfg.batch_size} x {cfg.patch_size}^2; torch threads "
        f"{torch.get_num_threads()}; torch CPU capability {torch.backends.cpu.get_cpu_capability()}"
        f"; {args.rounds} rounds of {args.steps} steps\n{machine()}\n"
    )
    optimizer = optimizer_steps(cfg, 20)
    print(table(("AdamW step", "ms"), [(k, f"{v * 1000:.1f}") for k, v in optimizer.items()]))

    base = {"fused": True, "channels_last": True, "bf16": False, "compile": False}
    variants = {
        "the train stage's (fused AdamW, channels-last, fp32)": base,
        "per-parameter AdamW": dict(base, fused=False),
        "contiguous (not channels-last)": dict(base, channels_last=False),
    }
    if args.bf16:
        variants["bf16 autocast"] = dict(base, bf16=True)
    if args.compile:
        variants["torch.compile"] = dict(base, compile=True)
    built = {}
    for name, kwargs in variants.items():
        built[name] = Variant(cfg, **kwargs)
        start = time.perf_counter()
        built[name].run(1)  # the first step of a process (and a compile) is not timed
        print(f"{name}: first step {time.perf_counter() - start:.1f} s")
    timings = turns(
        {name: lambda v=variant: v.run(args.steps) for name, variant in built.items()},
        args.rounds, warmup=0,
    )  # fmt: skip
    if args.profile:
        with torch.profiler.profile() as prof:
            next(iter(built.values())).run(args.steps)
        events = prof.key_averages()
        total = sum(e.self_cpu_time_total for e in events)
        top = sorted(events, key=lambda e: -e.self_cpu_time_total)[:5]
        rows = [(e.key, f"{e.self_cpu_time_total / total:.0%}") for e in top]
        print("\n" + table(("operator (the train stage's step)", "share of CPU time"), rows))
    rows = [
        (
            name,
            f"{t.median / args.steps:.3f}",
            f"{t.min / args.steps:.3f} - {t.max / args.steps:.3f}",
        )
        for name, t in timings.items()
    ]
    print("\n" + table(("variant", "s a step, median", "min - max over rounds"), rows))


if __name__ == "__main__":
    main()
