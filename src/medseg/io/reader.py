"""The one way an input image is read, in ``convert`` and ``medseg predict`` alike.

`read` chooses the reader by format (`medseg.io.dicom` for DICOM, `medseg.io.images` for TIFF
and the Pillow formats) and applies one `ReadOptions`: its size limit is checked from each
format's own header before memory is committed, and damaged data is an error, never an image.
The two readers do not import each other; only this module knows them both.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.errors import MedsegError
from medseg.io.dicom import DICOM_SUFFIXES, is_dicom_file, read_dicom_frames
from medseg.io.images import RASTER_SUFFIXES, raster_format, read_raster_frames
from medseg.io.limits import ReadOptions
from medseg.io.nifti import is_nifti

IMAGE_SUFFIXES = RASTER_SUFFIXES + DICOM_SUFFIXES

__all__ = ["IMAGE_SUFFIXES", "read", "source_format"]


def source_format(path: str | Path) -> str:
    """The format name of ``path``: ``dicom``, ``nifti``, ``tiff``, ``png``, ``gif``, ``jpeg``...

    Chosen by the file ending; a file without a known ending counts as DICOM when it carries the
    DICOM prefix.

    Raises:
        MedsegError: an ending no reader supports.
    """
    suffix = Path(path).suffix.lower()
    if is_nifti(path):
        return "nifti"
    if suffix in DICOM_SUFFIXES:
        return "dicom"
    fmt = raster_format(path)
    if fmt:
        return fmt
    if is_dicom_file(path):
        return "dicom"
    raise MedsegError(
        f"{path}: unsupported file type {suffix or '(no ending)'}; "
        f"supported: {', '.join(IMAGE_SUFFIXES)} and DICOM files without an ending"
    )


def read(path: str | Path, options: ReadOptions | None = None) -> np.ndarray:
    """Read every frame of any supported image (DICOM, TIFF, PNG, GIF, JPEG, BMP, ...).

    Args:
        path: the file.
        options: window override, size limit, multi-frame and burned-in-annotation policy;
            default `ReadOptions()`. With ``allow_multiframe=False`` the result has one frame.

    Returns:
        (F, H, W) or (F, H, W, 3) array, uint8 or uint16, F >= 1.

    Raises:
        MedsegError: one line naming the file and the reason (unsupported, too large for the
            limit, damaged or incomplete, refused by policy).
    """
    options = options or ReadOptions()
    path = Path(path)
    fmt = source_format(path)
    if fmt == "nifti":
        raise MedsegError(
            f"{path}: a NIfTI volume where a 2D image was expected; volumes are read whole "
            "(the nnunet layout, or medseg predict on the .nii.gz file)"
        )
    if fmt == "dicom":
        return read_dicom_frames(path, options)
    return read_raster_frames(path, options)
