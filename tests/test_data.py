from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_store

from medseg.io.shards import CaseStore
from medseg.training.data import Augmentation, PatchSampler, augment_dihedral


def _arrays(n: int = 3, size: int = 64) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.normal(size=(n, 1, size, size)).astype(np.float32)
    masks = np.zeros((n, size, size), np.uint8)
    masks[:, 30:34, :] = 1  # a horizontal "vessel"
    fov = np.ones((n, size, size), np.uint8)
    return images, masks, fov


@pytest.fixture
def store_at(tmp_path: Path):
    """Write cases to a fresh store: ``store_at(images, masks, fov, n_labels=2)``."""
    count = iter(range(1000))

    def make(*arrays: np.ndarray, **kw: int) -> CaseStore:
        return make_store(tmp_path / f"s{next(count)}", *arrays, **kw)

    return make


def _split(store_at, n: int = 3, size: int = 64) -> CaseStore:
    return store_at(*_arrays(n, size))


def test_all_eight_dihedral_transforms_are_distinct():
    a = np.arange(9).reshape(3, 3)
    results = {augment_dihedral(a, k, f).tobytes() for k in range(4) for f in (False, True)}
    assert len(results) == 8


def test_patches_shapes_and_pairing(store_at):
    _, masks, fov = _arrays()
    # an image identical to its mask shows that both get the same crop, rotation and flip
    data = store_at(masks[:, None].astype(np.float32), masks, fov)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0))
    x, y, v = sampler.sample(16)
    assert x.shape == y.shape == v.shape == (16, 1, 32, 32)
    assert np.array_equal(x.numpy(), y.numpy())
    # and rotations happen: vertical as well as horizontal vessels
    assert any((p.sum(axis=0) > 0).all() for p in y[:, 0].numpy())
    assert any((p.sum(axis=1) > 0).all() for p in y[:, 0].numpy())


def test_foreground_fraction_and_seeding(store_at):
    data = _split(store_at)
    fg = PatchSampler(data, 32, 1.0, np.random.default_rng(0)).sample(32)[1]
    assert all(p.any() for p in fg)
    a = PatchSampler(data, 32, 0.5, np.random.default_rng(7)).sample(8)[0]
    b = PatchSampler(data, 32, 0.5, np.random.default_rng(7)).sample(8)[0]
    assert np.array_equal(a.numpy(), b.numpy())


def test_images_smaller_than_patch_are_padded(store_at):
    data = _split(store_at, size=20)
    x, _, v = PatchSampler(data, 32, 0.5, np.random.default_rng(0)).sample(4)
    assert x.shape == (4, 1, 32, 32)
    assert v.sum() == 4 * 20 * 20  # only the real pixels count


AFFINE = Augmentation(prob=1.0, rotate=30.0, scale=0.2)


def _mask_as_image(store_at, n: int = 3, size: int = 64) -> CaseStore:
    """An image identical to its mask, so that any mismatch of the two shows."""
    _, masks, fov = _arrays(n, size)
    return store_at(masks[:, None].astype(np.float32), masks, fov)


def test_context_holds_every_rotated_and_zoomed_patch():
    assert Augmentation().context(32) == 32
    side = AFFINE.context(32)
    need = 32 / 0.8 * (math.cos(math.radians(30)) + math.sin(math.radians(30)))
    assert side >= need and (side - 32) % 2 == 0


def test_affine_augmentation_moves_image_mask_and_fov_together(store_at):
    data = _mask_as_image(store_at)
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


def test_no_affine_is_an_exact_crop(store_at):
    """With rotation and zoom off, the patches are plain crops: values unchanged."""
    data = _split(store_at)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), Augmentation(dihedral=False))
    plan = sampler.plan(1, 4)
    x, _, _ = sampler.augment(sampler.crop(plan, 0))
    for b in range(4):
        i, t, left = plan.image[0, b], plan.top[0, b], plan.left[0, b]
        ref = data.get(i, "image")[0, t : t + 32, left : left + 32]
        assert np.array_equal(x[b, 0].numpy(), ref)


