"""Raster image reading (TIFF, PNG, GIF, JPEG, BMP, ...) and PNG writing.

TIFF goes through tifffile (8/16-bit, RGB, multi-page); PNG, GIF, JPEG and BMP through Pillow
(16-bit colour PNG through imagecodecs, which Pillow reads as 8 bit). `read_raster_frames`
returns numpy arrays of dtype uint8 or uint16 and raises `MedsegError` naming the file when it
cannot. Every size (pages and their shapes from the TIFF IFDs, Pillow's image size and frame
count) is checked against `ReadOptions` before anything is decoded, and a decoder's warning (a
truncated image, Pillow's decompression-bomb warning, tifffile's log) is an error. Untrusted
files are read through `medseg.io.reader.read`, which also covers DICOM.
"""

from __future__ import annotations

import logging
import math
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageFile, ImageSequence

from medseg.errors import MedsegError
from medseg.io.limits import (
    ReadOptions,
    check_file_size,
    check_frame_count,
    check_pixel_count,
    decode_guard,
)

# The raster formats Pillow reads that medical and microscopy data come in: PNG, GIF, JPEG,
# BMP, the netpbm family, WebP, JPEG 2000, AVIF, TGA, SGI, PCX, QOI (TIFF goes to tifffile).
PILLOW_SUFFIXES = (
    ".png", ".gif", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".ppm", ".pgm", ".pbm",
    ".pnm", ".webp", ".jp2", ".j2k", ".j2c", ".jpx", ".jpf", ".avif", ".tga", ".sgi", ".rgb",
    ".bw", ".pcx", ".qoi", ".apng",
)  # fmt: skip
TIFF_SUFFIXES = (".tif", ".tiff")
RASTER_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Values within this share of a mask's range from its lowest or highest value count as those
# values: DRIVE's 2nd_manual GIFs hold 2/4 and 252/254, yet are binary.
MASK_TOLERANCE = 0.05


def raster_format(path: str | Path) -> str:
    """The format name of a raster file by its ending: ``tiff``, ``jpeg``, ``png``, ``gif``,
    ``bmp``, ... (the ending without its dot); ``""`` for an ending that is not a raster's."""
    suffix = Path(path).suffix.lower()
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in (".jpg", ".jpeg", ".jpe", ".jfif"):
        return "jpeg"
    return suffix[1:] if suffix in PILLOW_SUFFIXES else ""


def read_raster_frames(path: str | Path, options: ReadOptions) -> np.ndarray:
    """Read every frame or page of a raster image, within ``options``' limits.

    Args:
        path: a file with one of `RASTER_SUFFIXES`.
        options: pixel limit and multi-frame policy (the DICOM fields are unused).

    Returns:
        (F, H, W) or (F, H, W, 3) array, uint8 or uint16, F >= 1.

    Raises:
        MedsegError: naming the file and the reason.
    """
    path = Path(path)
    fmt = raster_format(path)
    check_file_size(path, options)
    with decode_guard(path, f"read {fmt or 'raster'} image"):
        frames = _tiff_frames(path, options) if fmt == "tiff" else _pillow_frames(path, options)
    return _stack(path, [_canonical(path, f) for f in frames])


def read_raster(path: str | Path) -> np.ndarray:
    """Read a single-frame raster the pipeline wrote itself (a converted PNG), without a size
    limit beyond Pillow's own; user files go through `medseg.io.reader.read`.

    Returns:
        (H, W) or (H, W, 3) array, uint8 or uint16. Alpha is dropped, palettes are expanded,
        bilevel images become 0/255.
    """
    if not raster_format(path):
        raise MedsegError(f"{path}: not a raster image ({', '.join(RASTER_SUFFIXES)})")
    frames = read_raster_frames(path, ReadOptions(max_pixels=2**50, allow_multiframe=False))
    return frames[0]


def _stack(path: Path, frames: list[np.ndarray]) -> np.ndarray:
    """Frames as one (F, H, W[, 3]) array; grey frames among colour ones (a GIF whose first
    frame has a grey palette) become colour."""
    if any(f.ndim == 3 for f in frames):
        frames = [np.repeat(f[..., None], 3, axis=2) if f.ndim == 2 else f for f in frames]
    if len({(f.shape, f.dtype) for f in frames}) > 1:
        raise MedsegError(f"{path}: its frames differ in size or sample type")
    return np.stack(frames)


