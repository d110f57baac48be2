"""Several processes, one training: PyTorch DDP as started by ``torchrun``.

``torchrun --nproc_per_node=N stages/train.py ...`` sets ``RANK``, ``WORLD_SIZE`` and
``LOCAL_RANK`` in each process; without them the run is a single process and every function here
does nothing. Each process takes a disjoint share of the global batch. The losses sum their
statistics over the processes (`allsum`) and batch norm does the same (`sync_batchnorm`), so N
processes compute the loss and the gradients of one process over the whole batch.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from medseg.errors import MedsegError


@dataclass(frozen=True)
class World:
    """This process's place in the run: rank among ``size`` processes, GPU index on its node."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0 alone writes outputs, logs and checkpoints."""
        return self.rank == 0

    def share(self, batch_size: int) -> slice:
        """This process's part of a global batch of ``batch_size`` patches.

        Raises:
            MedsegError: the batch does not divide among the processes.
        """
        if batch_size % self.size:
            raise MedsegError(
                f"params: train.batch_size ({batch_size}) is the global batch and must divide by "
                f"the number of processes ({self.size})"
            )
        n = batch_size // self.size
        return slice(self.rank * n, (self.rank + 1) * n)


def world_from_env() -> World:
    """The `World` that ``torchrun`` describes in the environment (one process without it)."""
    try:
        return World(
            int(os.environ.get("RANK", "0")),
            int(os.environ.get("WORLD_SIZE", "1")),
            int(os.environ.get("LOCAL_RANK", "0")),
        )
    except ValueError as err:
        raise MedsegError(f"RANK, WORLD_SIZE or LOCAL_RANK is not an integer: {err}") from err


@contextlib.contextmanager
def process_group(world: World, device: torch.device) -> Iterator[None]:
    """Join the process group for the block (NCCL on CUDA, gloo on CPU) when there are several."""
    if world.size == 1 or dist.is_initialized():
        yield
        return
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    try:
        yield
    finally:
        dist.destroy_process_group()


def active() -> bool:
    """Whether this process is part of a run of several."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def allsum(t: torch.Tensor) -> torch.Tensor:
    """Sum of ``t`` over all processes, differentiable; ``t`` itself in a single process.

    The backward pass sums the gradients as well, so every process back-propagates the global
    loss; with DDP's averaging of gradients over N processes the result is the gradient of the
    loss over the whole batch.
    """
    return _AllSum.apply(t) if active() else t


class _AllSum(torch.autograd.Function):
    """All-reduce (sum) whose backward is an all-reduce (sum) of the gradients."""

    @staticmethod
    def forward(ctx: Any, t: torch.Tensor) -> torch.Tensor:
        out = t.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def any_process(flag: bool, device: torch.device) -> bool:
    """True on every process when ``flag`` is true on any of them (a stop request, a bad loss)."""
    if not active():
        return flag
    t = torch.tensor(float(flag), device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier() -> None:
    """Wait for every process (no-op in a single process)."""
    if active():
        dist.barrier()


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """Batch norm with statistics over the global batch on any backend (gloo on CPU included).

    PyTorch's ``SyncBatchNorm`` runs on GPUs only; this does the same with one all-reduce of
    per-channel sums per layer. Used on CPU; on CUDA `sync_batchnorm` takes PyTorch's own.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and active()):
            return super().forward(x)
        c = x.shape[1]
        xf = x.float()
        count = torch.full((1,), x.numel() / c, dtype=torch.float32, device=x.device)
        stats = allsum(torch.cat([xf.sum((0, 2, 3)), (xf * xf).sum((0, 2, 3)), count]))
        n = stats[-1]
        mean = stats[:c] / n
        var = (stats[c : 2 * c] / n - mean * mean).clamp_min(0.0)
        if self.track_running_stats and self.running_mean is not None:
            assert self.running_var is not None and self.num_batches_tracked is not None
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                m = 0.1 if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), m)
                unbiased = var.detach() * n / (n - 1).clamp_min(1.0)
                self.running_var.lerp_(unbiased.to(self.running_var.dtype), m)
        shape = (1, c, 1, 1)
        y = (xf - mean.view(shape)) * torch.rsqrt(var.view(shape) + self.eps)
        if self.affine:
            y = y * self.weight.view(shape) + self.bias.view(shape)
        return y.to(x.dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """Batch norm over the global batch: PyTorch's ``SyncBatchNorm`` on CUDA, else ours."""
    if device.type == "cuda":
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    return _swap_batchnorm(model)


def _swap_batchnorm(module: nn.Module) -> nn.Module:
    if isinstance(module, nn.BatchNorm2d) and not isinstance(module, AllReduceBatchNorm2d):
        new = AllReduceBatchNorm2d(
            module.num_features, module.eps, module.momentum, module.affine,
            module.track_running_stats,
        )  # fmt: skip
        new.load_state_dict(module.state_dict())
        return new
    for name, child in module.named_children():
        setattr(module, name, _swap_batchnorm(child))
    return module
