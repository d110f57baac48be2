"""The few-second check bench/gpu.sh runs before it trains: versions, then two CUDA facts.

1. The versions (and files) of python, torch, timm, huggingface_hub, numpy and
   segmentation-models-pytorch, so the table says what ran (the wheels gpu.sh unpacked must win).
2. Patches cut on the device (``train.cache: device``) equal those cut on the host for one plan
   of the run's sampler over the real training split, bit for bit.
3. One forward and backward pass of the run's network under bf16 autocast (fp16 where the GPU
   lacks bf16) gives finite outputs, loss and gradients.

Needs no pydicom, dvc or dvclive. Exits 1 (naming what failed) when a check fails.

    python bench/gpu_selfcheck.py --params P --data PROCESSED [--device cuda]
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import sys
import time

import numpy as np
import torch
from harness import machine

from medseg.config import load_params
from medseg.config.sections import TrainConfig
from medseg.model import build_model, resolve_device
from medseg.preprocess.processed import open_split, read_class_names
from medseg.spec import ModelSpec
from medseg.training.cache import make_sampler
from medseg.training.precision import amp_dtype

PACKAGES = ("torch", "timm", "huggingface_hub", "numpy", "segmentation_models_pytorch", "edt")


def versions() -> None:
    print(machine())
    print(f"python {sys.version.split()[0]} ({sys.executable})")
    for name in PACKAGES:
        try:
            module = importlib.import_module(name)
        except Exception as err:  # the table must say what is missing, not stop here
            print(f"{name}: NOT IMPORTABLE ({type(err).__name__}: {err})")
            continue
        print(f"{name} {getattr(module, '__version__', '?')} ({module.__file__})")
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name()
        print(f"cuda {torch.version.cuda}, {name}, bf16 {torch.cuda.is_bf16_supported()}")


def crops_match(cfg: TrainConfig, data: str, device: torch.device) -> bool:
    """Device crops equal host crops for one plan (4 steps of 16, the run's augmentation)."""
    store = open_split(data, "train")
    n_labels = len(read_class_names(data))
    host = make_sampler(store, cfg, np.random.default_rng(1), n_labels)
    dev = make_sampler(store, cfg, np.random.default_rng(1), n_labels, device)
    plan, dplan = host.plan(4, 16), dev.plan(4, 16)
    for step in range(4):
        a, b = host.crop(plan, step), dev.crop(dplan, step)
        for field in dataclasses.fields(a):
            x, y = getattr(a, field.name), getattr(b, field.name)
            if y.device.type != device.type or not torch.equal(x, y.cpu()):
                print(f"FAIL: step {step}: {field.name} cut on {device} differs from the host's")
                return False
    return True


def forward_backward_finite(cfg: TrainConfig, device: torch.device, channels: int) -> bool:
    """One training step's arithmetic under the run's autocast: finite output and gradients."""
    torch.manual_seed(0)
    model = build_model(ModelSpec.from_config(cfg, in_channels=channels), None).to(device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    x = torch.randn(8, channels, cfg.patch_size, cfg.patch_size, device=device)
    dtype = amp_dtype(cfg, device) or torch.float32
    with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
        logits = model(x)
    loss = logits.float().square().mean()
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    ok = bool(torch.isfinite(logits).all()) and bool(torch.isfinite(loss))
    ok = ok and bool(grads) and all(bool(torch.isfinite(g).all()) for g in grads)
    print(
        f"forward/backward in {str(dtype).removeprefix('torch.')}: loss {float(loss.detach()):.4g}"
    )
    if not ok:
        print("FAIL: non-finite output, loss or gradient")
    return ok


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--params", required=True)
    parser.add_argument("--plan", default=None, help="the plan of its auto params")
    parser.add_argument("--data", required=True, help="the preprocess stage's output")
    parser.add_argument("--device", default=None, help="default: the params' train.device")
    args = parser.parse_args()
    start = time.perf_counter()
    versions()
    cfg = load_params(args.params, TrainConfig, args.plan)
    device = resolve_device(args.device or cfg.device)
    channels = int(open_split(args.data, "train").get(0, "image").shape[0])
    ok = crops_match(cfg, args.data, device)
    print(f"device crops equal host crops on {device}: {ok}")
    ok = forward_backward_finite(cfg, device, channels) and ok
    print(f"self-check {'passed' if ok else 'FAILED'} in {time.perf_counter() - start:.1f} s")
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
