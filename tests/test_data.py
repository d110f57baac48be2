from __future__ import annotations

import numpy as np

from medseg.data import PatchSampler, augment
from medseg.preprocess import SplitArrays


def _split(n: int = 3, size: int = 64) -> SplitArrays:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 30:34, :] = 1  # a horizontal "vessel"
    fov = np.ones((n, size, size), np.uint8)
    return SplitArrays(images, masks, fov, np.full((n, 2), size), np.array(["a", "b", "c"][:n]))


def test_all_eight_dihedral_transforms_are_distinct():
    a = np.arange(9).reshape(3, 3)
    results = {augment(a, k, f).tobytes() for k in range(4) for f in (False, True)}
    assert len(results) == 8


def test_patches_shapes_and_pairing():
    data = _split()
    # an image identical to its mask shows that both get the same crop, rotation and flip
    data = SplitArrays(data.masks[:, None].astype(np.float32), *list(data.__dict__.values())[1:])
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0))
    x, y, v = sampler.sample(16)
    assert x.shape == y.shape == v.shape == (16, 1, 32, 32)
    assert np.array_equal(x.numpy(), y.numpy())
    # and rotations happen: vertical as well as horizontal vessels
    assert any((p.sum(axis=0) > 0).all() for p in y[:, 0].numpy())
    assert any((p.sum(axis=1) > 0).all() for p in y[:, 0].numpy())


def test_foreground_fraction_and_seeding():
    data = _split()
    fg = PatchSampler(data, 32, 1.0, np.random.default_rng(0)).sample(32)[1]
    assert all(p.any() for p in fg)
    a = PatchSampler(data, 32, 0.5, np.random.default_rng(7)).sample(8)[0]
    b = PatchSampler(data, 32, 0.5, np.random.default_rng(7)).sample(8)[0]
    assert np.array_equal(a.numpy(), b.numpy())


def test_images_smaller_than_patch_are_padded():
    data = _split(size=20)
    x, _, v = PatchSampler(data, 32, 0.5, np.random.default_rng(0)).sample(4)
    assert x.shape == (4, 1, 32, 32)
    assert v.sum() == 4 * 20 * 20  # only the real pixels count
