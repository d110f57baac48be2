"""Patch sampling and augmentation over in-memory training arrays."""

from __future__ import annotations

import numpy as np
import torch

from medseg.preprocess import SplitArrays, pad_to


class PatchSampler:
    """Draws random square patches from in-memory images, a share of them centred on foreground.

    All data stays in memory and is sliced with numpy, so a training step reads no files.

    Args:
        data: the training split.
        patch_size: side of the square patches, in pixels.
        foreground_fraction: share of patches centred on a random foreground pixel; the rest are
            centred on a random FOV pixel.
        rng: the generator all randomness comes from.
    """

    def __init__(
        self,
        data: SplitArrays,
        patch_size: int,
        foreground_fraction: float,
        rng: np.random.Generator,
    ) -> None:
        p = patch_size
        height, width = data.images.shape[-2:]
        self.images, self.masks, self.fov = data.images[:, 0], data.masks, data.fov
        if height < p or width < p:  # zero padding lies outside the FOV: never a patch centre
            size = (max(p, height), max(p, width))
            self.images = pad_to(self.images, *size)
            self.masks = pad_to(self.masks, *size)
            self.fov = pad_to(self.fov, *size)
        self.patch_size = p
        self.foreground_fraction = foreground_fraction
        self.rng = rng
        # candidate centres per image, as flat indices into that image
        self._fg = [np.flatnonzero(m & f) for m, f in zip(self.masks, self.fov, strict=True)]
        self._fov = [np.flatnonzero(f) for f in self.fov]

    def sample(self, batch_size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Draw one augmented batch.

        Returns:
            image (B, 1, P, P) float32, target (B, 1, P, P) float32 in {0, 1},
            valid (B, 1, P, P) float32: 1 inside the FOV, where the loss counts.
        """
        p, rng = self.patch_size, self.rng
        n, height, width = self.images.shape
        x = np.empty((batch_size, 1, p, p), dtype=np.float32)
        y = np.empty((batch_size, 1, p, p), dtype=np.float32)
        v = np.empty((batch_size, 1, p, p), dtype=np.float32)
        for b in range(batch_size):
            i = int(rng.integers(n))
            pool = self._fg[i] if rng.random() < self.foreground_fraction else self._fov[i]
            if pool.size == 0:
                pool = self._fov[i]
            cy, cx = divmod(int(pool[rng.integers(pool.size)]), width)
            top = min(max(cy - p // 2, 0), height - p)
            left = min(max(cx - p // 2, 0), width - p)
            win = (i, slice(top, top + p), slice(left, left + p))
            k, flip = int(rng.integers(4)), bool(rng.integers(2))
            x[b, 0] = augment(self.images[win], k, flip)
            y[b, 0] = augment(self.masks[win], k, flip)
            v[b, 0] = augment(self.fov[win], k, flip)
        return torch.from_numpy(x), torch.from_numpy(y), torch.from_numpy(v)


def augment(a: np.ndarray, k: int, flip: bool) -> np.ndarray:
    """Rotate a (H, W) array by ``k`` quarter turns, then mirror it left-right if ``flip``.

    The eight combinations are the dihedral group of the square: every flip and 90-degree rotation.
    """
    a = np.rot90(a, k)
    return a[:, ::-1] if flip else a
