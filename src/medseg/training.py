"""The fit loop: patches from the cases (in RAM or memory-mapped), AdamW with warm-up and a
schedule, AMP, DDP, checkpoints.

One epoch, step by step:

1. The sampler draws the epoch's plan (every random choice) from its seeded generator; each
   process of a ``torchrun`` run draws the same plan and cuts its own share of each batch.
2. Each step: crop (in the main process, or in DataLoader workers), copy to the device, augment
   the batch there, forward under autocast, loss (summed over processes), backward, clip, step,
   schedule. Nothing waits for the GPU inside a step; losses stay on the device.
3. After the epoch: one look at the losses (a NaN or inf stops the run, naming the step),
   validation on whole images every ``val_every`` epochs, one dvclive step, a checkpoint.

A SIGTERM (spot preemption) or SIGINT finishes the current step, writes a checkpoint that
includes the position within the epoch, and exits non-zero; the next run with the same params and
data resumes from it and ends with the same weights and metrics as a run never interrupted. The
checkpoint is removed after a successful run: the weights are in the models folder then.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from dvclive import Live
from torch.nn.parallel import DistributedDataParallel
from tqdm import tqdm

from medseg.bundle import save_bundle
from medseg.checkpoint import (
    CHECKPOINT,
    StopSignals,
    load_checkpoint,
    mark_finished,
    params_hash,
    restore_rng,
    rng_state,
    save_checkpoint,
)
from medseg.config import EvaluateConfig, TrainConfig
from medseg.data import Augmentation, Batch, PatchSampler, Plan, augment
from medseg.distributed import (
    World,
    allsum,
    any_process,
    barrier,
    process_group,
    sync_batchnorm,
    world_from_env,
)
from medseg.errors import MedsegError
from medseg.inference import predict_case
from medseg.io.atomic import atomic_dir
from medseg.io.shards import CaseStore
from medseg.losses import make_loss
from medseg.metrics import class_confusion, confusion_matrix, scores
from medseg.model import ModelSpec, build_model, check_names, resolve_device
from medseg.preprocess import CLASSES, open_split, read_case, read_class_names

log = logging.getLogger(__name__)

STOP_CHECK_EVERY = 8  # steps between stop-signal checks across processes (a collective op)


def fit(
    cfg: TrainConfig,
    data_dir: str | Path,
    models_dir: str | Path,
    logs_dir: str | Path,
    checkpoint_dir: str | Path | None = None,
) -> dict:
    """Train a network on the ``train`` split in ``data_dir``, choosing the best epoch on ``val``.

    Writes ``models_dir/model.safetensors`` (best validation Dice; the last epoch when there is
    no validation split) and ``last.safetensors``, each with a ``.json`` spec, and per-epoch
    curves through dvclive into ``logs_dir``. With ``checkpoint_dir``, a checkpoint is written
    there after every epoch and on a stop signal, resumed when it matches, and removed at the end.
    Under ``torchrun`` only rank 0 writes.

    Returns:
        A summary: best epoch, best validation Dice, images per second of the last epoch.

    Raises:
        MedsegError: bad params or data, a non-finite loss, or a stop signal (after saving).
    """
    check_names(cfg.arch, cfg.encoder)
    world = world_from_env()
    device = _device(cfg, world)
    with process_group(world, device), _backend_flags(cfg, device), StopSignals() as stop:
        trainer = _Trainer(cfg, Path(data_dir), world, device, stop, checkpoint_dir)
        return trainer.run(Path(models_dir), Path(logs_dir))


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


class _Trainer:
    """The state of one training run; `run` is the whole of it."""

    def __init__(
        self,
        cfg: TrainConfig,
        data_dir: Path,
        world: World,
        device: torch.device,
        stop: StopSignals,
        checkpoint_dir: str | Path | None,
    ) -> None:
        self.cfg, self.world, self.device, self.stop = cfg, world, device, stop
        self.share = world.share(cfg.batch_size)
        self.data_dir = data_dir
        self.train = open_split(data_dir, "train", ram=_in_ram(cfg, data_dir, world.size))
        self.val = open_split(data_dir, "val")
        if len(self.train) == 0:
            raise MedsegError(f"{data_dir / 'train.json'}: no training cases")
        self.class_names = read_class_names(data_dir)
        _check_classes(cfg, self.class_names, data_dir)
        self.ckpt = Path(checkpoint_dir) / CHECKPOINT if checkpoint_dir is not None else None
        self.hash = params_hash(cfg, [*self.train.files(), *self.val.files()])
        torch.manual_seed(cfg.seed)
        aug = Augmentation.from_config(cfg)
        rng = np.random.default_rng(cfg.seed)
        self.sampler = PatchSampler(
            self.train, cfg.patch_size, cfg.foreground_fraction, rng, aug, len(self.class_names)
        )
        self.spec = ModelSpec.from_config(cfg, in_channels=self.sampler.channels)
        self.model = build_model(self.spec, cfg.encoder_weights)
        _check_input_size(self.model, self.spec, cfg.patch_size)
        if world.size > 1 and cfg.sync_batchnorm:
            self.model = sync_batchnorm(self.model, device)
        self.model.to(device)
        if cfg.channels_last:
            self.model.to(memory_format=torch.channels_last)
        net: torch.nn.Module = self.model
        if world.size > 1:
            ids = [device.index] if device.type == "cuda" else None
            net = DistributedDataParallel(self.model, device_ids=ids)
        self.net: torch.nn.Module = torch.compile(net) if cfg.compile else net  # type: ignore[assignment]
        self.steps = math.ceil(cfg.patches_per_epoch / cfg.batch_size)
        self.optimizer = _optimizer(cfg, self.model)
        total, warmup = cfg.epochs * self.steps, round(cfg.warmup_epochs * self.steps)
        min_ratio = cfg.min_lr / cfg.lr
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer,
            lambda s: lr_factor(s, total, warmup, cfg.schedule, min_ratio, cfg.poly_power),
        )
        self.amp_dtype = _amp_dtype(cfg, device)
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.amp_dtype == torch.float16)
        self.loss_fn = make_loss(
            cfg.loss, cfg.bce_weight, cfg.cldice_weight, cfg.cldice_iters, allsum
        )
        # the position and history of the run, all saved in a checkpoint
        self.epoch, self.step = 0, 0
        self.epoch_rng: dict[str, Any] = dict(rng.bit_generator.state)
        self.losses: list[torch.Tensor] = []
        # per epoch: the values logged, and the best epoch so far
        self.history: list[tuple[dict[str, float], dict[str, float]]] = []
        self.best_dice, self.best_epoch = -1.0, -1
        self.best_state: dict[str, torch.Tensor] | None = None

    # -- the run -------------------------------------------------------------------------------

    def run(self, models_dir: Path, logs_dir: Path) -> dict:
        cfg = self.cfg
        self._resume()
        with self._live(logs_dir) as live:
            throughput = 0.0
            while self.epoch < cfg.epochs:
                throughput = self._train_epoch()
                record = self._end_of_epoch(throughput)
                if live is not None:
                    _log(live, record, self._best())
                self._save_checkpoint()
                if any_process(self.stop.requested is not None, self.device):
                    self._stopped()
        if self.world.main:
            self._write_models(models_dir)
            if self.ckpt is not None:
                self.ckpt.unlink(missing_ok=True)
                mark_finished(self.ckpt.parent)
        barrier()
        return {
            "best_epoch": self.best_epoch,
            "best_val_dice": self.best_dice,
            "images_per_s": throughput,
        }

    def _train_epoch(self) -> float:
        """Train the rest of the current epoch; return its throughput in images per second."""
        cfg = self.cfg
        self.sampler.rng.bit_generator.state = self.epoch_rng
        plan = self.sampler.plan(self.steps, cfg.batch_size)
        self.net.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        start, first = time.perf_counter(), self.step
        bar = tqdm(
            self._batches(plan, first), total=self.steps, initial=first,
            desc=f"epoch {self.epoch + 1}/{cfg.epochs}", leave=False,
            disable=None if self.world.main else True,
        )  # fmt: skip
        for batch in bar:
            loss = self._train_step(batch)
            self.losses.append(loss.detach())
            self.step += 1
            if self.step % 10 == 0 and not bar.disable:  # .item() waits for the GPU
                value = loss.item()
                bar.set_postfix(loss=f"{value:.4f}")
                if not math.isfinite(value) and self.world.size == 1:  # under DDP every rank
                    self._check_losses()  # checks at the end of the epoch, together
            if self._stop_requested() and self.step < self.steps:
                bar.close()
                self._check_losses()
                self._save_checkpoint()
                self._stopped()
        bar.close()
        self._check_losses()
        return (self.step - first) * cfg.batch_size / (time.perf_counter() - start)

    def _train_step(self, batch: Batch) -> torch.Tensor:
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

    def _batches(self, plan: Plan, first: int) -> Iterable[Batch]:
        """The batches of steps ``first..`` of ``plan``: cut here, or in DataLoader workers."""
        if self.cfg.workers == 0:
            return (self.sampler.crop(plan, s, self.share) for s in range(first, len(plan)))
        return torch.utils.data.DataLoader(
            _Steps(self.sampler, plan, first, self.share),
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
        if len(self.val) and (epoch % cfg.val_every == 0 or epoch == cfg.epochs):
            if self.world.main:
                record["val/dice"] = validate(self.model, self.val, self.device)
            barrier()
        dice = record.get("val/dice")
        no_val_last = not len(self.val) and epoch == cfg.epochs
        if self.world.main and (no_val_last or (dice is not None and dice > self.best_dice)):
            self.best_dice = dice if dice is not None else float("nan")
            self.best_epoch = epoch
            state = self.model.state_dict()
            self.best_state = {k: v.detach().cpu().clone() for k, v in state.items()}
        (log.info if self.world.main else log.debug)(
            "epoch %d/%d loss %.4f val dice %s (%.1f images/s)", epoch, cfg.epochs,
            record["train/loss"], f"{dice:.4f}" if dice is not None else "-", throughput,
        )  # fmt: skip
        self.history.append((record, self._best()))
        self.epoch, self.step, self.losses = epoch, 0, []
        self.epoch_rng = dict(self.sampler.rng.bit_generator.state)
        return record

    def _best(self) -> dict[str, float]:
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

    def _state(self) -> dict[str, Any]:
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
        }

    def _save_checkpoint(self) -> None:
        if self.ckpt is not None and self.world.main:
            save_checkpoint(self.ckpt, self._state())

    def _resume(self) -> None:
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
        restore_rng(state["rng"], self.sampler.rng)
        log.info(
            "resuming from %s: epoch %d, step %d of %d", self.ckpt, self.epoch + 1, self.step,
            self.steps,
        )  # fmt: skip

    @contextlib.contextmanager
    def _live(self, logs_dir: Path) -> Iterator[Live | None]:
        """dvclive on rank 0, with the epochs of a resumed run logged again first."""
        if not self.world.main:
            yield None
            return
        with Live(dir=str(logs_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live:
            for record, best in self.history:
                _log(live, record, best)
            yield live

    def _write_models(self, models_dir: Path) -> None:
        last = self.model.state_dict()
        best = self.best_state if self.best_state is not None else last
        with atomic_dir(models_dir) as out:
            save_bundle(out, best, last, self.spec, self.data_dir)


class _Steps(torch.utils.data.Dataset):
    """Steps of an epoch's plan as a map-style dataset, for DataLoader workers."""

    def __init__(self, sampler: PatchSampler, plan: Plan, first: int, share: slice) -> None:
        self.sampler, self.plan, self.first, self.share = sampler, plan, first, share

    def __len__(self) -> int:
        return len(self.plan) - self.first

    def __getitem__(self, i: int) -> Batch:
        return self.sampler.crop(self.plan, self.first + i, self.share)


