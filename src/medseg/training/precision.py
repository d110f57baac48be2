"""Where and in what precision training runs: this process's device, the CUDA backend flags
(fast or deterministic kernels), and mixed precision (bf16 on CPUs that compute it natively,
bf16 or fp16 on CUDA)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from medseg.config.sections import TrainConfig
from medseg.model import resolve_device
from medseg.training.distributed import World


def train_device(cfg: TrainConfig, world: World) -> torch.device:
    """``train.device``; on CUDA this process's GPU (``LOCAL_RANK``), made the current one."""
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def backend_flags(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """Fast or deterministic CUDA kernels for the block; the previous settings come back after.

    CPU runs are deterministic as they are. On CUDA, ``train.deterministic`` turns on
    deterministic algorithms (and the cuBLAS workspace setting they need; operations without a
    deterministic kernel warn); otherwise cuDNN picks the fastest kernels and TF32 is allowed.
    """
    if device.type != "cuda":
        yield
        return
    cudnn = torch.backends.cudnn
    saved = (
        torch.are_deterministic_algorithms_enabled(),
        torch.is_deterministic_algorithms_warn_only_enabled(), cudnn.deterministic, cudnn.benchmark,
        torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32,
    )  # fmt: skip
    if cfg.deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        # warn_only: a few CUDA backward kernels have no deterministic version (bilinear
        # upsampling in FPN/DeepLab/PSPNet, NLL loss with several classes): warn, do not crash
        torch.use_deterministic_algorithms(True, warn_only=True)
        cudnn.deterministic, cudnn.benchmark = True, False
        torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = False
    else:
        cudnn.benchmark = True
        torch.backends.cuda.matmul.allow_tf32 = cudnn.allow_tf32 = True
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(saved[0], warn_only=saved[1])
        cudnn.deterministic, cudnn.benchmark = saved[2], saved[3]
        torch.backends.cuda.matmul.allow_tf32, cudnn.allow_tf32 = saved[4], saved[5]


def cpu_bf16_native(cpuinfo: str | Path = "/proc/cpuinfo") -> bool:
    """Whether this CPU has bf16 instructions (AVX-512 bf16 or AMX), from the flags Linux lists;
    False where there is no such list. Without them bf16 autocast is emulated and slower than
    fp32."""
    try:
        text = Path(cpuinfo).read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.partition(":")[2].split())
    return bool(flags & {"avx512_bf16", "amx_bf16"})


def amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision: on CUDA bf16 where the GPU has it, else fp16 with a grad scaler; on CPU
    bf16 when ``train.amp_cpu`` is true, or ``auto`` and the CPU computes bf16 natively
    (`cpu_bf16_native`)."""
    if device.type == "cpu":
        wanted = cfg.amp_cpu is True or (cfg.amp_cpu == "auto" and cpu_bf16_native())
        return torch.bfloat16 if wanted else None
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