def test_identity_affine_reproduces_the_crop(store_at):
    """grid_sample with rotation 0 and zoom 1 lands on pixel centres: the crop, unchanged."""
    data = _split(store_at)
    aug = Augmentation(dihedral=False, prob=1.0, rotate=10.0)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), aug)
    plan = sampler.plan(1, 2)
    batch = sampler.crop(plan, 0)
    batch.theta = torch.tensor([[[1.0, 0, 0], [0, 1.0, 0]]]).repeat(2, 1, 1) * 32 / sampler.context
    x, _, _ = sampler.augment(batch)
    for b in range(2):
        i, t, left = plan.image[0, b], plan.top[0, b], plan.left[0, b]
        ref = data.get(i, "image")[0, t : t + 32, left : left + 32]
        np.testing.assert_allclose(x[b, 0].numpy(), ref, rtol=1e-5, atol=1e-5)


def test_fov_is_zero_where_a_rotated_patch_leaves_the_image(store_at):
    # FOV everywhere, but patches of 32 rotated near the border see outside
    data = _split(store_at, size=40)
    sampler = PatchSampler(data, 32, 0.0, np.random.default_rng(1), AFFINE)
    _, _, v = sampler.sample(32)
    assert (v == 0).any() and (v == 1).any()


def test_intensity_changes_stay_inside_the_fov(store_at):
    images, masks, fov = _arrays()
    fov[:, :, :10] = 0
    images[:, :, :, :10] = 0
    data = store_at(images, masks, fov)
    aug = Augmentation(dihedral=False, prob=1.0, brightness=0.5, contrast=0.5, gamma=0.5)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), aug)
    plan = sampler.plan(1, 8)
    batch = sampler.crop(plan, 0)
    x, _, v = sampler.augment(batch)
    assert (x[v == 0] == 0).all()
    assert not torch.equal(x, batch.image * batch.fov)


def test_brightness_and_contrast_by_hand(store_at):
    data = _split(store_at)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), Augmentation(prob=1.0))
    batch = sampler.crop(sampler.plan(1, 2), 0)
    batch.contrast = torch.tensor([2.0, 1.0])
    batch.brightness = torch.tensor([0.0, -0.5])
    batch.gamma = torch.tensor([1.0, 1.0])
    aug = Augmentation(prob=1.0, brightness=0.5, contrast=0.5)
    from medseg.training.data import augment

    x, _, _ = augment(batch, 32, aug)
    torch.testing.assert_close(x[0], batch.image[0] * 2.0)
    torch.testing.assert_close(x[1], batch.image[1] - 0.5)


def test_gamma_keeps_the_range_inside_the_fov(store_at):
    data = _split(store_at)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), Augmentation(prob=1.0))
    batch = sampler.crop(sampler.plan(1, 1), 0)
    batch.gamma = torch.tensor([1.5])
    from medseg.training.data import augment

    x, _, _ = augment(batch, 32, Augmentation(prob=1.0, gamma=0.5))
    before = batch.image
    assert x.min() == pytest.approx(before.min().item(), abs=1e-5)
    assert x.max() == pytest.approx(before.max().item(), abs=1e-5)
    # a gamma above 1 darkens the middle of the range
    lo, hi = before.min(), before.max()
    mid = (before > lo + 0.25 * (hi - lo)) & (before < lo + 0.75 * (hi - lo))
    assert (x[mid] < before[mid]).all()


def test_plan_is_seeded_and_shares_split_the_global_batch(store_at):
    data = _split(store_at)
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


def test_class_index_masks_are_resampled_by_nearest_neighbour(store_at):
    images, masks, fov = _arrays()
    masks[:, 40:44, :] = 2  # a second class
    data = store_at(images, masks, fov, n_labels=3)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), AFFINE, n_labels=3)
    assert sampler.multiclass
    _, y, _ = sampler.sample(16)
    assert set(torch.unique(y).tolist()) <= {0.0, 1.0, 2.0} and (y == 2).any()