# Validation scores whole cases as evaluate does, at its default settings and threshold 0.5.
VALIDATION = EvaluateConfig(
    threshold=0.5, window=1024, overlap=0.25, blending="gaussian", tta=False, batch_size=4,
    device="auto",
)  # fmt: skip


def validate(model: torch.nn.Module, val: CaseStore, device: torch.device) -> float:
    """Dice inside the FOV, pooled over the whole validation cases (at the ground truth's
    resolution), through `medseg.inference.predict_case`; for several classes the mean over
    the foreground classes.

    Args:
        model: the network, (B, C, H, W) -> (B, K, H, W) logits; K = 1 is binary.
    """
    model.eval()
    totals: np.ndarray | None = None
    for i in val:
        case = read_case(val, i)
        labels, probs = predict_case(
            model, case.image, case.fov, VALIDATION, device, out_fov=case.truth_fov
        )
        n = max(probs.shape[0], 2)
        m = confusion_matrix(labels, case.truth, n, case.truth_fov)
        totals = m if totals is None else totals + m
        val.release(i)
    assert totals is not None
    dice = [scores(class_confusion(totals, k))["dice"] for k in range(1, len(totals))]
    return float(np.mean(dice))


# Curves only: they measure the machine, not the model, and would show as a change in every
# `dvc metrics diff` (the metrics file keeps what the same params and data always reproduce).
MACHINE_CURVES = ("throughput_images_per_s", "gpu_peak_memory_gib")


