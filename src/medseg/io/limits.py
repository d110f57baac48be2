"""How untrusted image files are read: the options every reader takes, and the checks that
refuse a file before its pixels are decoded.

A decode is bounded by `ReadOptions.max_pixels` (rows x columns x frames x samples). The bound is
checked from each format's own header before memory is committed; the bytes a reader may hold
at once (a file read whole, a deflated DICOM data set inflated) are bounded by `max_bytes`.
Warnings a decoder raises while decoding (a truncated image, a damaged stream) are errors here:
`decode_guard` turns them, and any exception a decoder raises, into one `MedsegError` line.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from medseg.errors import MedsegError

if TYPE_CHECKING:
    from medseg.config.sections import ConvertConfig

# The default decode limit, in samples: a 14000 x 14000 grey image, 8160 x 8160 RGB.
DEFAULT_MAX_PIXELS = 200_000_000
# Largest sample a supported file stores (DICOM BitsAllocated 64): bytes per sample held at most.
MAX_SAMPLE_BYTES = 8
# Room for everything of a file that is not pixels (DICOM headers, TIFF tags, PNG text chunks).
HEADER_BYTES = 16 * 2**20
# Each frame or page counts at least this many samples against the limit: a reader keeps some
# state per frame (tifffile a page object, Pillow a frame record), so 100,000 tiny pages cost
# memory and time although their pixels are few.
MIN_FRAME_SAMPLES = 4096


@dataclass(frozen=True)
class ReadOptions:
    """How images are read, for ``convert`` and ``medseg predict`` alike; convert params fill it
    (`from_convert`).

    Attributes:
        window: DICOM VOI window ``(center, width)`` overriding each file's own, or ``None``.
        max_pixels: largest rows x columns x frames x samples accepted, checked before decoding.
        allow_multiframe: read every frame of a multi-frame file; ``False`` refuses such files.
        allow_burned_in: accept DICOM files flagged ``BurnedInAnnotation = YES``.
    """

    window: tuple[float, float] | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    allow_multiframe: bool = True
    allow_burned_in: bool = False

    @classmethod
    def from_convert(cls, cfg: ConvertConfig | None, *, single: bool = False) -> ReadOptions:
        """The options ``convert`` params give (`medseg.config.ConvertConfig`, also a model
        bundle's convert record); ``None`` gives the defaults.

        Args:
            cfg: the params, or ``None``.
            single: refuse multi-frame files whatever the params say (``medseg predict`` reads
                one image per file).
        """
        options = cls()
        if cfg is not None:
            window = None
            if cfg.window_center is not None and cfg.window_width is not None:
                window = (cfg.window_center, cfg.window_width)
            options = cls(
                window=window,
                max_pixels=cfg.max_pixels,
                allow_multiframe=cfg.multiframe == "split",
                allow_burned_in=cfg.allow_burned_in,
            )
        return dataclasses.replace(options, allow_multiframe=False) if single else options

    @property
    def max_bytes(self) -> int:
        """The most bytes of one file a reader holds at once: every sample at its widest plus
        room for headers. Files larger than this on disk, or inflating past it, are refused."""
        return self.max_pixels * MAX_SAMPLE_BYTES + HEADER_BYTES


def check_pixel_count(path: str | Path, count: int, limit: int, what: str) -> None:
    """Refuse an image whose ``count`` of samples exceeds ``limit``, before it is decoded.

    Raises:
        MedsegError: naming the file, the count and the parameter that sets the limit.
    """
    if count > limit:
        raise MedsegError(
            f"{path}: {what} = {count:,} samples exceeds convert.max_pixels ({limit:,}); "
            "raise convert.max_pixels if the file is genuine"
        )


def check_frame_count(path: str | Path, frames: int, options: ReadOptions) -> None:
    """Refuse a multi-frame file when frames are not allowed, or a frame count that alone
    exceeds the limit (each of several frames counts `MIN_FRAME_SAMPLES` at least), before
    any is read."""
    if frames > 1:
        check_pixel_count(
            path, frames * MIN_FRAME_SAMPLES, options.max_pixels,
            f"{frames:,} frames x at least {MIN_FRAME_SAMPLES:,}",
        )  # fmt: skip
    if frames > 1 and not options.allow_multiframe:
        raise MedsegError(
            f"{path}: holds {frames} frames and convert.multiframe is 'refuse'; "
            "set convert.multiframe: split to make one case per frame"
        )


def check_file_size(path: Path, options: ReadOptions) -> int:
    """The size of ``path`` in bytes, refused when larger than ``options.max_bytes``."""
    try:
        size = path.stat().st_size
    except OSError as err:
        raise MedsegError(f"{path}: cannot read the file ({err.strerror or err})") from err
    if size > options.max_bytes:
        raise MedsegError(
            f"{path}: the file is {size:,} bytes, more than convert.max_pixels "
            f"({options.max_pixels:,}) samples can fill; raise convert.max_pixels if it is genuine"
        )
    return size


@contextmanager
def decode_guard(path: Path, action: str, benign: tuple[str, ...] = ()) -> Iterator[None]:
    """Run a decode with every warning an error, and every failure a `MedsegError` naming the
    file: a decoder that warns about truncated or damaged data has not produced a true image.

    Args:
        path: the file, for the message.
        action: what is done, for the message: ``"read png image"``, ``"decode DICOM pixel
            data"``.
        benign: regular expressions matching the start of warnings that report a header
            inconsistency the decoder has corrected (not damaged data); those are let pass.
    """
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            for pattern in benign:
                warnings.filterwarnings("ignore", message=pattern)
            yield
    except MedsegError:
        raise
    except PermissionError as err:
        raise MedsegError(f"{path}: cannot read the file (permission denied)") from err
    except MemoryError as err:
        raise MedsegError(f"{path}: not enough memory to {action}") from err
    except Exception as err:  # a decoder failing on a damaged file, in any way it likes
        reason = " ".join(str(err).split())[:200] or type(err).__name__
        raise MedsegError(
            f"{path}: cannot {action} ({type(err).__name__}: {reason}); "
            "the file is damaged or incomplete"
        ) from err
