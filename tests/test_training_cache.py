from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_store

from medseg.training.cache import DevicePatchSampler, DevicePlan
from medseg.training.data import Augmentation, PatchSampler

AFFINE = Augmentation(prob=1.0, rotate=30.0, scale=0.2, brightness=0.1, contrast=0.1, gamma=0.2)


def _mixed_cases(channels: int, n_labels: int) -> tuple[list, list, list]:
    """Cases of mixed sizes (one smaller than the patch), several labels, a round-ish FOV."""
    rng = np.random.default_rng(1)
    sizes = [(20, 90), (64, 64), (130, 41), (17, 23)]
    images = [rng.normal(size=(channels, h, w)).astype(np.float32) for h, w in sizes]
    masks = [rng.integers(0, n_labels, size=(h, w)).astype(np.uint8) for h, w in sizes]
    fovs = [(rng.random((h, w)) < 0.9).astype(np.uint8) for h, w in sizes]
    return images, masks, fovs


def _bits(t: torch.Tensor) -> np.ndarray:
    """The raw bytes of a float32 tensor (so -0.0 and 0.0 differ)."""
    return t.contiguous().numpy().view(np.uint32)


@pytest.mark.parametrize(
    ("channels", "n_labels", "aug"),
    [(1, 2, Augmentation()), (3, 3, AFFINE), (1, 2, Augmentation(dihedral=False))],
)
def test_device_crops_equal_host_crops_bit_for_bit(
    tmp_path: Path, channels: int, n_labels: int, aug: Augmentation
):
    """The same plan gives the same patches, bit for bit, with every turn and flip, margins
    for rotation, crops leaving the case, cases smaller than the patch, and process shares."""
    store = make_store(tmp_path / "s", *_mixed_cases(channels, n_labels), n_labels=n_labels)
    host = PatchSampler(store, 32, 0.5, np.random.default_rng(7), aug, n_labels)
    dev = DevicePatchSampler(store, 32, 0.5, np.random.default_rng(7), aug, n_labels, "cpu")
    plan, dplan = host.plan(6, 8), dev.plan(6, 8)
    assert isinstance(dplan, DevicePlan) and len(dplan) == 6
    assert np.array_equal(plan.top, dplan.top.numpy())  # the same generator, the same draws
    assert len(np.unique(plan.quarter_turns * 2 + plan.flip)) == (8 if aug.dihedral else 1)
    for step in range(6):
        for share in (slice(None), slice(0, 3), slice(3, 8)):
            a, b = host.crop(plan, step, share), dev.crop(dplan, step, share)
            for name in ("image", "mask", "fov", "theta", "brightness", "contrast", "gamma"):
                ta, tb = getattr(a, name), getattr(b, name)
                assert ta.shape == tb.shape and ta.dtype == tb.dtype, name
                assert np.array_equal(_bits(ta), _bits(tb)), (name, step, share)
    # and a host plan is accepted as well (uploaded on the way)
    assert torch.equal(dev.crop(plan, 1).image, host.crop(plan, 1).image)
    # padding really happened in this test: some crop pixels lie outside their case
    assert any((host.crop(plan, s).fov == 0).any() for s in range(6))


def test_device_sampler_augments_on_its_device(tmp_path: Path):
    store = make_store(tmp_path / "s", *_mixed_cases(1, 2))
    dev = DevicePatchSampler(store, 32, 0.5, np.random.default_rng(0), AFFINE, device="cpu")
    host = PatchSampler(store, 32, 0.5, np.random.default_rng(0), AFFINE)
    for a, b in zip(dev.sample(8), host.sample(8), strict=True):
        assert a.shape == (8, 1, 32, 32) and torch.equal(a, b)
    assert dev.images.shape == (1, sum(h * w for h, w in dev.sizes))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_crops_equal_host_crops(tmp_path: Path):
    store = make_store(tmp_path / "s", *_mixed_cases(3, 3), n_labels=3)
    host = PatchSampler(store, 32, 0.5, np.random.default_rng(3), AFFINE, 3)
    dev = DevicePatchSampler(store, 32, 0.5, np.random.default_rng(3), AFFINE, 3, "cuda")
    plan, dplan = host.plan(3, 8), dev.plan(3, 8)
    assert dplan.image.is_cuda
    for step in range(3):
        a, b = host.crop(plan, step), dev.crop(dplan, step)
        assert b.image.is_cuda and torch.equal(a.image, b.image.cpu())
        assert torch.equal(a.mask, b.mask.cpu()) and torch.equal(a.fov, b.fov.cpu())


def test_choose_cache_on_cpu(tmp_path: Path):
    from conftest import tiny_params, write_params

    from medseg.config import load_params
    from medseg.config.sections import TrainConfig
    from medseg.training.cache import choose_cache

    store = make_store(tmp_path / "d", *_mixed_cases(1, 2))
    cfg = load_params(write_params(tmp_path / "p.yaml", tiny_params()), TrainConfig)
    cpu = torch.device("cpu")
    # auto never picks the device on a CPU: a second copy in RAM would buy nothing
    assert choose_cache(dataclasses.replace(cfg, cache="auto"), store.folder, cpu) == "ram"
    for mode in ("device", "ram", "none"):
        assert choose_cache(dataclasses.replace(cfg, cache=mode), store.folder, cpu) == mode
