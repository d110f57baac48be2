"""Where and in what precision training runs: this process's device, the CUDA backend flags
(fast or deterministic kernels), mixed precision (bf16 on CPUs that compute it natively, bf16
or fp16 on CUDA), and on a CPU how many threads (the cores other processes leave free)."""

from __future__ import annotations

import contextlib
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from medseg.config.sections import TrainConfig
from medseg.model import resolve_device
from medseg.training.distributed import World

log = logging.getLogger(__name__)

# /proc/stat's fields after a CPU's name that are time the CPU was not free: user, nice, system,
# irq, softirq, steal (another virtual machine had the core)
_NOT_IDLE = (0, 1, 2, 5, 6, 7)
# what fixes the threads of torch's parallel regions by hand (torchrun sets OMP_NUM_THREADS)
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS")


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


@dataclass(frozen=True)
class CpuSample:
    """CPU time at one moment: ``wall`` (monotonic seconds), ``busy`` (seconds the CPUs this
    process may run on have not been idle, all processes together) and ``own`` (this process's
    CPU seconds, all its threads)."""

    wall: float
    busy: float
    own: float


def cpu_sample(stat: str | Path = "/proc/stat") -> CpuSample | None:
    """The CPU time now (`CpuSample`); None where the OS has no ``/proc/stat`` (not Linux)."""
    try:
        lines = Path(stat).read_text(encoding="ascii", errors="replace").splitlines()
    except OSError:
        return None
    usable = os.sched_getaffinity(0) if hasattr(os, "sched_getaffinity") else None
    ticks = 0
    for line in lines:
        name, _, rest = line.partition(" ")
        if not name.startswith("cpu") or not name[3:].isdigit():
            continue  # the first line, "cpu", is the sum over all CPUs
        if usable is not None and int(name[3:]) not in usable:
            continue
        fields = rest.split()
        ticks += sum(int(fields[i]) for i in _NOT_IDLE if i < len(fields))
    return CpuSample(time.monotonic(), ticks / os.sysconf("SC_CLK_TCK"), time.process_time())


def other_cores(before: CpuSample | None, after: CpuSample | None) -> float:
    """How many of this process's CPUs other processes kept busy between two samples, on
    average (1.0: one core's worth); 0.0 where that is unknown."""
    if before is None or after is None or after.wall <= before.wall:
        return 0.0
    other = (after.busy - before.busy) - (after.own - before.own)
    return max(0.0, other / (after.wall - before.wall))


def usable_cpus() -> int:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


def free_cores(sample_s: float = 0.3) -> int:
    """The CPUs this process may run on, less those other processes keep busy (their use over
    ``sample_s`` seconds, rounded to whole cores); at least 1."""
    before = cpu_sample()
    time.sleep(sample_s)
    return max(1, usable_cpus() - round(other_cores(before, cpu_sample())))


def cpu_threads(deterministic: bool = False, sample_s: float = 0.3) -> int:
    """Give torch's parallel regions no more threads than there are free cores (`free_cores`);
    return how many they have.

    Every thread of a parallel region waits at its end for the slowest: with a thread on a core
    that another process keeps busy, each region waits for the scheduler to give that thread a
    turn. Beside one busy process on two cores, training with torch's default two threads ran
    at a tenth to a fifth of its speed alone; on the free core alone, at 0.6 of it
    (docs/benchmarks.md, "A busy machine"). The thread count changes the order of the sums
    inside the kernels, so the weights differ in their last bits: ``deterministic`` keeps
    torch's threads, for weights that are the same bit for bit whatever the load, and only
    warns. Threads fixed by hand (`THREAD_VARIABLES`, e.g. by torchrun) are kept.
    """
    threads = torch.get_num_threads()
    if any(os.environ.get(name) for name in THREAD_VARIABLES):
        return threads
    usable, free = usable_cpus(), free_cores(sample_s)
    if free >= threads:
        return threads
    busy = usable - free
    if deterministic:
        log.warning(
            "%d of %d CPUs are busy with other processes; train.deterministic keeps %d threads, "
            "which then run several times slower (false: one thread per free core)",
            busy, usable, threads,
        )  # fmt: skip
        return threads
    torch.set_num_threads(free)
    log.warning(
        "%d of %d CPUs are busy with other processes: torch runs on %d thread(s), slower than "
        "on a quiet machine",
        busy, usable, free,
    )  # fmt: skip
    return free
