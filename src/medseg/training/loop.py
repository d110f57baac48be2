"""The fit loop: patches from the cases (on the device, in RAM or memory-mapped), AdamW with
warm-up and a schedule, AMP, DDP, checkpoints.

One epoch, step by step:

1. The sampler draws the epoch's plan (every random choice) from its seeded generator; each
   process of a ``torchrun`` run draws the same plan and cuts its own share of each batch.
2. Each step: crop (on the device, in the main process, or in DataLoader workers), copy to the
   device (unless cut there), augment the batch there, forward under autocast, loss (summed
   over processes), backward, clip, step, schedule. Nothing waits for the GPU inside a step;
   losses stay on the device.
3. After the epoch: one look at the losses (a NaN or inf stops the run, naming the step),
   validation on whole images every ``val_every`` epochs, the callbacks (dvclive's curves), a
   checkpoint (on a GPU written in the background from a host copy), one "epoch clock" log
   line (wall-clock start and end, plan and checkpoint seconds: what bench/gpu.sh reads).

A SIGTERM (spot preemption) or SIGINT finishes the current step, writes a checkpoint that
includes the position within the epoch, and exits non-zero; the next run with the same params and
data resumes from it and ends with the same weights and metrics as a run never interrupted. The
checkpoint is removed after a successful run: the weights are in the models folder then.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from medseg.config import TrainConfig
from medseg.errors import MedsegError
from medseg.inference.bundle import save_bundle
from medseg.io.atomic import atomic_dir
from medseg.labels import LabelSpace
from medseg.model import check_names
from medseg.spec import ModelSpec
from medseg.training.cache import DevicePlan, TrainingData, make_sampler
from medseg.training.callbacks import Callback, LiveLog
from medseg.training.checkpoint import (
    CHECKPOINT,
    CheckpointWriter,
    StopSignals,
    load_checkpoint,
    mark_finished,
    params_hash,
    restore_rng,
    rng_state,
)
from medseg.training.data import Batch, PatchSampler, Plan, StepBatches, augment
from medseg.training.distributed import (
    World,
    allsum,
    any_process,
    barrier,
    process_group,
    world_from_env,
)
from medseg.training.monitor import GpuMonitor
from medseg.training.postchoice import choose_for_bundle
from medseg.training.precision import backend_flags, train_device
from medseg.training.step import StepParts, build_step
from medseg.training.validation import validate

log = logging.getLogger(__name__)

STOP_CHECK_EVERY = 8  # steps between stop-signal checks across processes (a collective op)


def fit(
    cfg: TrainConfig,
    data_dir: str | Path,
    models_dir: str | Path,
    logs_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
    callbacks: Sequence[Callback] = (),
) -> dict:
    """Train a network on the ``train`` split in ``data_dir``, choosing the best epoch on ``val``.

    Writes ``models_dir/model.safetensors`` (best validation Dice; the last epoch when there is
    no validation split; in its metadata the validation threshold and the post-processing chosen
    on validation, `medseg.training.postchoice`) and ``last.safetensors``, each with a ``.json``
    spec, and per-epoch curves (dvclive, when installed) into ``logs_dir``. With
    ``checkpoint_dir``, a checkpoint is written there after every epoch and on a stop signal,
    resumed when it matches, and removed at the end. Under ``torchrun`` only rank 0 writes.
    ``callbacks`` run after the curves'.

    Returns:
        A summary: best epoch, best validation Dice, images per second of the last epoch.

    Raises:
        MedsegError: bad params or data, a non-finite loss, or a stop signal (after saving).
    """
    check_names(cfg.arch, cfg.encoder)
    world = world_from_env()
    device = train_device(cfg, world)
    with process_group(world, device), backend_flags(cfg, device), StopSignals() as stop:
        hooks = [LiveLog(logs_dir)] if world.main else []
        trainer = Trainer.from_config(
            cfg, data_dir, world=world, device=device, stop=stop, checkpoint_dir=checkpoint_dir,
            callbacks=[*hooks, *callbacks],
        )  # fmt: skip
        return trainer.run(models_dir)


class Trainer:
    """One training run over parts built beforehand (MONAI's way): `from_config` builds them
    by name from the ``train.*`` params; `run` is the whole of it.

    The parts are public so that benchmarks and extensions use them as the run does: the patch
    ``sampler`` (host or device, `medseg.training.cache`), the step's ``parts`` (the ``model``
    and the ``net`` that trains it, the optimizer, schedule and loss,
    `medseg.training.step.StepParts`); `plan_epoch`, `batches` and `train_step` are one epoch's
    pieces, and ``callbacks`` see every step and epoch (`medseg.training.callbacks.Callback`).

    Args:
        cfg: the ``train`` params.
        data: the splits (`TrainingData.open`).
        sampler: cuts the training patches (`medseg.training.cache.make_sampler`); its
            generator draws every epoch's plan.
        parts: the step's parts (`medseg.training.step.build_step`).
        world: the processes of a distributed run (default: this one alone).
        device: default from ``train.device``.
        stop: the stop-signal flags (default: none ever arrives).
        checkpoint_dir: where the resume checkpoint goes (default: no checkpoints).
        callbacks: hooks called in order.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        data: TrainingData,
        sampler: PatchSampler,
        parts: StepParts,
        *,
        world: World | None = None,
        device: torch.device | None = None,
        stop: StopSignals | None = None,
        checkpoint_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> None:
        self.cfg, self.world = cfg, world or World()
        self.device = device or train_device(cfg, self.world)
        self.stop = stop or StopSignals()
        self.callbacks = list(callbacks)
        self.share = self.world.share(cfg.batch_size)
        self.data_dir, self.cache = data.dir, data.cache
        self.train, self.val, self.class_names = data.train, data.val, data.class_names
        self.labels = LabelSpace.of(cfg.classes, self.class_names)
        self.ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
        # on a GPU the checkpoint is written in the background (a host copy first: still exact)
        self.checkpoints = CheckpointWriter(self.ckpt or CHECKPOINT, self.device.type != "cpu")
        self.hash = params_hash(cfg, [*self.train.files(), *self.val.files()])
        self.sampler, self.parts, self.model = sampler, parts, parts.model
        self.spec = ModelSpec.from_config(cfg, in_channels=sampler.channels)
        self.steps = math.ceil(cfg.patches_per_epoch / cfg.batch_size)
        # the position and history of the run, all saved in a checkpoint
        self.epoch, self.step = 0, 0
        self.epoch_rng: dict[str, Any] = dict(sampler.rng.bit_generator.state)
        self.losses: list[torch.Tensor] = []
        # per epoch: the values logged, and the best epoch so far
        self.history: list[tuple[dict[str, float], dict[str, float]]] = []
        self.best_dice, self.best_epoch = -1.0, -1
        self.best_state: dict[str, torch.Tensor] | None = None
        self.best_threshold: float | None = None  # the best epoch's, for evaluate: auto
        # the machine's side of the current epoch (wall-clock times; `_log_clock` writes it)
        self.clock: dict[str, float] = {}
        self.first_step_at: float | None = None  # time.time() when this process's first step ended
        self.monitor = GpuMonitor.start(self.device) if self.world.main else None

    @classmethod
    def from_config(
        cls,
        cfg: TrainConfig,
        data_dir: str | Path,
        *,
        world: World | None = None,
        device: torch.device | None = None,
        stop: StopSignals | None = None,
        checkpoint_dir: str | Path | None = None,
        callbacks: Sequence[Callback] = (),
    ) -> Trainer:
        """Open the data, seed, then build the sampler and the step's parts by name from
        ``cfg``, in this order (the weights' initialisation draws from torch's seeded
        generator), and the Trainer over them. Arguments as for `Trainer`; ``data_dir``: the
        preprocess stage's output."""
        world = world or World()
        device = device or train_device(cfg, world)
        data = TrainingData.open(cfg, data_dir, device, world.size)
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        on_device = device if data.cache == "device" else None
        sampler = make_sampler(data.train, cfg, rng, len(data.class_names), on_device)
        spec = ModelSpec.from_config(cfg, in_channels=sampler.channels)
        steps = math.ceil(cfg.patches_per_epoch / cfg.batch_size)
        parts = build_step(cfg, spec, device, steps, world=world, reduce=allsum)
        return cls(
            cfg, data, sampler, parts, world=world, device=device, stop=stop,
            checkpoint_dir=checkpoint_dir, callbacks=callbacks,
        )  # fmt: skip

    # -- the run -------------------------------------------------------------------------------

    def run(self, models_dir: str | Path) -> dict:
        """Resume when a checkpoint matches, train the remaining epochs, write the bundle.

        Returns:
            The summary `fit` returns.
        """
        cfg = self.cfg
        self.resume()
        self._emit("on_run_start")
        throughput = 0.0
        try:
            while self.epoch < cfg.epochs:
                throughput = self.train_epoch()
                record = self._end_of_epoch(throughput)
                self.clock["val_end"] = time.time()
                self._emit("on_epoch_end", record)
                self._save_checkpoint()
                self._log_clock()
                if any_process(self.stop.requested is not None, self.device):
                    self._stopped()
        finally:
            self._emit("on_run_end")
            if self.monitor is not None:
                self.monitor.stop()
            if self.world.main:
                self.checkpoints.wait()  # the last checkpoint is whole on disk, even on an error
        if self.world.main:
            self._write_models(Path(models_dir))
            if self.ckpt is not None:
                self.ckpt.unlink(missing_ok=True)
                mark_finished(self.ckpt.parent)
        barrier()
        return {
            "best_epoch": self.best_epoch,
            "best_val_dice": self.best_dice,
            "images_per_s": throughput,
        }

    def _emit(self, hook: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, hook)(self, *args)

    def plan_epoch(self) -> Plan | DevicePlan:
        """The current epoch's plan, redrawn from the generator state at the epoch's start."""
        self.sampler.rng.bit_generator.state = self.epoch_rng
        return self.sampler.plan(self.steps, self.cfg.batch_size)

    def train_epoch(self) -> float:
        """Train the rest of the current epoch; return its throughput in images per second.

        Losses stay on the device; on CUDA nothing in the loop waits for the GPU (the epoch's
        losses are looked at once, at its end).
        """
        cfg = self.cfg
        start, first = time.time(), self.step  # the epoch's time includes drawing its plan
        plan = self.plan_epoch()
        self.clock = {"epoch": self.epoch + 1, "start": start, "plan_s": time.time() - start}
        self.parts.net.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        self._emit("on_epoch_start")
        bar = tqdm(
            self.batches(plan, first), total=self.steps, initial=first,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
            disable=None if self.world.main else True,
        )  # fmt: skip
        # the bar shows the loss on a CPU only: there .item() costs nothing, on a GPU it waits
        show_loss = not bar.disable and self.device.type == "cpu"
        for batch in bar:
            loss = self.train_step(batch)
            self.losses.append(loss.detach())
            self.step += 1
            if self.first_step_at is None:  # start-up and compile end here: wait for it once
                _synchronize(self.device)
                self.first_step_at = time.time()
            self._emit("on_step_end", loss)
            if self.step % 10 == 0 and show_loss:
                value = loss.item()
                bar.set_postfix(loss=f"{value:.4f}")
                if not math.isfinite(value) and self.world.size == 1:  # under DDP every rank
                    self._check_losses()  # checks at the end of the epoch, together
            if self._stop_requested() and self.step < self.steps:
                bar.close()
                self._check_losses()
                self._save_checkpoint(wait=True)
                self._stopped()
        bar.close()
        self._check_losses()  # on a GPU, this waits for the epoch's last step
        end = time.time()
        self.clock.update(end=end, images=(self.step - first) * cfg.batch_size)
        return self.clock["images"] / (end - start)

    def train_step(self, batch: Batch) -> torch.Tensor:
        """One optimizer step on ``batch`` (moved to the device when it is not there): augment,
        then the step (`medseg.training.step.StepParts.run`: forward under autocast, loss summed
        over processes, backward, clip, step, schedule).

        Returns:
            The loss, a scalar tensor on the device (not detached).
        """
        x, y, v = augment(
            batch.to(self.device, non_blocking=True), self.cfg.patch_size, self.sampler.aug,
            self.sampler.multiclass,
        )  # fmt: skip
        return self.parts.run(x, y, v)

    def batches(self, plan: Any, first: int = 0) -> Iterable[Batch]:
        """The batches of steps ``first..`` of ``plan`` (`plan_epoch`'s), this process's share of
        each: cut on the device (``train.cache: device``), here, or in ``train.workers``
        DataLoader processes feeding pinned memory to a GPU."""
        if self.cache == "device" or self.cfg.workers == 0:
            return (self.sampler.crop(plan, s, self.share) for s in range(first, len(plan)))
        assert isinstance(plan, Plan)
        return torch.utils.data.DataLoader(
            StepBatches(self.sampler, plan, first, self.share),
            batch_size=None,
            num_workers=self.cfg.workers,
            pin_memory=self.device.type == "cuda",
        )

    def _end_of_epoch(self, throughput: float) -> dict[str, float]:
        """Validate when due, keep the best weights; return the epoch's logged values."""
        cfg, epoch = self.cfg, self.epoch + 1
        record = {
            "train/loss": float(torch.stack(self.losses).mean()),
            "lr": self.parts.optimizer.param_groups[0]["lr"],
            "throughput_images_per_s": throughput,
        }
        if self.device.type == "cuda":
            record["gpu_peak_memory_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
            record["gpu_peak_reserved_gib"] = torch.cuda.max_memory_reserved(self.device) / 2**30
            self.clock.update(peak_allocated_gib=record["gpu_peak_memory_gib"])
            self.clock.update(peak_reserved_gib=record["gpu_peak_reserved_gib"])
        if self.monitor is not None and "end" in self.clock:  # GPU busy share etc., in the epoch
            record.update(self.monitor.means(self.clock["start"], self.clock["end"]))
        if len(self.val) and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            if self.world.main:
                result = validate(self.model, self.val, self.device, self.labels)
                record["val/dice"] = result.dice
                if result.threshold is not None:
                    record["val/threshold"] = result.threshold
            barrier()
        dice = record.get("val/dice")
        no_val_last = not len(self.val) and epoch == cfg.epochs
        if self.world.main and (no_val_last or (dice is not None and dice > self.best_dice)):
            self.best_dice = dice if dice is not None else float("nan")
            self.best_epoch = epoch
            self.best_threshold = record.get("val/threshold")
            state = self.model.state_dict()
            self.best_state = {k: v.detach().cpu().clone() for k, v in state.items()}
        (log.info if self.world.main else log.debug)(
            "epoch %d/%d loss %.4f val dice %s (%.1f images/s)", epoch, cfg.epochs,
            record["train/loss"], f"{dice:.4f}" if dice is not None else "-", throughput,
        )  # fmt: skip
        self.history.append((record, self.best()))
        self.epoch, self.step, self.losses = epoch, 0, []
        self.epoch_rng = dict(self.sampler.rng.bit_generator.state)
        return record

    def best(self) -> dict[str, float]:
        """The best epoch so far, for the metrics file (``best_val_dice`` with a val split)."""
        if not len(self.val) or self.best_epoch < 0:
            return {"best_epoch": self.best_epoch}
        return {"best_epoch": self.best_epoch, "best_val_dice": self.best_dice}

    # -- stopping, checking, saving -------------------------------------------------------------

    def _stop_requested(self) -> bool:
        if self.world.size == 1:
            return self.stop.requested is not None
        if self.step % STOP_CHECK_EVERY and self.step != self.steps:
            return False
        return any_process(self.stop.requested is not None, self.device)

    def _stopped(self) -> None:
        if self.world.main:
            self.checkpoints.wait()
        barrier()  # rank 0 has saved
        where = f"epoch {self.epoch + 1}, step {self.step}" if self.step else f"epoch {self.epoch}"
        saved = f"checkpoint saved to {self.ckpt}; " if self.ckpt is not None else ""
        raise MedsegError(
            f"train: stopped by {self.stop.requested or 'a signal'} after {where}; "
            f"{saved}run the same command (or `dvc repro`) again to resume"
        )

    def _check_losses(self) -> None:
        """Stop on the first non-finite loss of the epoch, naming it; keep the last checkpoint."""
        if not self.losses:
            return
        losses = torch.stack(self.losses).float().cpu()
        bad = (~torch.isfinite(losses)).nonzero()
        if not len(bad):
            return
        step = int(bad[0, 0]) + self.step - len(self.losses) + 1
        kept = (
            f"the last good checkpoint ({self.ckpt}) is kept"
            if self.ckpt is not None and self.ckpt.is_file()
            else "no checkpoint was written"
        )
        raise MedsegError(
            f"train: the loss became {float(losses[bad[0, 0]])} in epoch {self.epoch + 1}, step "
            f"{step} (iteration {self.epoch * self.steps + step} of the run); {kept}. "
            f"Lower train.lr (now {self.cfg.lr}), raise train.warmup_epochs or set train.grad_clip"
        )

    def state(self) -> dict[str, Any]:
        """Everything a checkpoint holds: the position, history, random states and weights."""
        return {
            "params_hash": self.hash,
            "epoch": self.epoch,
            "step": self.step,
            "losses": torch.stack(self.losses).float().cpu() if self.losses else torch.zeros(0),
            "history": self.history,
            "epoch_rng": self.epoch_rng,
            "rng": rng_state(self.sampler.rng),
            "model": self.model.state_dict(),
            "optimizer": self.parts.optimizer.state_dict(),
            "scheduler": self.parts.scheduler.state_dict(),
            "scaler": self.parts.scaler.state_dict(),
            "best_dice": self.best_dice,
            "best_epoch": self.best_epoch,
            "best_model": self.best_state,
            "best_threshold": self.best_threshold,
        }

    def _save_checkpoint(self, wait: bool = False) -> None:
        """Write a checkpoint (in the background on a GPU); ``wait``: until it is on disk."""
        if self.ckpt is not None and self.world.main:
            self.checkpoints.save(self.state())
            self.clock["checkpoint_s"] = self.checkpoints.blocked_s
            if wait:
                self.checkpoints.wait()

    def _log_clock(self) -> None:
        """One line per epoch for benchmarks (bench/gpu.sh): its wall-clock start and end
        (``time.time()``), the seconds spent drawing its plan and blocked by its checkpoint,
        the images trained, the end of the run's first step, peak GPU memory."""
        if self.world.main and self.clock:
            if self.first_step_at is not None:
                self.clock["first_step_end"] = self.first_step_at
            log.info("epoch clock %s", json.dumps(self.clock, sort_keys=True))

    def resume(self) -> None:
        """Continue from the checkpoint when there is one for these params, data and code."""
        if self.ckpt is None:
            return
        state = load_checkpoint(self.ckpt, self.hash)
        if state is None:
            return
        self.model.load_state_dict(state["model"])
        self.parts.optimizer.load_state_dict(state["optimizer"])
        self.parts.scheduler.load_state_dict(state["scheduler"])
        self.parts.scaler.load_state_dict(state["scaler"])
        self.epoch, self.step = state["epoch"], state["step"]
        self.losses = [t.to(self.device) for t in state["losses"]]
        self.history, self.epoch_rng = state["history"], state["epoch_rng"]
        self.best_dice, self.best_epoch = state["best_dice"], state["best_epoch"]
        self.best_state = state["best_model"]
        self.best_threshold = state["best_threshold"]
        restore_rng(state["rng"], self.sampler.rng)
        log.info(
            "resuming from %s: epoch %d, step %d of %d", self.ckpt, self.epoch + 1, self.step,
            self.steps,
        )  # fmt: skip

    def _write_models(self, models_dir: Path) -> None:
        """Write the bundle, with the post-processing chosen for the best weights."""
        last = self.model.state_dict()
        best = self.best_state if self.best_state is not None else last
        steps = choose_for_bundle(
            self.cfg.postprocess, self.spec, best, self.val, self.device, self.labels,
            self.best_threshold,
        )  # fmt: skip
        with atomic_dir(models_dir) as out:
            save_bundle(out, best, last, self.spec, self.data_dir, self.best_threshold, steps)


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
