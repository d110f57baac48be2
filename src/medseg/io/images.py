"""Raster image reading and writing, chosen by file ending.

TIFF goes through tifffile (8/16-bit, RGB, multi-page); PNG, GIF, JPEG and BMP through Pillow
(16-bit colour PNG through imagecodecs, which Pillow reads as 8 bit); DICOM through
`medseg.io.dicom`. Readers return numpy arrays of dtype uint8 or uint16 and raise `MedsegError`
naming the file when they cannot. `read_frames` returns every frame, (F, H, W) or (F, H, W, 3),
after checking the pixel count against a limit before anything is decoded.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageSequence, UnidentifiedImageError

from medseg.errors import MedsegError

# The raster formats Pillow reads that medical and microscopy data come in: PNG, GIF, JPEG,
# BMP, the netpbm family, WebP, JPEG 2000, AVIF, TGA, SGI, PCX, QOI (TIFF goes to tifffile).
PILLOW_SUFFIXES = (
    ".png", ".gif", ".jpg", ".jpeg", ".jpe", ".jfif", ".bmp", ".dib", ".ppm", ".pgm", ".pbm",
    ".pnm", ".webp", ".jp2", ".j2k", ".j2c", ".jpx", ".jpf", ".avif", ".tga", ".sgi", ".rgb",
    ".bw", ".pcx", ".qoi", ".apng",
)  # fmt: skip
TIFF_SUFFIXES = (".tif", ".tiff")
DICOM_SUFFIXES = (".dcm", ".dicom")
IMAGE_SUFFIXES = PILLOW_SUFFIXES + TIFF_SUFFIXES + DICOM_SUFFIXES
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# Values within this share of a mask's range from its lowest or highest value count as those
# values: DRIVE's 2nd_manual GIFs hold 2/4 and 252/254, yet are binary.
MASK_TOLERANCE = 0.05


@dataclass(frozen=True)
class ReadOptions:
    """How images are read; the `convert` params fill it.

    Attributes:
        window: DICOM VOI window ``(center, width)`` overriding each file's own, or ``None``.
        max_pixels: largest rows x columns x frames x samples accepted, checked before decoding.
        allow_multiframe: read every frame of a multi-frame file; ``False`` refuses such files.
        allow_burned_in: accept DICOM files flagged ``BurnedInAnnotation = YES``.
    """

    window: tuple[float, float] | None = None
    max_pixels: int = 200_000_000
    allow_multiframe: bool = True
    allow_burned_in: bool = False


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble and ``DICM`` prefix (for files without an
    ending, as scanners often write them)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def source_format(path: str | Path) -> str:
    """The format name of ``path``: ``dicom``, ``tiff``, ``png``, ``gif``, ``jpeg`` or ``bmp``.

    Chosen by the file ending; a file without a known ending counts as DICOM when it carries the
    DICOM prefix.
    """
    suffix = Path(path).suffix.lower()
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    if suffix in TIFF_SUFFIXES:
        return "tiff"
    if suffix in (".jpg", ".jpeg", ".jpe", ".jfif"):
        return "jpeg"
    if suffix in PILLOW_SUFFIXES:
        return suffix[1:]
    if is_dicom_file(path):
        return "dicom"
    raise MedsegError(
        f"{path}: unsupported file type {suffix or '(no ending)'}; "
        f"supported: {', '.join(IMAGE_SUFFIXES)} and DICOM files without an ending"
    )


def check_pixel_count(path: str | Path, count: int, limit: int, what: str) -> None:
    """Refuse an image whose ``count`` of samples exceeds ``limit``, before it is decoded."""
    if count > limit:
        raise MedsegError(
            f"{path}: {what} = {count:,} samples exceeds convert.max_pixels ({limit:,}); "
            "raise convert.max_pixels if the file is genuine"
        )


def read_frames(path: str | Path, options: ReadOptions | None = None) -> np.ndarray:
    """Read every frame of any supported image (DICOM, TIFF, PNG, GIF, JPEG, BMP).

    Args:
        path: the file.
        options: window override, pixel limit, multi-frame and burned-in-annotation policy.

    Returns:
        (F, H, W) or (F, H, W, 3) array, uint8 or uint16, F >= 1.

    Raises:
        MedsegError: naming the file and the reason.
    """
    options = options or ReadOptions()
    path = Path(path)
    fmt = source_format(path)
    if fmt == "dicom":
        from medseg.io.dicom import read_dicom_frames

        return read_dicom_frames(path, options)
    try:
        frames = _tiff_frames(path, options) if fmt == "tiff" else _pillow_frames(path, options)
    except MedsegError:
        raise
    except PermissionError as err:
        raise MedsegError(f"{path}: cannot read the file (permission denied)") from err
    except (OSError, ValueError, UnidentifiedImageError, tifffile.TiffFileError) as err:
        raise MedsegError(
            f"{path}: cannot read {fmt} image ({err}); is the file complete?"
        ) from err
    except Exception as err:  # a decoder failing on a damaged file, in any way it likes
        raise MedsegError(f"{path}: cannot read {fmt} image ({type(err).__name__}: {err})") from err
    return np.stack([_canonical(path, f) for f in frames])


def read_raster(path: str | Path) -> np.ndarray:
    """Read a single-frame TIFF, PNG, GIF, JPEG or BMP file.

    Returns:
        (H, W) or (H, W, 3) array, uint8 or uint16. Alpha is dropped, palettes are expanded,
        bilevel images become 0/255.
    """
    if source_format(path) == "dicom":
        raise MedsegError(f"{path}: a DICOM file where a raster image was expected")
    return _single(path, read_frames(path, ReadOptions(max_pixels=2**62)))


def read_image(path: str | Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """Read any supported single-frame image (DICOM, TIFF, PNG, GIF, JPEG, BMP).

    Args:
        path: the file.
        window: DICOM VOI window ``(center, width)`` override; ignored for other formats.

    Returns:
        (H, W) or (H, W, 3) array, uint8 or uint16.
    """
    options = ReadOptions(window=window, max_pixels=2**62, allow_burned_in=True)
    return _single(path, read_frames(path, options))


def _single(path: str | Path, frames: np.ndarray) -> np.ndarray:
    if len(frames) != 1:
        raise MedsegError(f"{path}: holds {len(frames)} frames where one image was expected")
    return frames[0]


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
    with tifffile.TiffFile(path) as tif:
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
    _check_frames(path, len(arr), options)
    return list(arr)


def _pillow_frames(path: Path, options: ReadOptions) -> list[np.ndarray]:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # our own limit applies
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as err:
            raise MedsegError(f"{path}: image too large for Pillow ({err})") from err
    with im:
        n = getattr(im, "n_frames", 1)
        check_pixel_count(
            path, im.width * im.height * len(im.getbands()) * n, options.max_pixels, "the image"
        )
        _check_frames(path, n, options)
        if im.format == "PNG" and _png_is_16bit_colour(path):
            import imagecodecs  # here: only 16-bit colour PNG needs it (bare GPU machines lack it)

            return [imagecodecs.png_decode(path.read_bytes())]
        return [_pillow_array(path, frame) for frame in ImageSequence.Iterator(im)]


def _check_frames(path: Path, n: int, options: ReadOptions) -> None:
    if n > 1 and not options.allow_multiframe:
        raise MedsegError(
            f"{path}: holds {n} frames and convert.multiframe is 'refuse'; "
            "set convert.multiframe: split to make one case per frame"
        )


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
