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

import contextlib
import dataclasses
import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medseg.config import TrainConfig
from medseg.errors import MedsegError
from medseg.inference.bundle import save_bundle
from medseg.io.atomic import atomic_dir
from medseg.labels import LabelSpace
from medseg.model import build_model, check_names
from medseg.names import CLASSES
from medseg.preprocess.processed import open_split, read_class_names
from medseg.spec import ModelSpec
from medseg.training.cache import DevicePlan, choose_cache, make_sampler
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
from medseg.training.data import Batch, PatchSampler, Plan, augment
from medseg.training.distributed import (
    World,
    allsum,
    any_process,
    barrier,
    process_group,
    sync_batchnorm,
    world_from_env,
)
from medseg.training.losses import loss_from_config
from medseg.training.monitor import GpuMonitor
from medseg.training.optim import build_optimizer, build_schedule
from medseg.training.postchoice import choose_for_bundle
from medseg.training.precision import amp_dtype, backend_flags, train_device
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
    spec, and per-epoch
    curves (dvclive, when installed) into ``logs_dir``. With ``checkpoint_dir``, a checkpoint is
    written there after every epoch and on a stop signal, resumed when it matches, and removed
    at the end. Under ``torchrun`` only rank 0 writes. ``callbacks`` run after the curves'.

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
        trainer = Trainer(
            cfg, data_dir, world=world, device=device, stop=stop, checkpoint_dir=checkpoint_dir,
            callbacks=[*hooks, *callbacks],
        )  # fmt: skip
        return trainer.run(models_dir)


class Trainer:
    """One training run, built by name from the ``train.*`` params; `run` is the whole of it.

    The parts are public so that benchmarks and extensions use them as the run does: the patch
    ``sampler`` (host or device, `medseg.training.cache`), the ``model`` and the ``net`` that
    trains it (DDP- and compile-wrapped), the ``optimizer``, ``scheduler`` and ``loss_fn``;
    `plan_epoch`, `batches` and `train_step` are one epoch's pieces, and ``callbacks`` see
    every step and epoch (`medseg.training.callbacks.Callback`).

    Args:
        cfg: the ``train`` params.
        data_dir: the preprocess stage's output.
        world: the processes of a distributed run (default: this one alone).
        device: default from ``train.device``.
        stop: the stop-signal flags (default: none ever arrives).
        checkpoint_dir: where the resume checkpoint goes (default: no checkpoints).
        callbacks: hooks called in order.
    """

    def __init__(
        self,
        cfg: TrainConfig,
        data_dir: str | Path,
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
        self.data_dir = data_dir = Path(data_dir)
        self.cache = choose_cache(cfg, data_dir, self.device, self.world.size)
        self.train = open_split(data_dir, "train", ram=self.cache == "ram")
        self.val = open_split(data_dir, "val")
        if len(self.train) == 0:
            raise MedsegError(f"{data_dir / 'train.json'}: no training cases")
        self.class_names = read_class_names(data_dir)
        self.cfg = cfg = _with_classes(cfg, self.class_names, data_dir)
        self.labels = LabelSpace.of(cfg.classes, self.class_names)
        self.ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
        # on a GPU the checkpoint is written in the background (a host copy first: still exact)
        self.checkpoints = CheckpointWriter(self.ckpt or CHECKPOINT, self.device.type != "cpu")
        self.hash = params_hash(cfg, [*self.train.files(), *self.val.files()])
        torch.manual_seed(cfg.seed)
        rng = np.random.default_rng(cfg.seed)
        on_device = self.device if self.cache == "device" else None
        self.sampler = make_sampler(self.train, cfg, rng, len(self.class_names), on_device)
        self.spec = ModelSpec.from_config(cfg, in_channels=self.sampler.channels)
        self.model = build_model(self.spec, cfg.encoder_weights)
        self.net = self._wrap_model()
        self.steps = math.ceil(cfg.patches_per_epoch / cfg.batch_size)
        self.optimizer = build_optimizer(cfg, self.model)
        self.scheduler = build_schedule(cfg, self.optimizer, self.steps)
        self.amp_dtype = amp_dtype(cfg, self.device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = loss_from_config(cfg, allsum)
        # the position and history of the run, all saved in a checkpoint
        self.epoch, self.step = 0, 0
        self.epoch_rng: dict[str, Any] = dict(rng.bit_generator.state)
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

    def _wrap_model(self) -> torch.nn.Module:
        """Check the patch size, move the model to the device (SyncBN, channels-last), and
        return the module that trains it: DDP under torchrun, compiled with ``train.compile``."""
        cfg, device = self.cfg, self.device
        _check_input_size(self.model, self.spec, cfg.patch_size)
        if self.world.size > 1 and cfg.sync_batchnorm:
            self.model = sync_batchnorm(self.model, device)
        self.model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        net: torch.nn.Module = self.model
        if self.world.size > 1:
            ids = [device.index] if device.type == "cuda" else None
            net = DistributedDataParallel(self.model, device_ids=ids)
        return torch.compile(net) if cfg.compile else net  # type: ignore[return-value]

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
        self.net.train()
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
        forward under autocast, loss (summed over processes), backward, clip, step, schedule.

        Returns:
            The loss, a scalar tensor on the device (not detached).
        """
        cfg = self.cfg
        x, y, v = augment(
            batch.to(self.device, non_blocking=True), cfg.patch_size, self.sampler.aug,
            self.sampler.multiclass,
        )  # fmt: skip
        if cfg.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        autocast = (
            torch.autocast(self.device.type, dtype=self.amp_dtype)
            if self.amp_dtype
            else contextlib.nullcontext()
        )
        with autocast:
            logits = self.net(x)
        loss = self.loss_fn(logits, y, v)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.scheduler.step()
        return loss

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
            "lr": self.optimizer.param_groups[0]["lr"],
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
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
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
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
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


class StepBatches(torch.utils.data.Dataset):
    """Steps of an epoch's plan as a map-style dataset, for DataLoader workers."""

    def __init__(self, sampler: PatchSampler, plan: Plan, first: int, share: slice) -> None:
        self.sampler, self.plan, self.first, self.share = sampler, plan, first, share

    def __len__(self) -> int:
        return len(self.plan) - self.first

    def __getitem__(self, i: int) -> Batch:
        return self.sampler.crop(self.plan, self.first + i, self.share)


def _with_classes(cfg: TrainConfig, names: list[str], data_dir: Path) -> TrainConfig:
    """``train.classes`` must fit the labels the data has (``classes.json``). The default 1
    (binary) on data whose classes are named (``data.classes``, a DICOM SEG's segments, an
    nnU-Net ``dataset.json``) becomes their number, so named classes need no second param."""
    n = len(names)
    if cfg.classes == n or (n == 2 and cfg.classes == 1):
        return cfg
    if cfg.classes == 1:
        log.info("train.classes: %d, the labels of %s", n, data_dir / CLASSES)
        return dataclasses.replace(cfg, classes=n)
    want = "1 (sigmoid) or 2 (softmax)" if n == 2 else str(n)
    raise MedsegError(
        f"params: train.classes is {cfg.classes} but the data ({data_dir / CLASSES}) has {n} "
        f"labels ({', '.join(names)}); set train.classes to {want}"
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


def _synchronize(device: torch.device) -> None:
    """Wait for the work queued on ``device`` (CUDA and MPS run asynchronously)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()
