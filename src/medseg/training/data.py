"""Patch sampling and augmentation over the training cases (in RAM or memory-mapped).

Randomness and work are split so that training is seeded, resumable and distributable:

1. `PatchSampler.plan` draws every random choice of one epoch up front from one numpy generator
   (which image, where, which flip and rotation, how much zoom, brightness, contrast, gamma). It
   is cheap, and the generator's state at an epoch's start is all a checkpoint needs to redraw
   it. Every process of a distributed run draws the same plan for the global batch.
2. `PatchSampler.crop` cuts one step's patches (or one process's share of them) out of the
   cases, with a margin for the rotation, and applies the flips and 90-degree turns.
3. `augment` applies rotation, zoom and the intensity changes to the whole batch at once on
   whatever device the batch is on (one ``grid_sample`` call), masks and FOV resampled with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg.config.sections import TrainConfig
from medseg.io.shards import CaseStore


@dataclass(frozen=True)
class Augmentation:
    """Ranges and probability of the random changes (the ``train.aug_*`` params).

    Attributes:
        dihedral: random flips and 90-degree rotations (always, not subject to ``prob``).
        prob: chance per patch of each of rotation + zoom, brightness, contrast and gamma.
        rotate: largest rotation in degrees, uniform in [-rotate, rotate].
        scale: zoom factor uniform in [1 - scale, 1 + scale].
        brightness: shift uniform in [-brightness, brightness] (the images have unit std).
        contrast: factor uniform in [1 - contrast, 1 + contrast].
        gamma: exponent uniform in [1 - gamma, 1 + gamma], on the patch rescaled to [0, 1].
    """

    dihedral: bool = True
    prob: float = 0.0
    rotate: float = 0.0
    scale: float = 0.0
    brightness: float = 0.0
    contrast: float = 0.0
    gamma: float = 0.0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> Augmentation:
        """The augmentation the ``train.aug_*`` params describe."""
        return cls(
            dihedral=cfg.aug_dihedral, prob=cfg.aug_prob, rotate=cfg.aug_rotate,
            scale=cfg.aug_scale, brightness=cfg.aug_brightness, contrast=cfg.aug_contrast,
            gamma=cfg.aug_gamma,
        )  # fmt: skip

    @property
    def affine(self) -> bool:
        return self.prob > 0 and (self.rotate > 0 or self.scale > 0)

    @property
    def intensity(self) -> bool:
        return self.prob > 0 and (self.brightness > 0 or self.contrast > 0 or self.gamma > 0)

    def context(self, patch_size: int) -> int:
        """Side of the crop that holds every rotated and zoomed-out patch; ``- patch_size`` even."""
        if not self.affine:
            return patch_size
        angle = math.radians(min(self.rotate, 45.0))
        side = patch_size / (1.0 - self.scale) * (math.cos(angle) + math.sin(angle))
        side = math.ceil(side - 1e-9)
        return side + (side - patch_size) % 2


@dataclass(frozen=True)
class Plan:
    """Every random choice of one epoch: arrays of shape (steps, batch) unless said otherwise.

    Attributes:
        image: index of the case.
        top, left: corner of the patch (before the margin for rotation) in the case's pixels.
        quarter_turns: 0..3 rotations by 90 degrees; flip: mirror left-right after them.
        theta: (steps, batch, 2, 3) float32 affine map for ``F.affine_grid`` (rotation, zoom).
        brightness, contrast, gamma: float32; 0, 1, 1 where unchanged.
    """

    image: np.ndarray
    top: np.ndarray
    left: np.ndarray
    quarter_turns: np.ndarray
    flip: np.ndarray
    theta: np.ndarray
    brightness: np.ndarray
    contrast: np.ndarray
    gamma: np.ndarray

    def __len__(self) -> int:
        return len(self.image)


@dataclass
class Batch:
    """One step's patches before `augment`: crops with a margin, and their random parameters.

    Attributes:
        image: (B, C, S, S) float32; S >= the patch size (margin for rotation).
        mask: (B, 1, S, S) float32; 0/1, or class indices.
        fov: (B, 1, S, S) float32 in {0, 1}; 0 also where the crop leaves the image.
        theta: (B, 2, 3); brightness, contrast, gamma: (B,).
    """

    image: torch.Tensor
    mask: torch.Tensor
    fov: torch.Tensor
    theta: torch.Tensor
    brightness: torch.Tensor
    contrast: torch.Tensor
    gamma: torch.Tensor

    def to(self, device: torch.device, non_blocking: bool = False) -> Batch:
        """The same batch on ``device``."""
        return Batch(*(t.to(device, non_blocking=non_blocking) for t in self.__dict__.values()))

    def pin_memory(self) -> Batch:
        """Page-locked copies, for asynchronous copies to a GPU (the DataLoader calls this)."""
        return Batch(*(t.pin_memory() for t in self.__dict__.values()))


class PatchSampler:
    """Draws random square patches from the cases of a split, a share centred on foreground.

    The cases stay where the store keeps them (in RAM, or memory-mapped shards) at their own
    sizes; a patch is copied out of its case when a step needs it, zero-padded (outside the
    FOV, where the loss does not count) where it leaves the case. Patch centres are drawn
    exactly uniformly from the FOV or from one class's pixels through per-row pixel counts, so
    no pixel lists are held in memory.

    Args:
        store: the training split.
        patch_size: side of the square patches, in pixels.
        foreground_fraction: share of patches centred on a foreground pixel: one class of those
            present in the case is chosen (uniformly), then one of its pixels inside the FOV;
            the other patches are centred on a random FOV pixel.
        rng: the generator all randomness comes from.
        aug: the augmentation; the default is the flips and 90-degree rotations only.
        n_labels: labels of the masks, background included (2: binary).
    """

    def __init__(
        self,
        store: CaseStore,
        patch_size: int,
        foreground_fraction: float,
        rng: np.random.Generator,
        aug: Augmentation | None = None,
        n_labels: int = 2,
    ) -> None:
        self.store = store
        self.aug = aug or Augmentation()
        self.patch_size = patch_size
        self.context = self.aug.context(patch_size)
        self.multiclass = n_labels > 2
        self.foreground_fraction = foreground_fraction
        self.rng = rng
        self.channels = int(store.get(0, "image").shape[0]) if len(store) else 1
        self.sizes = [(int(c["height"]), int(c["width"])) for c in store.cases]
        # per case: cumulative FOV pixels per row, and per foreground class the same
        self._fov_cum = [np.cumsum(store.get(i, "fov_rows"), dtype=np.int64) for i in store]
        self._fg_cum = [np.cumsum(store.get(i, "fg_rows"), axis=1, dtype=np.int64) for i in store]
        # per case: the foreground classes present (0-based), padded with -1; heights, widths
        self.n_labels = n_labels
        self._present = np.full((len(store), max(n_labels - 1, 1)), -1, np.int64)
        for i, c in enumerate(self._fg_cum):
            classes = np.flatnonzero(c[:, -1] > 0)
            self._present[i, : classes.size] = classes
        self._heights = np.array([h for h, _ in self.sizes], np.int64)
        self._widths = np.array([w for _, w in self.sizes], np.int64)

    def _labels(self, image: np.ndarray, on_fg: np.ndarray, which: np.ndarray) -> np.ndarray:
        """Per patch: 0 (a FOV pixel), or the foreground class at share ``which`` of the classes
        present in its case when ``on_fg`` and the case has any."""
        present = self._present[image]  # (..., n_labels - 1) class indices, -1 after the last
        count = (present >= 0).sum(axis=-1)
        pick = (which * count).astype(np.int64)  # as int(which * count): which is in [0, 1)
        pick = np.minimum(pick, present.shape[-1] - 1)[..., None]
        chosen = np.take_along_axis(present, pick, axis=-1)[..., 0]
        return np.where(on_fg & (count > 0), chosen + 1, 0)

    def _centres(
        self, image: np.ndarray, label: np.ndarray, where: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray]:
        """Rows and columns of the patch centres: per patch, the pixel at share ``where`` (in
        raster order) of its case's FOV pixels (label 0) or of class ``label``'s inside the FOV.

        Vectorised per (case, label) group: the row from the cumulative row counts, the column
        from the running counts along the rows the group's centres fall on, one
        ``searchsorted`` each, so a plan costs a few numpy calls per case, not per patch.
        """
        rows = np.empty(image.size, np.int64)
        cols = np.empty(image.size, np.int64)
        stride = self.n_labels + 1
        keys = (image * stride + label).ravel()
        shares = where.ravel()
        order = np.argsort(keys, kind="stable")
        for group in np.split(order, np.flatnonzero(np.diff(keys[order])) + 1):
            i, lab = divmod(int(keys[group[0]]), stride)
            cum = self._fov_cum[i] if lab == 0 else self._fg_cum[i][lab - 1]
            total = int(cum[-1])
            r = np.minimum((shares[group] * total).astype(np.int64), total - 1)
            row = np.searchsorted(cum, r, side="right")
            k = r - np.where(row > 0, cum[row - 1], 0)  # the centre is the k-th pixel of its row
            lines, line_of = np.unique(row, return_inverse=True)
            inside = self.store.get(i, "fov")[lines] > 0
            if lab:
                inside &= self.store.get(i, "mask")[lines] == lab
            # the lines' running counts as one nondecreasing sequence: line j lifted by j * span
            span = inside.shape[1] + 1
            lift = np.arange(len(lines), dtype=np.int64)[:, None] * span
            running = (np.cumsum(inside, axis=1, dtype=np.int64) + lift).ravel()
            at = np.searchsorted(running, line_of * span + k, side="right")
            rows[group], cols[group] = row, at - line_of * (span - 1)
        return rows.reshape(image.shape), cols.reshape(image.shape)

    def plan(self, steps: int, batch_size: int) -> Plan:
        """Draw every random choice of ``steps`` batches of ``batch_size`` patches.

        Every draw is made up front, in a fixed order, from ``rng``; the centres are then found
        without further draws, so the plan depends on the generator's state alone.
        """
        rng, p, aug = self.rng, self.patch_size, self.aug
        shape = (steps, batch_size)
        image = rng.integers(len(self.store), size=shape)
        on_fg = rng.random(shape) < self.foreground_fraction
        which = rng.random(shape)
        where = rng.random(shape)
        cy, cx = self._centres(image, self._labels(image, on_fg, which), where)
        h, w = self._heights[image], self._widths[image]
        top = np.minimum(np.maximum(cy - p // 2, 0), np.maximum(h - p, 0))
        left = np.minimum(np.maximum(cx - p // 2, 0), np.maximum(w - p, 0))
        if not self.store.ram:
            self.store.release_all()
        turns, flip = rng.integers(4, size=shape), rng.integers(2, size=shape).astype(bool)
        if not aug.dihedral:
            turns, flip = np.zeros_like(turns), np.zeros_like(flip)

        # each change on with chance aug.prob; rotation and zoom are one resampling, one draw
        def maybe(half_range: float, on: np.ndarray | None = None) -> np.ndarray:
            on = rng.random(shape) < aug.prob if on is None else on
            return on * rng.uniform(-half_range, half_range, shape)

        on_affine = rng.random(shape) < aug.prob
        angle = np.radians(maybe(aug.rotate, on_affine))
        zoom = 1.0 + maybe(aug.scale, on_affine)
        brightness = maybe(aug.brightness)
        contrast = 1.0 + maybe(aug.contrast)
        gamma = 1.0 + maybe(aug.gamma)
        # input extent per output extent, in grid_sample's normalised coordinates
        k = p / (self.context * zoom)
        cos, sin = np.cos(angle) * k, np.sin(angle) * k
        zero = np.zeros(shape)
        theta = np.stack([np.stack([cos, -sin, zero], -1), np.stack([sin, cos, zero], -1)], -2)
        f32 = np.float32
        return Plan(
            image, top, left, turns, flip, theta.astype(f32),
            brightness.astype(f32), contrast.astype(f32), gamma.astype(f32),
        )  # fmt: skip

    def _window(self, i: int, top: int, left: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The context window at (top, left) minus the margin, zero where it leaves the case."""
        s = self.context
        y0, x0 = top - (s - self.patch_size) // 2, left - (s - self.patch_size) // 2
        h, w = self.sizes[i]
        ys, xs = slice(max(y0, 0), min(y0 + s, h)), slice(max(x0, 0), min(x0 + s, w))
        dst = (slice(ys.start - y0, ys.stop - y0), slice(xs.start - x0, xs.stop - x0))
        x = np.zeros((self.channels, s, s), dtype=np.float32)
        y = np.zeros((s, s), dtype=np.float32)
        v = np.zeros((s, s), dtype=np.float32)
        x[:, dst[0], dst[1]] = self.store.get(i, "image")[:, ys, xs]
        y[dst] = self.store.get(i, "mask")[ys, xs]
        v[dst] = self.store.get(i, "fov")[ys, xs]
        return x, y, v

    def crop(self, plan: Plan, step: int, share: slice = slice(None)) -> Batch:
        """Cut the patches of one step of ``plan`` (those in ``share``, for one process)."""
        s = self.context
        idx = np.arange(plan.image.shape[1])[share]
        n = len(idx)
        x = np.empty((n, self.channels, s, s), dtype=np.float32)
        y = np.empty((n, 1, s, s), dtype=np.float32)
        v = np.empty((n, 1, s, s), dtype=np.float32)
        for out, b in enumerate(idx):
            i = int(plan.image[step, b])
            xi, yi, vi = self._window(i, int(plan.top[step, b]), int(plan.left[step, b]))
            k, flip = int(plan.quarter_turns[step, b]), bool(plan.flip[step, b])
            x[out] = augment_dihedral(xi, k, flip)
            y[out, 0] = augment_dihedral(yi, k, flip)
            v[out, 0] = augment_dihedral(vi, k, flip)
            self.store.release(i)  # memory-mapped: resident memory stays that of the patches
        pick = (step, idx)
        return Batch(
            torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(v),
            torch.from_numpy(plan.theta[pick]), torch.from_numpy(plan.brightness[pick]),
            torch.from_numpy(plan.contrast[pick]), torch.from_numpy(plan.gamma[pick]),
        )  # fmt: skip

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw one augmented batch on the CPU.

        Returns:
            image (B, C, P, P) float32, target (B, 1, P, P) float32 (0/1 or class indices),
            valid (B, 1, P, P) float32: 1 inside the FOV, where the loss counts.
        """
        return self.augment(self.crop(self.plan(1, batch_size), 0))

    def augment(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """`augment` with this sampler's settings."""
        return augment(batch, self.patch_size, self.aug, self.multiclass)