def _canonical(path: Path, arr: np.ndarray) -> np.ndarray:
    """One frame as (H, W) or (H, W, 3), uint8 or uint16."""
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype not in (np.uint8, np.uint16):
        raise MedsegError(
            f"{path}: sample type {arr.dtype} is not supported; use 8- or 16-bit unsigned"
        )
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] in (2, 4):  # grey + alpha, RGB + alpha
        arr = arr[..., 0] if arr.shape[2] == 2 else arr[..., :3]
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] != 3) or min(arr.shape[:2]) == 0:
        raise MedsegError(
            f"{path}: expected a 2D grey or RGB image, got an array of shape {arr.shape}"
        )
    return np.ascontiguousarray(arr)


def _tiff_frames(path: Path, options: ReadOptions) -> list[np.ndarray]:
    with _tifffile_log_as_errors(), tifffile.TiffFile(path) as tif:
        # the IFD chain gives the page count without parsing each page's tags
        check_frame_count(path, len(tif.pages), options)
        if not tif.series:
            raise MedsegError(f"{path}: TIFF file holds no image")
        series = tif.series[0]
        check_pixel_count(path, math.prod(series.shape), options.max_pixels, "the image")
        axes = series.axes
        arr = series.asarray()
    # axes: Y, X rows and columns; S samples; anything else (pages, Z, T, C, ...) are frames
    if "S" not in axes and "C" in axes and arr.shape[axes.index("C")] in (3, 4):
        axes = axes.replace("C", "S")  # planar RGB that tifffile calls channels
    if "Y" not in axes or "X" not in axes:
        raise MedsegError(f"{path}: TIFF axes {axes} have no rows and columns")
    order = [i for i, a in enumerate(axes) if a not in "YXS"] + [axes.index("Y"), axes.index("X")]
    if "S" in axes:
        order.append(axes.index("S"))
    arr = np.transpose(arr, order)
    lead = arr.shape[: len(order) - (3 if "S" in axes else 2)]
    arr = arr.reshape(-1, *arr.shape[len(lead) :])
    check_frame_count(path, len(arr), options)
    return list(arr)


class _RaiseOnLog(logging.Handler):
    """tifffile reports a damaged strip or tile in its log and goes on with the rest."""

    def emit(self, record: logging.LogRecord) -> None:
        raise ValueError(f"tifffile: {record.getMessage()}")


@contextmanager
def _tifffile_log_as_errors() -> Iterator[None]:
    log = tifffile.logger()
    handler = _RaiseOnLog(logging.WARNING)
    log.addHandler(handler)
    try:
        yield
    finally:
        log.removeHandler(handler)


def _pillow_frames(path: Path, options: ReadOptions) -> list[np.ndarray]:
    if ImageFile.LOAD_TRUNCATED_IMAGES:  # set by some other library in this process
        raise MedsegError(
            f"{path}: not read, because PIL.ImageFile.LOAD_TRUNCATED_IMAGES is on in this "
            "process and a truncated image would pass as whole; unset it"
        )
    try:
        with warnings.catch_warnings():
            # Pillow warns from 89.5M pixels on; the size is checked against our own limit
            # below, before anything is decoded. Its error (twice that) still stops the read.
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(path)
    except Image.DecompressionBombError as err:
        raise MedsegError(
            f"{path}: larger than Pillow's decompression-bomb limit of "
            f"{Image.MAX_IMAGE_PIXELS:,} pixels ({err}); convert it to TIFF if it is genuine"
        ) from None
    with im:
        samples = 3 if im.mode in ("P", "PA") else len(im.getbands())  # palettes expand
        check_pixel_count(path, im.width * im.height * samples, options.max_pixels, "one frame")
        n = getattr(im, "n_frames", 1)  # GIF: counted by skipping frames, never decoding them
        check_frame_count(path, n, options)
        check_pixel_count(path, im.width * im.height * samples * n, options.max_pixels, "the image")
        if im.format == "PNG" and _png_is_16bit_colour(path):
            import imagecodecs  # here: only 16-bit colour PNG needs it (bare GPU machines lack it)

            return [imagecodecs.png_decode(path.read_bytes())]
        return [_pillow_array(path, frame) for frame in ImageSequence.Iterator(im)]


def _png_is_16bit_colour(path: Path) -> bool:
    """Pillow reads 16-bit RGB PNGs as 8 bit: those go through imagecodecs instead."""
    with open(path, "rb") as f:
        head = f.read(26)
    # IHDR: bit depth at byte 24, colour type at 25 (2: RGB, 6: RGBA)
    return head[:8] == _PNG_SIGNATURE and len(head) == 26 and head[24] == 16 and head[25] in (2, 6)


