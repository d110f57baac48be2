"""One optimizer step and the parts it uses, built once from the ``train`` params.

`build_step` builds them (network, its DDP/compile wrapper, optimizer, schedule, loss, mixed
precision) and `StepParts.run` is the step: the `medseg.training.loop.Trainer` receives the
parts built and calls it for every batch, and the plan's step-time probe
(`medseg.planning.probe`) times the same call, so the probe measures what training runs, not a
copy of it. Nothing here reads data or imports the loop.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel

from medseg.config.sections import TrainConfig
from medseg.errors import MedsegError
from medseg.model import build_model
from medseg.spec import ModelSpec
from medseg.training.distributed import World, sync_batchnorm
from medseg.training.losses import loss_from_config
from medseg.training.optim import build_optimizer, build_schedule
from medseg.training.precision import amp_dtype


@dataclass
class StepParts:
    """What one optimizer step uses.

    Attributes:
        model: the network whose weights are trained and saved.
        net: the module that runs it: ``model``, DDP-wrapped under torchrun, compiled with
            ``train.compile``.
        optimizer, scheduler: from ``train.optimizer`` and ``train.schedule``.
        scaler: the gradient scaler (active for float16 only).
        loss_fn: ``(logits, target, valid) -> scalar``, `medseg.training.losses`.
        amp_dtype: the autocast dtype, None for float32.
        channels_last: inputs go channels-last (``train.channels_last``).
        grad_clip: the gradient norm clipped to, 0 for none.
    """

    model: torch.nn.Module
    net: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    loss_fn: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
    amp_dtype: torch.dtype | None
    channels_last: bool
    grad_clip: float

    def run(self, x: torch.Tensor, y: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        """One step on an augmented batch already on the device: forward under autocast, loss,
        backward, clip, optimizer step, schedule.

        Args:
            x: (N, C, H, W) float32 inputs.
            y: (N, 1, H, W) float32 targets (labels as floats for several classes).
            valid: (N, 1, H, W) float32, 1 where a pixel counts.

        Returns:
            The loss, a scalar tensor on the device (not detached).
        """
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(x.device.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self.net(x)
        loss = self.loss_fn(logits, y, valid)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if self.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss


def build_step(
    cfg: TrainConfig,
    spec: ModelSpec,
    device: torch.device,
    steps_per_epoch: int,
    *,
    world: World | None = None,
    reduce: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> StepParts:
    """Build the parts of a training step from the ``train`` params, in the order the weights'
    initialisation depends on (the network first: it draws from torch's generator).

    Args:
        spec: the network's spec (`ModelSpec.from_config`).
        device: where it trains.
        steps_per_epoch: for the learning-rate schedule.
        world: the processes of a distributed run (default: this one alone).
        reduce: sums the loss's parts over processes (`medseg.training.distributed.allsum`).

    Raises:
        MedsegError: the architecture cannot take patches of ``train.patch_size``.
    """
    world = world or World()
    model = build_model(spec, cfg.encoder_weights)
    _check_input_size(model, spec, cfg.patch_size)
    if world.size > 1 and cfg.sync_batchnorm:
        model = sync_batchnorm(model, device)
    model.to(device)
    if cfg.channels_last:
        model.to(memory_format=torch.channels_last)
    net: torch.nn.Module = model
    if world.size > 1:
        ids = [device.index] if device.type == "cuda" else None
        net = DistributedDataParallel(model, device_ids=ids)
    if cfg.compile:
        net = torch.compile(net)  # type: ignore[assignment]
    optimizer = build_optimizer(cfg, model)
    scheduler = build_schedule(cfg, optimizer, steps_per_epoch)
    dtype = amp_dtype(cfg, device)
    return StepParts(
        model=model,
        net=net,
        optimizer=optimizer,
        scheduler=scheduler,
        scaler=torch.amp.GradScaler("cuda", enabled=dtype == torch.float16),
        loss_fn=loss_from_config(cfg, reduce) if reduce is not None else loss_from_config(cfg),
        amp_dtype=dtype,
        channels_last=bool(cfg.channels_last),
        grad_clip=float(cfg.grad_clip),
    )


def _check_input_size(model: torch.nn.Module, spec: ModelSpec, patch_size: int) -> None:
    """Fail before training when the architecture cannot take patches of this size."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, spec.in_channels, patch_size, patch_size))
    except (RuntimeError, ValueError) as err:
        raise MedsegError(
            f"params: train.arch {spec.arch} with encoder {spec.encoder} cannot take patches of "
            f"train.patch_size {patch_size} ({err}); use larger patches"
        ) from err