def augment(
    batch: Batch, patch_size: int, aug: Augmentation, multiclass: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rotation, zoom, brightness, contrast and gamma of a whole batch, on its device.

    The image is resampled bilinearly; a binary mask and the FOV bilinearly and then cut at 0.5
    (smoother than nearest neighbours along thin vessels), class-index masks by nearest neighbour.
    Pixels outside the FOV stay 0 in the image, as the preprocess stage leaves them.

    Returns:
        image, target, valid: (B, 1, P, P) float32, as `PatchSampler.sample`.
    """
    x, y, v = batch.image, batch.mask, batch.fov
    if aug.affine:
        grid = F.affine_grid(batch.theta, [len(x), 1, patch_size, patch_size], align_corners=False)
        c = x.shape[1]
        stack = torch.cat([x, v] if multiclass else [x, y, v], dim=1)
        out = F.grid_sample(stack, grid, mode="bilinear", align_corners=False)
        x, v = out[:, :c], (out[:, -1:] > 0.5).to(x.dtype)
        if multiclass:
            y = F.grid_sample(y, grid, mode="nearest", align_corners=False)
        else:
            y = (out[:, c : c + 1] > 0.5).to(x.dtype)
    elif x.shape[-1] != patch_size:
        m = (x.shape[-1] - patch_size) // 2
        crop = (..., slice(m, m + patch_size), slice(m, m + patch_size))
        x, y, v = x[crop], y[crop], v[crop]
    if aug.intensity:
        x = _intensity(x, v, batch.brightness, batch.contrast, batch.gamma)
    return x.contiguous(), y.contiguous(), v.contiguous()


def _intensity(
    x: torch.Tensor, v: torch.Tensor, brightness: torch.Tensor, contrast: torch.Tensor,
    gamma: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    per = (-1, 1, 1, 1)
    x = x * contrast.view(per) + brightness.view(per)
    inside = v > 0
    lo = torch.where(inside, x, torch.inf).amin(dim=(1, 2, 3), keepdim=True)
    hi = torch.where(inside, x, -torch.inf).amax(dim=(1, 2, 3), keepdim=True)
    span = hi - lo
    ok = torch.isfinite(span) & (span > 1e-6)
    lo, span = torch.where(ok, lo, 0.0), torch.where(ok, span, 1.0)
    unit = ((x - lo) / span).clamp(0.0, 1.0)
    gammaed = unit ** gamma.view(per) * span + lo
    x = torch.where((gamma.view(per) != 1.0) & ok, gammaed, x)
    return x * v


def augment_dihedral(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate a (..., H, W) array by ``k`` quarter turns, then mirror it left-right if ``flip``.

    The eight combinations are the dihedral group of the square: every flip and 90-degree rotation.
    """
    a = np.rot90(a, k, axes=(-2, -1))
    return a[..., ::-1] if flip else a


class StepBatches(torch.utils.data.Dataset):
    """Steps of an epoch's plan as a map-style dataset, for DataLoader workers."""

    def __init__(self, sampler: PatchSampler, plan: Plan, first: int, share: slice) -> None:
        self.sampler, self.plan, self.first, self.share = sampler, plan, first, share

    def __len__(self) -> int:
        return len(self.plan) - self.first

    def __getitem__(self, i: int) -> Batch:
        return self.sampler.crop(self.plan, self.first + i, self.share)
