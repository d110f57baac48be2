"""Raster image reading and writing, chosen by file ending.

TIFF goes through tifffile (8/16-bit, RGB); PNG, GIF, JPEG and BMP through Pillow; DICOM through
`medseg.io.dicom`. Every reader returns a numpy array of shape (H, W) or (H, W, 3) with dtype
uint8 or uint16, and raises `MedsegError` naming the file when it cannot.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, UnidentifiedImageError

from medseg.errors import MedsegError

PILLOW_SUFFIXES = (".png", ".gif", ".jpg", ".jpeg", ".bmp")
TIFF_SUFFIXES = (".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES + DICOM_SUFFIXES


def source_format(path: str | Path) -> str:
    """The format name of ``path`` from its ending: ``dicom``, ``tiff``, ``png``, ``gif``, ..."""
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in (".jpg", ".jpeg"):
        return "jpeg"
    if suffix in PILLOW_SUFFIXES:
        return suffix[1:]
    raise MedsegError(
        f"{path}: unsupported file type {suffix or '(no ending)'}; "
        f"supported: {', '.join(IMAGE_SUFFIXES)}"
    )


def read_raster(path: str | Path) -> np.ndarray:
    """Read a TIFF, PNG, GIF, JPEG or BMP file.

    Returns:
        (H, W) or (H, W, 3) array, uint8 or uint16. Alpha is dropped, palettes are expanded,
        bilevel images become 0/255.
    """
    path = Path(path)
    fmt = source_format(path)
    try:
        arr = _read_tiff(path) if fmt == "tiff" else _read_pillow(path)
    except MedsegError:
        raise
    except (OSError, ValueError, UnidentifiedImageError, tifffile.TiffFileError) as err:
        raise MedsegError(
            f"{path}: cannot read {fmt} image ({err}); is the file complete?"
        ) from err
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 4:
        arr = arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or min(arr.shape[:2]) == 0:
        raise MedsegError(
            f"{path}: expected a 2D grey or RGB image, got an array of shape {arr.shape}"
        )
    return np.ascontiguousarray(arr)


def _read_tiff(path: Path) -> np.ndarray:
    arr = tifffile.imread(path, key=0)
    if arr.dtype == np.bool_:
        return arr.astype(np.uint8) * 255
    if arr.dtype not in (np.uint8, np.uint16):
        raise MedsegError(
            f"{path}: TIFF sample type {arr.dtype} is not supported; use 8- or 16-bit unsigned"
        )
    if arr.ndim == 3 and arr.shape[0] in (3, 4) and arr.shape[2] not in (3, 4):
        arr = np.moveaxis(arr, 0, -1)  # planar (C, H, W) storage
    return arr


def _read_pillow(path: Path) -> np.ndarray:
    with Image.open(path) as im:
        im.load()
        mode = im.mode
        if mode == "P":
            im = im.convert("RGBA" if "transparency" in im.info else "RGB")
            arr = np.asarray(im)[..., :3]
            # palette images that are really grey (DRIVE's GIF masks) stay single-channel
            if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(
                arr[..., 1], arr[..., 2]
            ):
                return arr[..., 0]
            return arr
        if mode == "1":
            return np.asarray(im, dtype=np.uint8) * 255
        if mode in ("L", "RGB", "RGBA"):
            return np.asarray(im)
        if mode in ("LA", "PA"):
            return np.asarray(im.convert("L"))
        if mode.startswith("I;16"):
            return np.asarray(im).astype(np.uint16)
        if mode in ("I", "F"):
            arr = np.asarray(im)
            if arr.min() < 0 or arr.max() > 65535:
                raise MedsegError(f"{path}: {mode}-mode image values outside 0..65535")
            return arr.astype(np.uint16)
        if mode in ("CMYK", "YCbCr", "LAB", "HSV"):
            return np.asarray(im.convert("RGB"))
    raise MedsegError(f"{path}: Pillow image mode {mode} is not supported")


def binarize(arr: np.ndarray) -> np.ndarray:
    """Turn a mask image into a boolean mask.

    Any channel above half of the image's maximum counts as foreground, so 0/1, 0/255 and
    0/65535 masks, and slightly lossy (JPEG) masks, all read correctly.

    Args:
        arr: (H, W) or (H, W, C) integer mask image.

    Returns:
        (H, W) bool.
    """
    if arr.ndim == 3:
        arr = arr.max(axis=2)
    peak = int(arr.max())
    if peak == 0:
        return np.zeros(arr.shape, dtype=bool)
    return arr > peak / 2


def write_png(path: str | Path, arr: np.ndarray) -> None:
    """Write a (H, W) uint8/uint16/bool or (H, W, 3) uint8 array as a lossless PNG."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16 and arr.ndim == 2:
        Image.fromarray(arr).save(path, format="PNG")  # mode I;16
        return
    if arr.dtype != np.uint8 or not (arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3)):
        raise ValueError(f"write_png: unsupported array {arr.dtype} {arr.shape}")
    Image.fromarray(arr).save(path, format="PNG")


def read_image(path: str | Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """Read any supported image (DICOM, TIFF, PNG, GIF, JPEG, BMP) by its file ending.

    Args:
        path: the file.
        window: DICOM VOI window ``(center, width)`` override; ignored for other formats.

    Returns:
        (H, W) or (H, W, 3) array, uint8 or uint16.
    """
    if source_format(path) == "dicom":
        from medseg.io.dicom import read_dicom

        return read_dicom(path, window=window)
    return read_raster(path)
