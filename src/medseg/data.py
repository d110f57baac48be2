"""Patch sampling and augmentation over in-memory training arrays.

Randomness and work are split so that training is seeded, resumable and distributable:

1. `PatchSampler.plan` draws every random choice of one epoch up front from one numpy generator
   (which image, where, which flip and rotation, how much zoom, brightness, contrast, gamma). It
   is cheap, and the generator's state at an epoch's start is all a checkpoint needs to redraw
   it. Every process of a distributed run draws the same plan for the global batch.
2. `PatchSampler.crop` cuts one step's patches (or one process's share of them) out of the
   arrays in memory, with a margin for the rotation, and applies the flips and 90-degree turns.
3. `augment` applies rotation, zoom and the intensity changes to the whole batch at once on
   whatever device the batch is on (one ``grid_sample`` call), masks and FOV resampled with it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from medseg.preprocess import SplitArrays, pad_to


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
        image: (B, 1, S, S) float32; S >= the patch size (margin for rotation).
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
    """Draws random square patches from in-memory images, a share of them centred on foreground.

    All data stays in memory and is sliced with numpy, so a training step reads no files.

    Args:
        data: the training split.
        patch_size: side of the square patches, in pixels.
        foreground_fraction: share of patches centred on a random foreground pixel; the rest are
            centred on a random FOV pixel.
        rng: the generator all randomness comes from.
        aug: the augmentation; the default is the flips and 90-degree rotations only.
    """

    def __init__(
        self,
        data: SplitArrays,
        patch_size: int,
        foreground_fraction: float,
        rng: np.random.Generator,
        aug: Augmentation | None = None,
    ) -> None:
        p = patch_size
        self.aug = aug or Augmentation()
        height, width = data.images.shape[-2:]
        images, masks, fov = data.images[:, 0], data.masks, data.fov
        if height < p or width < p:  # zero padding lies outside the FOV: never a patch centre
            size = (max(p, height), max(p, width))
            images, masks, fov = pad_to(images, *size), pad_to(masks, *size), pad_to(fov, *size)
        self.height, self.width = images.shape[-2:]
        self.patch_size = p
        self.context = self.aug.context(p)
        margin = (self.context - p) // 2
        if margin:  # zeros around the image: outside the FOV, so the loss ignores them
            pad = ((0, 0), (margin, margin), (margin, margin))
            images, masks, fov = np.pad(images, pad), np.pad(masks, pad), np.pad(fov, pad)
        self.images, self.masks, self.fov = images, masks, fov
        self.multiclass = bool(masks.max(initial=0) > 1)
        self.foreground_fraction = foreground_fraction
        self.rng = rng
        # candidate centres per image, as flat indices into the unpadded image
        crop = (slice(margin, margin + self.height), slice(margin, margin + self.width))
        self._fg = [
            np.flatnonzero((m[crop] > 0) & (f[crop] > 0)) for m, f in zip(masks, fov, strict=True)
        ]
        self._fov = [np.flatnonzero(f[crop]) for f in fov]

    def plan(self, steps: int, batch_size: int) -> Plan:
        """Draw every random choice of ``steps`` batches of ``batch_size`` patches."""
        rng, p, aug = self.rng, self.patch_size, self.aug
        shape = (steps, batch_size)
        image = rng.integers(len(self.images), size=shape)
        on_fg = rng.random(shape) < self.foreground_fraction
        where = rng.random(shape)
        top, left = np.empty(shape, np.int64), np.empty(shape, np.int64)
        for idx in np.ndindex(shape):
            i = image[idx]
            pool = self._fg[i] if on_fg[idx] and self._fg[i].size else self._fov[i]
            cy, cx = divmod(int(pool[int(where[idx] * pool.size)]), self.width)
            top[idx] = min(max(cy - p // 2, 0), self.height - p)
            left[idx] = min(max(cx - p // 2, 0), self.width - p)
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

    def crop(self, plan: Plan, step: int, share: slice = slice(None)) -> Batch:
        """Cut the patches of one step of ``plan`` (those in ``share``, for one process)."""
        s = self.context
        idx = np.arange(plan.image.shape[1])[share]
        n = len(idx)
        x = np.empty((n, 1, s, s), dtype=np.float32)
        y = np.empty((n, 1, s, s), dtype=np.float32)
        v = np.empty((n, 1, s, s), dtype=np.float32)
        for out, b in enumerate(idx):
            i, top, left = plan.image[step, b], plan.top[step, b], plan.left[step, b]
            win = (i, slice(top, top + s), slice(left, left + s))
            k, flip = int(plan.quarter_turns[step, b]), bool(plan.flip[step, b])
            x[out, 0] = augment_dihedral(self.images[win], k, flip)
            y[out, 0] = augment_dihedral(self.masks[win], k, flip)
            v[out, 0] = augment_dihedral(self.fov[win], k, flip)
        pick = (step, idx)
        return Batch(
            torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(v),
            torch.from_numpy(plan.theta[pick]), torch.from_numpy(plan.brightness[pick]),
            torch.from_numpy(plan.contrast[pick]), torch.from_numpy(plan.gamma[pick]),
        )  # fmt: skip

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw one augmented batch on the CPU.

        Returns:
            image (B, 1, P, P) float32, target (B, 1, P, P) float32 (0/1 or class indices),
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
        stack = torch.cat([x, v] if multiclass else [x, y, v], dim=1)
        out = F.grid_sample(stack, grid, mode="bilinear", align_corners=False)
        x, v = out[:, :1], (out[:, -1:] > 0.5).to(x.dtype)
        if multiclass:
            y = F.grid_sample(y, grid, mode="nearest", align_corners=False)
        else:
            y = (out[:, 1:2] > 0.5).to(x.dtype)
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
    """Rotate a (H, W) array by ``k`` quarter turns, then mirror it left-right if ``flip``.

    The eight combinations are the dihedral group of the square: every flip and 90-degree rotation.
    """
    a = np.rot90(a, k)
    return a[:, ::-1] if flip else a
