"""What describes the machine a plan's step time was measured on, read without importing torch.

The ``machine`` stage writes it to ``machine.json`` on every ``dvc repro`` (it is always
changed, and cheap); the plan stage depends on the file. On the same machine the file comes out
byte for byte the same and nothing after it reruns; on another machine (another CPU model or
instruction set, other cores, a GPU, another torch) the plan measures its step again, so the
same ``train.budget`` buys that machine's steps.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

# the CPU flags a training step's speed depends on (vector width, bf16 and int8 units)
SPEED_FLAGS = (
    "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16",
    "avx512_fp16", "amx_tile", "amx_bf16", "amx_int8", "asimd", "sve", "bf16", "i8mm",
)  # fmt: skip
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "CUDA_VISIBLE_DEVICES")


def describe(cpuinfo: str | Path = "/proc/cpuinfo") -> dict[str, Any]:
    """This machine as the step time sees it: CPU model, its speed flags, the cores this process
    may use, the thread and device variables set, the GPUs, the torch version. Nothing that
    changes from one run to the next on the same machine (no load, no clock)."""
    model, flags = _cpu(Path(cpuinfo))
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "cpu": model or platform.processor() or platform.machine(),
        "cpu_flags": [f for f in SPEED_FLAGS if f in flags],
        "cores": cores,
        "threads": {k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ},
        "gpus": _gpus(),
        "torch": _version("torch"),
        "system": f"{platform.system()} {platform.machine()}",
    }


def _cpu(path: Path) -> tuple[str, set[str]]:
    """The first CPU's model name and flags from ``/proc/cpuinfo`` (empty where there is none)."""
    model, flags = "", set[str]()
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


def _gpus() -> list[str]:
    """The names of the NVIDIA GPUs ``nvidia-smi`` lists (none where it is absent or fails)."""
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None
