from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import tiny_params, write_params

from medseg.errors import MedsegError
from medseg.model import build_model, resolve_device
from medseg.names import ARCHS
from medseg.spec import ModelSpec

SPEC = ModelSpec("unet", "resnet18", [32, 16, 16, 8, 8], in_channels=1, classes=1)


def test_build_forward_shape():
    model = build_model(SPEC).eval()
    with torch.no_grad():
        out = model(torch.zeros(2, 1, 64, 96))
    assert out.shape == (2, 1, 64, 96)


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        (ModelSpec("unet", "resnet19", [8] * 5, 1, 1), "train.encoder 'resnet19' is not"),
        (ModelSpec("mask-rcnn", "resnet18", [8] * 5, 1, 1), "train.arch 'mask-rcnn' is unknown"),
    ],
)
def test_bad_names_are_user_errors(spec: ModelSpec, message: str):
    with pytest.raises(MedsegError, match=message):
        build_model(spec)


def test_device_resolution():
    assert resolve_device("cpu").type == "cpu"
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    if not torch.cuda.is_available():
        with pytest.raises(MedsegError, match="no CUDA GPU"):
            resolve_device("cuda")


def test_auto_finds_apple_mps_when_it_is_available(monkeypatch: pytest.MonkeyPatch, tmp_path: Path):
    """Availability faked: MPS is untested on real hardware (docs/gpu.md)."""
    from medseg.config import load_params
    from medseg.config.sections import TrainConfig
    from medseg.training.distributed import World
    from medseg.training.precision import train_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: True)
    assert resolve_device("auto") == torch.device("mps")
    assert resolve_device("mps") == torch.device("mps")
    cfg = load_params(write_params(tmp_path / "p.yaml", tiny_params()), TrainConfig)
    assert train_device(replace(cfg, device="mps"), World()) == torch.device("mps")
    assert train_device(replace(cfg, device="auto"), World()) == torch.device("mps")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto").type == "cuda"  # CUDA first where both are present
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == torch.device("cpu")
    with pytest.raises(MedsegError, match="no Apple MPS device"):
        resolve_device("mps")


def test_the_torch_free_list_of_architectures_is_the_registry():
    from medseg import model

    assert tuple(model._ARCHS) == ARCHS  # a saved spec is checked against ARCHS without torch


@pytest.mark.parametrize("arch", ARCHS)
def test_every_architecture_builds_binary_and_multiclass(arch: str):
    # 128 pixels: PAN's pyramid pooling needs at least that; 32-wide decoders for FPN's GroupNorm
    spec = ModelSpec(arch, "resnet18", [32, 32, 16, 16, 8], in_channels=1, classes=3)
    model = build_model(spec).eval()
    with torch.no_grad():
        out = model(torch.zeros(1, 1, 128, 128))
    assert out.shape == (1, 3, 128, 128)


def test_decoder_channels_that_do_not_fit_are_a_user_error():
    with pytest.raises(MedsegError, match=r"cannot build fpn .* decoder_channels"):
        build_model(ModelSpec("fpn", "resnet18", [24, 16, 16, 8, 8], 1, 1))


def test_pretrained_weights_offline_are_a_clear_error(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TORCH_HOME", "/nonexistent-medseg-test")
    with pytest.raises(MedsegError, match=r"encoder_weights 'imagenet'.*use null"):
        build_model(SPEC, "imagenet")
