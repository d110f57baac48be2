"""The optimizer and its learning-rate schedule, built by name from ``train.*`` params."""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from medseg.config.sections import TrainConfig

__all__ = ["OPTIMIZERS", "build_optimizer", "build_schedule", "lr_factor"]

# train.optimizer: every name of `medseg.names.OPTIMIZERS` and its class
OPTIMIZERS: dict[str, Callable[..., torch.optim.Optimizer]] = {
    "adam": torch.optim.Adam,
    "adamw": torch.optim.AdamW,
}


def lr_factor(
    step: int, total: int, warmup: int, schedule: str, min_ratio: float = 0.0, power: float = 0.9
) -> float:
    """The learning rate at iteration ``step`` (0-based) as a share of ``train.lr``.

    Linear warm-up over the first ``warmup`` steps (from 1/warmup to 1), then ``constant``,
    ``cosine`` (half a cosine down to ``min_ratio``) or ``poly`` (``(1 - t) ** power`` down to
    ``min_ratio``), t running from 0 after the warm-up to 1 at the last step.
    """
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    shape = 0.5 * (1.0 + math.cos(math.pi * t)) if schedule == "cosine" else (1.0 - t) ** power
    return min_ratio + (1.0 - min_ratio) * shape


def build_optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """``train.optimizer`` (Adam or AdamW) at ``train.lr``; no weight decay on biases and
    normalisation weights (1-D parameters).

    Build it after the model is on its device: the fused kernel updates all parameters at once
    (on CUDA; on CPU from torch 2.4, where it is 5x faster than the per-parameter loop for the
    default UNet: ``bench/cpu_step.py``).
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    cls = OPTIMIZERS[cfg.optimizer]
    device = next(model.parameters()).device
    fused = device.type == "cuda" or (
        device.type == "cpu" and torch.torch_version.TorchVersion(torch.__version__) >= "2.4"
    )
    return cls(groups, lr=cfg.lr, fused=fused or None)


def build_schedule(
    cfg: TrainConfig, optimizer: torch.optim.Optimizer, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """Warm-up and ``train.schedule`` over ``train.epochs * steps_per_epoch`` iterations,
    stepped once per iteration (see `lr_factor`)."""
    total, warmup = cfg.epochs * steps_per_epoch, round(cfg.warmup_epochs * steps_per_epoch)
    min_ratio = cfg.min_lr / cfg.lr
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, total, warmup, cfg.schedule, min_ratio, cfg.poly_power)
    )