def test_every_foreground_class_is_a_patch_centre_candidate(store_at):
    images, _, fov = _arrays()
    masks = np.zeros_like(fov)
    masks[:, 20:22, 20:30] = 1
    masks[:, 40:42, 30:40] = 2  # an even label: a bitwise AND with the 0/1 FOV would drop it
    data = store_at(images, masks, fov, n_labels=3)
    sampler = PatchSampler(data, 32, 1.0, np.random.default_rng(0), n_labels=3)
    plan = sampler.plan(8, 16)
    at_centre = masks[plan.image, plan.top + 16, plan.left + 16]
    # every patch is centred on foreground, and both classes are drawn (a class is chosen
    # first, then one of its pixels: the 20-pixel class as often as the other)
    assert set(np.unique(at_centre)) == {1, 2}
    assert 0.3 < (at_centre == 2).mean() < 0.7


def test_centres_are_uniform_over_the_fov(store_at):
    """The row-count sampler draws every FOV pixel with the same chance."""
    images, masks, fov = _arrays(n=1, size=64)
    fov[:] = 0
    fov[0, 5, 7] = fov[0, 5, 9] = fov[0, 40, 3] = fov[0, 63, 63] = 1
    # 1-pixel patches: the corner is the centre (no clamping at the border)
    sampler = PatchSampler(store_at(images, masks, fov), 1, 0.0, np.random.default_rng(1))
    plan = sampler.plan(1, 4000)
    draws = list(zip(plan.top[0].tolist(), plan.left[0].tolist(), strict=True))
    counts = {p: draws.count(p) for p in set(draws)}
    assert set(counts) == {(5, 7), (5, 9), (40, 3), (63, 63)}
    assert all(900 < c < 1100 for c in counts.values())


def test_cases_of_mixed_sizes_and_colour(store_at):
    """Cases keep their own sizes; patches near a small case's border are zero-padded, and all
    three channels travel."""
    rng = np.random.default_rng(0)
    sizes = [(20, 90), (64, 64), (130, 40)]
    images = [rng.normal(size=(3, h, w)).astype(np.float32) for h, w in sizes]
    masks = [(rng.random((h, w)) < 0.2).astype(np.uint8) for h, w in sizes]
    data = store_at(images, masks)
    sampler = PatchSampler(data, 32, 0.5, np.random.default_rng(0), Augmentation(dihedral=False))
    assert sampler.channels == 3
    plan = sampler.plan(4, 8)
    batch = sampler.crop(plan, 2)
    x, _, v = sampler.augment(batch)
    assert x.shape == (8, 3, 32, 32) and v.shape == (8, 1, 32, 32)
    for b in range(8):
        i, t, left = plan.image[2, b], plan.top[2, b], plan.left[2, b]
        ref = images[i][:, t : t + 32, left : left + 32]
        got = x[b].numpy()[:, : ref.shape[1], : ref.shape[2]]
        np.testing.assert_array_equal(got, ref)
        assert v[b, 0].sum() == ref.shape[1] * ref.shape[2]  # padding lies outside the FOV


def test_ram_and_mapped_stores_give_the_same_batches(store_at, tmp_path: Path):
    images, masks, fov = _arrays()
    mapped = store_at(images, masks, fov)
    ram = CaseStore.open(mapped.folder, "train", ram=True)
    a = PatchSampler(mapped, 32, 0.5, np.random.default_rng(5), AFFINE)
    b = PatchSampler(ram, 32, 0.5, np.random.default_rng(5), AFFINE)
    pa, pb = a.plan(2, 4), b.plan(2, 4)
    assert np.array_equal(pa.top, pb.top) and np.array_equal(pa.image, pb.image)
    assert torch.equal(a.crop(pa, 1).image, b.crop(pb, 1).image)