def _pillow_array(path: Path, im: Image.Image) -> np.ndarray:
    im.load()
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
        arr = np.asarray(im)[..., :3]
        # palette images that are really grey (DRIVE's GIF masks) stay single-channel
        if np.array_equal(arr[..., 0], arr[..., 1]) and np.array_equal(arr[..., 1], arr[..., 2]):
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
    0/65535 masks all read correctly. Use `mask_to_bool` to check the mask is binary first.

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


def mask_to_bool(arr: np.ndarray, path: str | Path, threshold: float | None = None) -> np.ndarray:
    """A mask image as bool, refusing masks that are not binary.

    A mask is binary when every value lies within `MASK_TOLERANCE` of its range from its lowest
    or its highest value (0/1, 0/255, DRIVE's 2/4/252/254). A single non-zero value is all
    foreground. Other masks (label maps, lossy JPEG masks) are refused unless ``threshold`` is
    given: then a pixel is foreground where it exceeds ``threshold`` times the full scale.

    Args:
        arr: (..., H, W) or (..., H, W, 3) uint8/uint16 mask image; colour takes the channel max.
        path: the file, for messages.
        threshold: share of the full scale (255 or 65535), or ``None`` to require binary masks.

    Returns:
        bool array without the channel axis.
    """
    grey = arr.max(axis=-1) if arr.ndim >= 3 and arr.shape[-1] == 3 else arr
    values = np.unique(grey)
    lo, hi = int(values[0]), int(values[-1])
    if len(values) == 1:
        return np.full(grey.shape, hi > 0)
    tol = MASK_TOLERANCE * (hi - lo)
    if bool(np.all((values <= lo + tol) | (values >= hi - tol))):
        return grey > (lo + hi) / 2
    if threshold is None:
        shown = ", ".join(str(v) for v in values[:6]) + (", ..." if len(values) > 6 else "")
        raise MedsegError(
            f"{path}: mask is not binary ({len(values)} values: {shown}); save masks as 0/255 "
            "PNG, or set convert.mask_threshold (e.g. 0.5) to threshold lossy masks"
        )
    full = 65535 if grey.dtype == np.uint16 else 255
    return grey > threshold * full


def write_png(path: str | Path, arr: np.ndarray, compress_level: int = 1) -> None:
    """Write a (H, W) uint8/uint16/bool or (H, W, 3) uint8/uint16 array as a lossless PNG.

    16-bit RGB goes through imagecodecs (Pillow cannot write it); the file is a standard 16-bit
    RGB PNG that any PNG reader opens. ``compress_level`` is zlib's (0-9): level 1 writes a DRIVE
    image five times faster than Pillow's default 6, for files about 15% larger.
    """
    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    if arr.dtype == np.uint16 and arr.ndim == 3 and arr.shape[2] == 3:
        import imagecodecs

        data = imagecodecs.png_encode(np.ascontiguousarray(arr), level=compress_level)
        Path(path).write_bytes(data)
        return
    if arr.dtype not in (np.uint8, np.uint16) or not (
        arr.ndim == 2 or (arr.ndim == 3 and arr.shape[2] == 3 and arr.dtype == np.uint8)
    ):
        raise ValueError(f"write_png: unsupported array {arr.dtype} {arr.shape}")
    # 2D uint16 becomes mode I;16
    Image.fromarray(arr).save(path, format="PNG", compress_level=compress_level)


def read_labels(path: Path, n_labels: int) -> np.ndarray:
    """A converted mask as (H, W) uint8 labels: 0/1 for a binary data set (0/255 on disk),
    else the label values 0..n_labels-1 that convert wrote.

    Raises:
        MedsegError: a label outside the classes of ``classes.json``.
    """
    raw = read_raster(path)
    if n_labels == 2:
        return binarize(raw).astype(np.uint8)
    if raw.ndim != 2:
        raise MedsegError(f"{path}: a label map must have one channel, this one has {raw.shape[2]}")
    top = int(raw.max(initial=0))
    if top >= n_labels:
        raise MedsegError(
            f"{path}: label {top} but data.classes names {n_labels - 1} classes (labels 1.."
            f"{n_labels - 1}); rerun convert with the data.classes of this data set"
        )
    return raw.astype(np.uint8)
