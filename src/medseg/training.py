"""The fit loop: patches from memory, BCE + Dice, Adam, AMP on CUDA, best weights by val Dice."""

from __future__ import annotations

import logging
import math
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from dvclive import Live
from tqdm import tqdm

from medseg.config import TrainConfig
from medseg.data import PatchSampler
from medseg.errors import MedsegError
from medseg.inference import predict_probs
from medseg.io.atomic import atomic_dir
from medseg.losses import bce_dice_loss
from medseg.metrics import confusion, scores
from medseg.model import ModelSpec, build_model, check_names, resolve_device, save_model
from medseg.preprocess import SplitArrays, load_split

log = logging.getLogger(__name__)

BEST = "model.safetensors"
LAST = "last.safetensors"


def fit(
    cfg: TrainConfig, data_dir: str | Path, models_dir: str | Path, logs_dir: str | Path
) -> dict:
    """Train a network on ``data_dir/train.npz``, choosing the best epoch on ``val.npz``.

    Writes ``models_dir/model.safetensors`` (best validation Dice; the last epoch when there is
    no validation split) and ``last.safetensors``, each with a ``.json`` spec, and per-epoch
    curves through dvclive into ``logs_dir``.

    Returns:
        A summary: best epoch, best validation Dice, images per second.
    """
    data_dir = Path(data_dir)
    check_names(cfg.arch, cfg.encoder)
    device = resolve_device(cfg.device)
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)

    train = load_split(data_dir / "train.npz")
    val = load_split(data_dir / "val.npz")
    if len(train) == 0:
        raise MedsegError(f"{data_dir / 'train.npz'}: no training cases")
    spec = ModelSpec.from_config(cfg, in_channels=train.images.shape[1])
    model = build_model(spec, cfg.encoder_weights).to(device)
    model = model.to(memory_format=torch.channels_last)
    optimizer = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    amp_dtype = _amp_dtype(cfg, device)
    scaler = torch.amp.GradScaler("cuda", enabled=amp_dtype == torch.float16)
    sampler = PatchSampler(train, cfg.patch_size, cfg.foreground_fraction, rng)
    steps = math.ceil(cfg.patches_per_epoch / cfg.batch_size)

    best_dice, best_epoch, throughput = -1.0, -1, 0.0
    with (
        atomic_dir(models_dir) as out,
        Live(dir=str(logs_dir), save_dvc_exp=False, dvcyaml=None, report=None) as live,
    ):
        for epoch in range(cfg.epochs):
            model.train()
            start, losses = time.perf_counter(), []
            bar = tqdm(
                range(steps), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, disable=None
            )
            for step in bar:
                x, y, v = (t.to(device, non_blocking=True) for t in sampler.sample(cfg.batch_size))
                x = x.contiguous(memory_format=torch.channels_last)
                autocast = (
                    torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else nullcontext()
                )
                with autocast:
                    logits = model(x)
                loss = bce_dice_loss(logits, y, v, cfg.bce_weight)
                optimizer.zero_grad(set_to_none=True)
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
                losses.append(loss.detach())
                if step % 10 == 0 and not bar.disable:  # .item() waits for the GPU
                    bar.set_postfix(loss=f"{loss.item():.4f}")
            mean_loss = float(torch.stack(losses).mean())
            if not math.isfinite(mean_loss):
                raise MedsegError(
                    f"train: loss became {mean_loss} in epoch {epoch + 1}; lower train.lr"
                )
            throughput = steps * cfg.batch_size / (time.perf_counter() - start)
            val_dice = validate(model, val, device) if len(val) else float("nan")
            live.log_metric("train/loss", mean_loss)
            live.log_metric("val/dice", val_dice)
            live.log_metric("lr", optimizer.param_groups[0]["lr"])
            live.log_metric("throughput_images_per_s", throughput)
            if device.type == "cuda":
                live.log_metric("gpu_peak_memory_gib", torch.cuda.max_memory_allocated() / 2**30)
            live.next_step()
            log.info(
                "epoch %d/%d loss %.4f val dice %.4f (%.1f patches/s)",
                epoch + 1, cfg.epochs, mean_loss, val_dice, throughput,
            )  # fmt: skip
            if not len(val) or val_dice > best_dice:
                best_dice, best_epoch = val_dice, epoch + 1
                save_model(model, spec, out / BEST)
        save_model(model, spec, out / LAST)
    return {"best_epoch": best_epoch, "best_val_dice": best_dice, "images_per_s": throughput}


def validate(model: torch.nn.Module, val: SplitArrays, device: torch.device) -> float:
    """Dice inside the FOV, pooled over the whole validation images, at threshold 0.5."""
    model.eval()
    total = None
    for _, image, truth, inside in val.cases():
        prob = predict_probs(model, image, window=512, device=device)
        c = confusion(prob >= 0.5, truth, inside)
        total = c if total is None else total + c
    assert total is not None
    return scores(total)["dice"]


def _amp_dtype(cfg: TrainConfig, device: torch.device) -> torch.dtype | None:
    """Mixed precision on CUDA only: bf16 where the GPU has it, else fp16 with a grad scaler."""
    if not cfg.amp or device.type != "cuda":
        return None
    return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
