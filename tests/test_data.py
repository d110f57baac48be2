from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from medseg.data import Augmentation, PatchSampler, augment_dihedral
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
    results = {augment_dihedral(a, k, f).tobytes() for k in range(4) for f in (False, True)}
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


AFFINE = Augmentation(prob=1.0, rotate=30.0, scale=0.2)


def _mask_as_image(n: int = 3, size: int = 64) -> SplitArrays:
    """An image identical to its mask, so that any mismatch of the two shows."""
    data = _split(n, size)
    return SplitArrays(data.masks[:, None].astype(np.float32), *list(data.__dict__.values())[1:])


def test_context_holds_every_rotated_and_zoomed_patch():
    assert Augmentation().context(32) == 32
    side = AFFINE.context(32)
    need = 32 / 0.8 * (math.cos(math.radians(30)) + math.sin(math.radians(30)))
    assert side >= need and (side - 32) % 2 == 0


def test_affine_augmentation_moves_image_mask_and_fov_together():
    data = _mask_as_image()
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), AFFINE)
    x, y, v = sampler.sample(16)
    assert x.shape == y.shape == v.shape == (16, 1, 32, 32)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0} and set(torch.unique(v).tolist()) <= {
        0.0, 1.0,
    }  # fmt: skip
    # the mask is the image resampled the same way and cut at 0.5
    assert torch.equal((x > 0.5).float(), y)
    # rotations by other than 90 degrees happen: some vessel edges are oblique
    rows_partly_on = ((y[:, 0].sum(-1) > 0) & (y[:, 0].sum(-1) < 32)).sum()
    assert rows_partly_on > 0


def test_no_affine_is_an_exact_crop():
    """With rotation and zoom off, the patches are plain crops: values unchanged."""
    data = _split()
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), Augmentation(dihedral=False))
    plan = sampler.plan(1, 4)
    x, _, _ = sampler.augment(sampler.crop(plan, 0))
    for b in range(4):
        i, t, left = plan.image[0, b], plan.top[0, b], plan.left[0, b]
        assert np.array_equal(x[b, 0].numpy(), data.images[i, 0, t : t + 32, left : left + 32])


def test_identity_affine_reproduces_the_crop():
    """grid_sample with rotation 0 and zoom 1 lands on pixel centres: the crop, unchanged."""
    data = _split()
    aug = Augmentation(dihedral=False, prob=1.0, rotate=10.0)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), aug)
    plan = sampler.plan(1, 2)
    batch = sampler.crop(plan, 0)
    batch.theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).repeat(2, 1, 1) * 32 / sampler.context
    x, _, _ = sampler.augment(batch)
    for b in range(2):
        i, t, left = plan.image[0, b], plan.top[0, b], plan.left[0, b]
        ref = data.images[i, 0, t : t + 32, left : left + 32]
        np.testing.assert_allclose(x[b, 0].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_fov_is_zero_where_a_rotated_patch_leaves_the_image():
    data = _split(size=40)  # FOV everywhere, but patches of 32 rotated near the border see outside
    sampler = PatchSampler(data, 32, 0.0, np.random.default_rng(1), AFFINE)
    _, _, v = sampler.sample(32)
    assert (v == 0).any() and (v == 1).any()


def test_intensity_changes_stay_inside_the_fov():
    data = _split()
    data.fov[:, :, :10] = 0
    data.images[:, :, :, :10] = 0
    aug = Augmentation(dihedral=False, prob=1.0, brightness=0.5, contrast=0.5, gamma=0.5)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), aug)
    plan = sampler.plan(1, 8)
    batch = sampler.crop(plan, 0)
    x, _, v = sampler.augment(batch)
    assert (x[v == 0] == 0).all()
    assert not torch.equal(x, batch.image * batch.fov)


def test_brightness_and_contrast_by_hand():
    data = _split()
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), Augmentation(prob=1.0))
    batch = sampler.crop(sampler.plan(1, 2), 0)
    batch.contrast = torch.tensor([2.0, 1.0])
    batch.brightness = torch.tensor([0.0, -0.5])
    batch.gamma = torch.tensor([1.0, 1.0])
    aug = Augmentation(prob=1.0, brightness=0.5, contrast=0.5)
    from medseg.data import augment

    x, _, _ = augment(batch, 32, aug)
    torch.testing.assert_close(x[0], batch.image[0] * 2.0)
    torch.testing.assert_close(x[1], batch.image[1] - 0.5)


def test_gamma_keeps_the_range_inside_the_fov():
    data = _split()
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), Augmentation(prob=1.0))
    batch = sampler.crop(sampler.plan(1, 1), 0)
    batch.gamma = torch.tensor([1.5])
    from medseg.data import augment

    x, _, _ = augment(batch, 32, Augmentation(prob=1.0, gamma=0.5))
    before = batch.image
    assert x.min() == pytest.approx(before.min().item(), abs=1e-5)
    assert x.max() == pytest.approx(before.max().item(), abs=1e-5)
    # a gamma above 1 darkens the middle of the range
    lo, hi = before.min(), before.max()
    mid = (before > lo + 0.25 * (hi - lo)) & (before < lo + 0.75 * (hi - lo))
    assert (x[mid] < before[mid]).all()


def test_plan_is_seeded_and_shares_split_the_global_batch():
    data = _split()
    a = PatchSampler(data, 32, 0.5, np.random.default_rng(3), AFFINE)
    b = PatchSampler(data, 32, 0.5, np.random.default_rng(3), AFFINE)
    pa, pb = a.plan(2, 8), b.plan(2, 8)
    assert all(
        np.array_equal(u, w)
        for u, w in zip(pa.__dict__.values(), pb.__dict__.values(), strict=True)
    )
    whole = a.crop(pa, 1)
    halves = [a.crop(pa, 1, slice(0, 4)), a.crop(pa, 1, slice(4, 8))]
    assert torch.equal(torch.cat([h.image for h in halves]), whole.image)
    assert torch.equal(torch.cat([h.theta for h in halves]), whole.theta)


def test_class_index_masks_are_resampled_by_nearest_neighbour():
    data = _split()
    masks = data.masks.copy()
    masks[:, 40:44, :] = 2  # a second class
    data = SplitArrays(data.images, masks, data.fov, data.shapes, data.case_ids)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), AFFINE)
    assert sampler.multiclass
    _, y, _ = sampler.sample(16)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0, 2.0} and (y == 2).any()


def test_every_foreground_class_is_a_patch_centre_candidate():
    data = _split()
    masks = np.zeros_like(data.masks)
    masks[:, 10:12, 10:20] = 1
    masks[:, 30:32, 10:20] = 2  # an even label: a bitwise AND with the 0/1 FOV would drop it
    fov = np.ones_like(data.fov)
    data = SplitArrays(data.images, masks, fov, data.shapes, data.case_ids)
    sampler = PatchSampler(data, 32, 1.0, np.random.default_rng(0), AFFINE)
    assert all(len(fg) == 40 for fg in sampler._fg)
