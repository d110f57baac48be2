"""DICOM headers checked before any pixel is decoded: bits allocated, presence and size of the
pixel data against the read limits, the multi-frame and burned-in-annotation policies, and every
compressed frame's own codestream header against Rows, Columns and SamplesPerPixel
(`medseg.io.codestream`). `medseg.io.dicom` reads the pixels once these pass. Messages name the
file and technical attributes only, never anything that identifies the patient.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import imagecodecs
from pydicom.dataset import Dataset
from pydicom.encaps import generate_frames
from pydicom.multival import MultiValue

from medseg.errors import MedsegError
from medseg.io.codestream import CodestreamError, frame_header
from medseg.io.limits import ReadOptions, check_pixel_count

# Encapsulated transfer syntaxes by the codestream their frames hold.
_CODESTREAMS = {
    **dict.fromkeys(("1.2.840.10008.1.2.4.50", "1.2.840.10008.1.2.4.51",  # JPEG baseline, ext.
                     "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70"), "jpeg"),  # lossless
    **dict.fromkeys(("1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81"), "jpegls"),
    **dict.fromkeys(("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",  # JPEG 2000
                     "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",  # HTJ2K
                     "1.2.840.10008.1.2.4.203"), "j2k"),
    "1.2.840.10008.1.2.5": "rle",
}  # fmt: skip


def check_bits_allocated(path: Path, ds: Dataset) -> None:
    """Bytes per sample are bounded too: the limit counts samples of at most 8 bytes."""
    bits = _header_int(path, ds, "BitsAllocated", 8)
    if bits not in (1, 8, 16, 32, 64):
        raise MedsegError(
            f"{path}: BitsAllocated is {bits}; DICOM pixel data has 1, 8, 16, 32 or 64"
        )


def check_codestreams(path: Path, ds: Dataset) -> None:
    """Every compressed frame declares the size of the header and is whole, before decoding.

    A decoder sizes its output from the codestream, not from Rows and Columns: a disagreement
    could allocate far past the limit, or decode a different image than the header describes.
    """
    syntax = str(ds.file_meta.TransferSyntaxUID)
    kind = _CODESTREAMS.get(syntax)
    if kind is None:
        return
    rows, cols = int(ds.Rows), int(ds.Columns)
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    count = 0
    try:
        for count, frame in enumerate(generate_frames(ds.PixelData, number_of_frames=n_frames), 1):
            if count > n_frames:
                break
            header = frame_header("jpeg" if kind == "jpegls" else kind, frame)
            if kind == "rle":
                expected = samples * -(-bits // 8)
                if header.samples != expected:
                    raise CodestreamError(
                        f"frame {count} has {header.samples} RLE segments where "
                        f"{samples} samples x {bits} bits need {expected}"
                    )
            elif (header.rows, header.columns, header.samples) != (rows, cols, samples):
                raise CodestreamError(
                    f"frame {count} is {header.columns}x{header.rows} with {header.samples} "
                    f"samples by its own header, but Columns x Rows is {cols}x{rows} with "
                    f"{samples} samples"
                )
            elif header.bits > bits:
                raise CodestreamError(
                    f"frame {count} has {header.bits}-bit samples but BitsAllocated is {bits}"
                )
            if kind == "jpegls":
                _check_jpegls(frame)
    except CodestreamError as err:
        raise MedsegError(f"{path}: compressed pixel data refused: {err}") from None
    except Exception as err:  # fragments that cannot be split into frames
        raise MedsegError(
            f"{path}: the encapsulated pixel data is malformed ({type(err).__name__}: {err})"
        ) from None
    if count != n_frames:
        raise MedsegError(
            f"{path}: the encapsulated pixel data holds {count} frames but NumberOfFrames is "
            f"{n_frames}; the file is damaged or incomplete"
        )


def _check_jpegls(frame: bytes) -> None:
    """JPEG-LS frames are decoded once by CharLS, which detects damaged entropy-coded data that
    the decoder pydicom uses passes over."""
    try:
        imagecodecs.jpegls_decode(frame)
    except Exception as err:
        raise CodestreamError(f"the JPEG-LS data is damaged ({err})") from None


def _header_int(path: Path, ds: Dataset, keyword: str, default: int | None = None) -> int:
    try:
        value = ds.get(keyword, default)
        if value is None or value == "":
            if default is None:
                raise MedsegError(f"{path}: DICOM element {keyword} is missing")
            return default
        return int(value)
    except MedsegError:
        raise
    except Exception as err:
        raise MedsegError(f"{path}: DICOM element {keyword} is not a valid number ({err})") from err


def check_header(path: Path, ds: Dataset, options: ReadOptions) -> None:
    if "PixelData" not in ds:
        kind = "Float Pixel Data" if "FloatPixelData" in ds or "DoubleFloatPixelData" in ds else ""
        extra = f" (it holds {kind}, which is not supported)" if kind else ""
        raise MedsegError(
            f"{path}: DICOM file has no pixel data (PixelData element missing){extra}"
        )
    if getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None) is None:
        raise MedsegError(
            f"{path}: DICOM file meta has no Transfer Syntax UID (0002,0010), so its pixel data "
            "cannot be decoded; re-export the file from its source"
        )
    rows = _header_int(path, ds, "Rows")
    cols = _header_int(path, ds, "Columns")
    frames = _header_int(path, ds, "NumberOfFrames", 1)
    samples = _header_int(path, ds, "SamplesPerPixel", 1)
    if min(rows, cols, frames, samples) < 1:
        raise MedsegError(f"{path}: DICOM image size {rows}x{cols}x{frames}x{samples} is empty")
    check_pixel_count(
        path, rows * cols * frames * samples, options.max_pixels,
        f"rows x columns x frames x samples ({rows}x{cols}x{frames}x{samples})",
    )  # fmt: skip
    if frames > 1 and not options.allow_multiframe:
        raise MedsegError(
            f"{path}: multi-frame DICOM ({frames} frames) and convert.multiframe is 'refuse'; "
            "set convert.multiframe: split to make one case per frame"
        )
    if not options.allow_burned_in:
        _check_burned_in(path, ds)


# Secondary Capture Image Storage SOP classes: screenshots, scanned film and documents, images
# made by a workstation, where text with the patient's name is often part of the pixels.
SECONDARY_CAPTURE = (
    "1.2.840.10008.5.1.4.1.1.7", "1.2.840.10008.5.1.4.1.1.7.1", "1.2.840.10008.5.1.4.1.1.7.2",
    "1.2.840.10008.5.1.4.1.1.7.3", "1.2.840.10008.5.1.4.1.1.7.4",
)  # fmt: skip


def _check_burned_in(path: Path, ds: Dataset) -> None:
    """Refuse pixels that may show patient identifiers.

    1. BurnedInAnnotation with any value but NO (YES in any case, padded with spaces or NULs,
       one of several values, or a value that is not NO) is refused; 2. a secondary capture
       (its SOP class, or a Conversion Type) is refused unless it says NO, since screenshots
       and scans rarely set the flag yet often show a name.
    """
    flags = _code_strings(ds.get("BurnedInAnnotation"))
    fix = (
        "remove or redact the file, or set convert.allow_burned_in: true once you have checked "
        "the images"
    )
    if any(flag != "NO" for flag in flags):
        shown = "YES" if "YES" in flags else "not NO"
        raise MedsegError(
            f"{path}: BurnedInAnnotation is {shown}, so the pixels may show patient identifiers; "
            + fix
        )
    sop = str(ds.get("SOPClassUID", "")).strip("\0 ")
    conversion = _code_strings(ds.get("ConversionType"))
    if not flags and (sop in SECONDARY_CAPTURE or conversion):
        raise MedsegError(
            f"{path}: a secondary capture (screenshot, scan or workstation image) without "
            "BurnedInAnnotation NO, so the pixels may show patient identifiers; " + fix
        )


def _code_strings(value: Any) -> list[str]:
    """The values of a code string element, upper-cased, without padding; [] when absent."""
    if value is None:
        return []
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    items = value if isinstance(value, (list, tuple, MultiValue)) else str(value).split("\\")
    cleaned = [str(item).strip(" \0\t\r\n").upper() for item in items]
    return [item for item in cleaned if item]
