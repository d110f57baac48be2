"""The step-time probe of the plan: seconds per training step on this machine, measured on the
train stage's own step (`medseg.training.step`: the parts built as training builds them, the
same call), imported only when the probe runs, so that `medseg.planning.plan` stays free of
torch and nothing here loads the training loop."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

# other processes' CPU use during a probe (in cores) above which its step time is not this
# machine's: the plan still uses it, but a later plan measures again instead of keeping it
BUSY_CORES = 0.5


@dataclass(frozen=True)
class StepProbe:
    """What a probe measured: ``seconds`` a step (the median), the torch ``threads`` it ran on
    (on a CPU), and ``other_cores``: how many of this process's CPUs other processes kept busy
    meanwhile, on average (`medseg.training.precision.other_cores`; 0.0 on a GPU or where
    unknown)."""

    seconds: float
    threads: int
    other_cores: float

    @property
    def busy(self) -> bool:
        """Whether other processes took more than `BUSY_CORES` while it measured."""
        return self.other_cores > BUSY_CORES


def probe_step_seconds(
    cfg: Any,
    in_channels: int,
    *,
    steps: int = 5,
    warmup: int = 3,
    device: str | None = None,
) -> StepProbe:
    """Seconds per training step on this machine, measured as train runs one.

    Builds the step's parts from ``cfg`` as training does (`medseg.training.step.build_step`)
    and times ``steps`` calls of the step itself (forward, loss, backward, clip, optimizer,
    schedule) on a random batch of ``cfg.batch_size`` x ``in_channels`` x ``cfg.patch_size``^2 after
    ``warmup`` steps (allocator, kernel choice); the median step. Patch cutting and
    augmentation are not included (`TRAIN_SHARE` leaves room for them). On a CPU it runs on
    the threads train would take (`medseg.training.precision.cpu_threads`; torch's setting is
    restored after) and watches the other processes' CPU use while it measures.

    Args:
        cfg: the train params (`medseg.config.TrainConfig`) with the planned patch and batch.
        in_channels: the network's input channels (3 for ``rgb``, else 1).
        steps: timed steps.
        warmup: untimed steps first.
        device: default ``cfg.device`` (``auto``: CUDA when present).

    Returns:
        The median seconds per step, the threads, the other processes' CPU use.
    """
    import torch

    from medseg.model import resolve_device
    from medseg.training.precision import cpu_sample, cpu_threads, other_cores

    dev = resolve_device(device or cfg.device)
    saved = torch.get_num_threads()
    try:
        threads = cpu_threads(cfg.deterministic) if dev.type == "cpu" else saved
        before = cpu_sample()
        seconds = _median_step(cfg, in_channels, dev, steps, warmup)
        other = other_cores(before, cpu_sample()) if dev.type == "cpu" else 0.0
    finally:
        torch.set_num_threads(saved)
    return StepProbe(seconds, threads, round(other, 2))


def _median_step(cfg: Any, in_channels: int, dev: Any, steps: int, warmup: int) -> float:
    """The median seconds of ``steps`` training steps after ``warmup`` (see
    `probe_step_seconds`), on the torch device ``dev``."""
    import time

    import torch

    from medseg.spec import ModelSpec
    from medseg.training.step import build_step

    torch.manual_seed(0)
    spec = ModelSpec.from_config(cfg, in_channels)
    parts = build_step(cfg, spec, dev, max(warmup + steps, 1))
    parts.net.train()
    gen = torch.Generator().manual_seed(0)
    shape = (cfg.batch_size, in_channels, cfg.patch_size, cfg.patch_size)
    x = torch.randn(shape, generator=gen).to(dev)
    classes = max(cfg.classes, 1)
    if classes == 1:
        y = (torch.rand((shape[0], 1, *shape[2:]), generator=gen) > 0.8).float().to(dev)
    else:
        y = torch.randint(0, classes, (shape[0], 1, *shape[2:]), generator=gen).float().to(dev)
    valid = torch.ones((shape[0], 1, *shape[2:]), device=dev)
    times = []
    for i in range(warmup + steps):
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        start = time.perf_counter()
        parts.run(x, y, valid)  # the train stage's own step (augmentation aside)
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return float(np.median(times))


def probe_key(cfg: Any, in_channels: int, device: str | None = None) -> dict[str, Any]:
    """What `probe_step_seconds` measures, as a JSON-ready dict: the network, the step's shape,
    loss, optimizer and precision, and the device it runs on (for a CPU: its model name and the
    cores this process may use). Two probes with equal keys measure the same step."""
    import os
    import platform

    import torch

    from medseg.model import resolve_device
    from medseg.training.precision import amp_dtype

    dev = resolve_device(device or cfg.device)
    if dev.type == "cuda":
        where = torch.cuda.get_device_name(dev)
    else:
        cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
        where = f"{_cpu_model() or platform.machine()}, {cores} cores"
    dtype = amp_dtype(cfg, dev)
    return {
        "device": f"{dev.type}: {where}",
        "torch": torch.__version__,
        "network": [cfg.arch, cfg.encoder, list(cfg.decoder_channels), cfg.classes],
        "step": [cfg.batch_size, in_channels, cfg.patch_size],
        "loss": cfg.loss,
        "optimizer": cfg.optimizer,
        "precision": str(dtype).replace("torch.", "") if dtype is not None else "float32",
        "channels_last": bool(cfg.channels_last),
    }


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""