def _log(live: Live, record: dict[str, float], best: dict[str, float]) -> None:
    for key, value in record.items():
        live.log_metric(key, value)
    for key in MACHINE_CURVES:
        live.summary.pop(key, None)
    live.summary.update(best)
    live.next_step()


def _optimizer(cfg: TrainConfig, model: torch.nn.Module) -> torch.optim.Optimizer:
    """Adam or AdamW; no weight decay on biases and normalisation weights (1-D parameters).

    Build it after the model is on its device.
    """
    decay = [p for p in model.parameters() if p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.ndim <= 1]
    groups = [
        {"params": decay, "weight_decay": cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    cls: Callable[..., torch.optim.Optimizer] = (
        torch.optim.AdamW if cfg.optimizer == "adamw" else torch.optim.Adam
    )
    # fused kernels on CUDA: one launch for all parameters
    return cls(groups, lr=cfg.lr, fused=next(model.parameters()).is_cuda or None)


def _check_classes(cfg: TrainConfig, names: list[str], data_dir: Path) -> None:
    """``train.classes`` must fit the labels the data has (``classes.json``)."""
    n = len(names)
    if cfg.classes == n or (n == 2 and cfg.classes == 1):
        return
    want = "1 (sigmoid) or 2 (softmax)" if n == 2 else str(n)
    raise MedsegError(
        f"params: train.classes is {cfg.classes} but the data ({data_dir / CLASSES}) has {n} "
        f"labels ({', '.join(names)}); set train.classes to {want}"
    )


# train.cache auto: the training cases are read into RAM when they take at most this share of
# the memory available now (and at most RAM_CACHE_MAX bytes); else they stay memory-mapped.
RAM_CACHE_SHARE = 0.25
RAM_CACHE_MAX = 1 << 30


def _in_ram(cfg: TrainConfig, data_dir: Path, processes: int = 1) -> bool:
    """Whether ``train.cache`` keeps the training split in RAM (the result is the same either
    way; only speed and memory differ). Each of the ``processes`` of a distributed run holds
    its own copy, so they share the budget (counted as if all ran on one machine)."""
    if cfg.cache != "auto":
        return cfg.cache == "ram"
    size = open_split(data_dir, "train").nbytes() * processes
    return size <= min(RAM_CACHE_SHARE * _available_memory(), RAM_CACHE_MAX)


def _available_memory() -> int:
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


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


def _device(cfg: TrainConfig, world: World) -> torch.device:
    device = resolve_device(cfg.device)
    if device.type == "cuda":
        device = torch.device("cuda", world.local_rank)
        torch.cuda.set_device(device)
    return device


@contextlib.contextmanager
def _backend_flags(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
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


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision: on CUDA bf16 where the GPU has it, else fp16 with a grad scaler; on CPU
    bf16 when ``train.amp_cpu`` asks for it."""
    if device.type == "cpu":
        return torch.bfloat16 if cfg.amp_cpu else None
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