def _plan_one_patch_at_a_time(sampler: PatchSampler, steps: int, batch_size: int):
    """The plan's image, top and left as the sampler drew them before it was vectorised: one
    Python iteration per patch (the reference the vectorised draw must equal bit for bit)."""
    rng, p, store = sampler.rng, sampler.patch_size, sampler.store
    shape = (steps, batch_size)
    image = rng.integers(len(store), size=shape)
    on_fg = rng.random(shape) < sampler.foreground_fraction
    which, where = rng.random(shape), rng.random(shape)
    top, left = np.empty(shape, np.int64), np.empty(shape, np.int64)
    for idx in np.ndindex(shape):
        i = int(image[idx])
        fg_cum = np.cumsum(store.get(i, "fg_rows"), axis=1, dtype=np.int64)
        present = np.flatnonzero(fg_cum[:, -1] > 0)
        label = 0
        if on_fg[idx] and present.size:
            label = int(present[int(which[idx] * present.size)]) + 1
        fov_cum = np.cumsum(store.get(i, "fov_rows"), dtype=np.int64)
        cum = fov_cum if label == 0 else fg_cum[label - 1]
        r = min(int(float(where[idx]) * int(cum[-1])), int(cum[-1]) - 1)
        row = int(np.searchsorted(cum, r, side="right"))
        k = r - (int(cum[row - 1]) if row else 0)
        inside = store.get(i, "fov")[row] > 0
        if label:
            inside &= store.get(i, "mask")[row] == label
        cy, cx = row, int(np.flatnonzero(inside)[k])
        h, w = int(store.cases[i]["height"]), int(store.cases[i]["width"])
        top[idx] = min(max(cy - p // 2, 0), max(h - p, 0))
        left[idx] = min(max(cx - p // 2, 0), max(w - p, 0))
    return image, top, left


@pytest.mark.parametrize("n_labels", [2, 4])
@pytest.mark.parametrize("ram", [False, True])
def test_vectorised_plan_equals_the_patch_by_patch_draw(store_at, n_labels: int, ram: bool):
    """Bit-identical positions and generator state: the default run's metrics do not move."""
    rng = np.random.default_rng(7)
    sizes = [(40, 90), (64, 64), (130, 40), (33, 71), (50, 50)]
    images = [rng.normal(size=(1, h, w)).astype(np.float32) for h, w in sizes]
    masks = [rng.integers(n_labels, size=(h, w)) * (rng.random((h, w)) < 0.1) for h, w in sizes]
    masks[1][:] = 0  # a case without foreground: its foreground patches fall back to the FOV
    if n_labels > 2:
        masks[2][masks[2] == 2] = 0  # a case that lacks one class
    fovs = [rng.random((h, w)) < 0.8 for h, w in sizes]
    data = store_at(images, [m.astype(np.uint8) for m in masks], fovs, n_labels=n_labels)
    if ram:
        data = CaseStore.open(data.folder, "train", ram=True)
    for seed in range(3):
        new = PatchSampler(data, 32, 0.6, np.random.default_rng(seed), AFFINE, n_labels=n_labels)
        old = PatchSampler(data, 32, 0.6, np.random.default_rng(seed), AFFINE, n_labels=n_labels)
        image, top, left = _plan_one_patch_at_a_time(old, 16, 24)
        plan = new.plan(16, 24)
        assert np.array_equal(plan.image, image)
        assert np.array_equal(plan.top, top) and np.array_equal(plan.left, left)
        assert plan.top.dtype == np.int64 and plan.left.dtype == np.int64


def test_vectorised_plan_resumes_exactly_and_is_the_same_on_every_rank(store_at):
    """A plan redrawn from a saved generator state is the one first drawn (exact resume), and
    samplers of several processes, seeded alike, draw the same plan for the global batch."""
    data = _split(store_at, n=4)
    ranks = [PatchSampler(data, 32, 0.5, np.random.default_rng(11), AFFINE) for _ in range(3)]
    for _ in range(2):  # two epochs
        saved = dict(ranks[0].rng.bit_generator.state)
        plans = [r.plan(5, 12) for r in ranks]
        ranks[0].rng.bit_generator.state = saved  # a resume within the epoch redraws it
        again = ranks[0].plan(5, 12)
        for plan in [*plans[1:], again]:
            for name, value in plans[0].__dict__.items():
                assert np.array_equal(value, getattr(plan, name)), name
