"""The volumes convert wrote (`medseg.convert.case`): ``volumes/<case>.npy`` (C, Z, H, W) int16
or float32 and ``volume_masks/<case>.npy`` (Z, H, W) uint8 labels, read back memory-mapped by
the plan's fingerprint and by preprocess, which cuts them into slices."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError

VOLUME_SUFFIX = ".npy"


def is_volume_row(row: Any) -> bool:
    """Whether a manifest row (a namedtuple or mapping of `medseg.convert.case.MANIFEST_COLUMNS`)
    is a volume (its image an array file) rather than a 2D image."""
    image = row["image"] if isinstance(row, dict) else row.image
    return str(image).endswith(VOLUME_SUFFIX)


def open_volume(converted: str | Path, row: Any) -> tuple[np.ndarray, np.ndarray]:
    """A volume row's image and labels, memory-mapped (nothing is read until it is used).

    Returns:
        (C, Z, H, W) image (int16 or float32) and (Z, H, W) uint8 labels.

    Raises:
        MedsegError: a missing or damaged array file, or shapes that do not match.
    """
    get = row.get if isinstance(row, dict) else lambda k: getattr(row, k)
    image_path = Path(converted) / str(get("image"))
    mask_path = Path(converted) / str(get("mask"))
    image = _load(image_path)
    labels = _load(mask_path)
    if image.ndim != 4 or labels.ndim != 3 or image.shape[1:] != labels.shape:
        raise MedsegError(
            f"{mask_path}: labels {labels.shape} do not fit the volume {image_path} "
            f"{image.shape}; rerun the convert stage"
        )
    return image, labels


def _load(path: Path) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError) as err:
        raise MedsegError(
            f"{path}: cannot read the converted volume ({err}); rerun convert"
        ) from err
