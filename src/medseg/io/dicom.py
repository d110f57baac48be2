"""DICOM reading (pixel data with modality and VOI LUTs applied) and writing of demo files.

Grey images go through the modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence),
then a window (from `convert` params, else the file's WindowCenter/Width or VOI LUT), and are
scaled from those known bounds to the output depth, never by the image's own min and max, so a
constant image stays constant and intensities mean the same in every case. MONOCHROME1 is
inverted so that bright means dense. Colour (RGB, YBR, palette) comes out as RGB. Enhanced
multi-frame files take their rescale and window per frame from the functional groups.

The header is checked before the pixel data is decoded (presence, size against a limit,
multi-frame and burned-in-annotation policy), and the pixel data is decoded once. Nothing
identifying the patient is read: messages name the file and technical attributes only.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.multival import MultiValue
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medseg.errors import MedsegError
from medseg.io.images import ReadOptions, check_pixel_count

# Ophthalmic Photography 8 Bit Image Storage: what a fundus camera writes.
OPHTHALMIC_PHOTOGRAPHY_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
# Elements that the modality and VOI LUT steps read, per frame in enhanced multi-frame files.
_LUT_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_LUT_KEYWORDS = (
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)  # fmt: skip


def read_dicom(path: str | Path, window: tuple[float, float] | None = None) -> np.ndarray:
    """Read the pixel data of a single-frame DICOM file as a display-ready image.

    Args:
        path: the file.
        window: ``(center, width)`` overriding the file's VOI window, or ``None``.

    Returns:
        (H, W) uint8 or uint16 grey image (16 bit when more than 8 bits are stored), or
        (H, W, 3) uint8 or uint16 RGB.

    Raises:
        MedsegError: the file is not DICOM, has no pixel data, cannot be decoded or is multi-frame.
    """
    frames = read_dicom_frames(
        path, ReadOptions(window=window, max_pixels=2**62, allow_burned_in=True)
    )
    if len(frames) != 1:
        raise MedsegError(f"{path}: holds {len(frames)} frames where one image was expected")
    return frames[0]


def read_dicom_frames(path: str | Path, options: ReadOptions | None = None) -> np.ndarray:
    """Read every frame of a DICOM file as display-ready images.

    Args:
        path: the file.
        options: window override, pixel limit, multi-frame and burned-in-annotation policy.

    Returns:
        (F, H, W) uint8/uint16 grey or (F, H, W, 3) uint8/uint16 RGB, F >= 1. Grey output is
        16 bit when more than 8 bits are stored; colour keeps its stored depth (above 16 bits is
        scaled to 16).

    Raises:
        MedsegError: naming the file and the reason.
    """
    options = options or ReadOptions()
    path = Path(path)
    with warnings.catch_warnings():
        # pydicom warns about odd element values, quoting them: they may identify the patient
        warnings.simplefilter("ignore")
        ds = _read_dataset(path)
        _drop_empty(ds)
        _check_header(path, ds, options)
        arr, meta = _decode(path, ds)
        try:
            return _display(path, ds, arr, meta, options.window)
        except MedsegError:
            raise
        except Exception as err:  # a malformed display attribute; its value is not quoted
            raise MedsegError(
                f"{path}: cannot apply the file's rescale, window or LUT attributes "
                f"({type(err).__name__}); check or remove them"
            ) from None


# Type 2 attributes that anonymisers often leave present but empty: empty means unknown here.
_EMPTY_MEANS_ABSENT = (
    "RescaleSlope", "RescaleIntercept", "RescaleType", "WindowCenter", "WindowWidth",
    "VOILUTFunction",
)  # fmt: skip


def _drop_empty(ds: Dataset) -> None:
    """Remove display attributes that are present without a value, as if they were absent."""
    for keyword in _EMPTY_MEANS_ABSENT:
        value = ds[keyword].value if keyword in ds else 0
        if value is None or (isinstance(value, (str, bytes, list, tuple)) and len(value) == 0):
            del ds[keyword]


def _read_dataset(path: Path) -> Dataset:
    try:
        return pydicom.dcmread(path)
    except InvalidDicomError as err:
        raise MedsegError(f"{path}: not a readable DICOM file ({err})") from err
    except OSError as err:
        reason = (err.strerror or str(err)).lower()
        raise MedsegError(f"{path}: cannot read the file ({reason})") from err
    except Exception as err:  # a damaged header: the message may quote values, so omit it
        raise MedsegError(
            f"{path}: not a readable DICOM file (header cannot be parsed: {type(err).__name__}); "
            "is the file complete?"
        ) from err


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


def _check_header(path: Path, ds: Dataset, options: ReadOptions) -> None:
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


def _decode(path: Path, ds: Dataset) -> tuple[np.ndarray, dict[str, Any]]:
    syntax = ds.file_meta.TransferSyntaxUID
    name = f"{UID(syntax).name} ({syntax})" if UID(syntax).is_transfer_syntax else str(syntax)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as err:
        raise MedsegError(
            f"{path}: unsupported transfer syntax {name}: no decoder for it; "
            "convert the file to an uncompressed or JPEG/JPEG-LS/JPEG 2000/RLE syntax"
        ) from err
    if not decoder.is_available:
        raise MedsegError(
            f"{path}: transfer syntax {name} needs a decoder plugin that is not installed "
            "(pylibjpeg with -libjpeg, -openjpeg, -rle); reinstall medseg's dependencies"
        )
    try:
        arr, info = decoder.as_array(ds, as_rgb=True)  # type: ignore[arg-type]
    except Exception as err:  # pydicom and its plugins raise many types on damaged data
        raise MedsegError(
            f"{path}: cannot decode DICOM pixel data (transfer syntax {name}): {err}"
        ) from err
    frames = int(info.get("number_of_frames", 1) or 1)
    samples = int(info.get("samples_per_pixel", 1) or 1)
    expected_ndim = 2 + (frames > 1) + (samples > 1)
    if arr.ndim != expected_ndim:
        raise MedsegError(f"{path}: unexpected DICOM pixel array of shape {arr.shape}")
    if frames == 1:
        arr = arr[np.newaxis]
    return arr, info


def _display(
    path: Path,
    ds: Dataset,
    arr: np.ndarray,
    info: dict[str, Any],
    window: tuple[float, float] | None,
) -> np.ndarray:
    """Decoded (F, H, W[, S]) stored values -> (F, H, W[, 3]) uint8/uint16 display values."""
    photometric = str(info.get("photometric_interpretation", "")).upper()
    bits = int(info.get("bits_stored", 8))
    signed = int(info.get("pixel_representation", 0)) == 1
    if photometric in ("MONOCHROME1", "MONOCHROME2"):
        views = _frame_views(ds, len(arr))
        return np.stack(
            [
                _grey(view, frame, window, photometric == "MONOCHROME1", bits, signed)
                for view, frame in zip(views, arr, strict=True)
            ]
        )
    if photometric == "PALETTE COLOR":
        try:
            rgb = apply_color_lut(arr, ds)
            lut_bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        except Exception as err:
            raise MedsegError(f"{path}: cannot apply the DICOM colour palette ({err})") from err
        if lut_bits <= 8 or int(rgb.max(initial=0)) <= 255:
            return rgb.astype(np.uint8)
        return rgb.astype(np.uint16)
    if photometric in ("YBR_FULL", "YBR_FULL_422"):  # left as YBR by the decoder
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric != "RGB":
        raise MedsegError(
            f"{path}: photometric interpretation {photometric or '(missing)'} is not supported; "
            "supported: MONOCHROME1/2, RGB, YBR_FULL(_422), YBR_ICT/RCT, PALETTE COLOR"
        )
    if arr.ndim != 4 or arr.shape[3] != 3:
        raise MedsegError(f"{path}: unexpected colour pixel data of shape {arr.shape[1:]}")
    if signed:
        raise MedsegError(f"{path}: signed colour pixel data is not supported")
    if arr.dtype == np.uint8 and bits <= 8:
        return np.ascontiguousarray(arr)
    if bits == 16 and arr.dtype == np.uint16:
        return np.ascontiguousarray(arr)
    # colour of another depth: scaled from the stored bit range (not the image's own range)
    out_max = 255 if bits <= 8 else 65535
    scaled = arr.astype(np.float64) * (out_max / float(2**bits - 1)) + 0.5
    return scaled.astype(np.uint8 if out_max == 255 else np.uint16)


def _frame_views(ds: Dataset, n_frames: int) -> list[Dataset]:
    """Per frame, a dataset holding the LUT elements that apply to it.

    Enhanced multi-frame files keep RescaleSlope/Intercept and the window in functional group
    sequences (shared, or per frame); those override the top level, and per-frame values override
    shared ones. Classic files use the top level for every frame.
    """
    shared = ds.get("SharedFunctionalGroupsSequence")
    per_frame = ds.get("PerFrameFunctionalGroupsSequence")
    if not shared and not per_frame:
        return [ds] * n_frames
    views = []
    for k in range(n_frames):
        view = Dataset()
        groups: list[Dataset] = [ds]
        if shared:
            groups.append(shared[0])
        if per_frame and k < len(per_frame):
            groups.append(per_frame[k])
        for group in groups:
            sources = [group] if group is ds else []
            for seq in _LUT_SEQUENCES:
                if seq in group and group[seq].value:
                    sources.append(group[seq].value[0])
            for source in sources:
                for keyword in _LUT_KEYWORDS:
                    if keyword in source:
                        setattr(view, keyword, source[keyword].value)
        views.append(view)
    return views


def _grey(
    ds: Dataset,
    arr: np.ndarray,
    window: tuple[float, float] | None,
    invert: bool,
    bits: int,
    signed: bool,
) -> np.ndarray:
    """One grey frame: modality LUT, window or VOI LUT, inversion, scaling to 8 or 16 bit."""
    lo_raw = -(2 ** (bits - 1)) if signed else 0
    hi_raw = 2 ** (bits - 1) - 1 if signed else 2**bits - 1
    out_max = 255 if bits <= 8 else 65535
    values = apply_modality_lut(arr, ds).astype(np.float64)
    if window is None and "WindowCenter" in ds and "WindowWidth" in ds:
        window = (_first(ds.WindowCenter), _first(ds.WindowWidth))
    if window is not None:
        function = str(ds.get("VOILUTFunction", "LINEAR")).upper()
        unit = window_to_unit(values, window[0], window[1], function)
    elif "VOILUTSequence" in ds:
        lut_bits = int(ds.VOILUTSequence[0].LUTDescriptor[2])
        lut_out = apply_voi_lut(np.rint(values).astype(np.int64), ds, prefer_lut=True)
        unit = lut_out.astype(np.float64) / float(2**lut_bits - 1)
    else:
        # no window: scale from the range the stored bits can hold, after the modality LUT
        if "ModalityLUTSequence" in ds:
            lo, hi = 0.0, float(2 ** int(ds.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
        else:
            bounds = apply_modality_lut(np.array([lo_raw, hi_raw]), ds).astype(np.float64)
            lo, hi = float(bounds.min()), float(bounds.max())
        unit = (values - lo) / max(hi - lo, 1e-12)
    unit = np.clip(unit, 0.0, 1.0)
    if invert:
        unit = 1.0 - unit
    return (unit * out_max + 0.5).astype(np.uint8 if out_max == 255 else np.uint16)


def window_to_unit(
    values: np.ndarray, center: float, width: float, function: str = "LINEAR"
) -> np.ndarray:
    """Apply a DICOM VOI window (PS3.3 C.11.2.1.2), mapping to [0, 1].

    Args:
        values: modality values (after RescaleSlope/Intercept), any shape.
        center: WindowCenter.
        width: WindowWidth (>= 1 for LINEAR, > 0 otherwise).
        function: VOILUTFunction: ``LINEAR``, ``LINEAR_EXACT`` or ``SIGMOID``.

    Returns:
        float64 array of the same shape, in [0, 1].
    """
    if function == "SIGMOID":
        return 1.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    if function == "LINEAR_EXACT":
        return np.clip((values - center) / width + 0.5, 0.0, 1.0)
    width = max(width, 1.0)
    if width == 1.0:  # the standard's formula degenerates into a step at center - 0.5
        return (values > center - 0.5).astype(np.float64)
    return np.clip((values - (center - 0.5)) / (width - 1.0) + 0.5, 0.0, 1.0)


def _first(value: object) -> float:
    """WindowCenter/Width may hold several values; the first is the default window."""
    if isinstance(value, (list, tuple)) or (
        hasattr(value, "__getitem__") and not isinstance(value, str)
    ):
        return float(value[0])  # type: ignore[index]
    return float(value)  # type: ignore[arg-type]


def write_rgb_dicom(path: str | Path, image: np.ndarray, case_uid_seed: str) -> None:
    """Write an (H, W, 3) uint8 photograph as an uncompressed ophthalmic-photography DICOM.

    Used by the synthetic data set. Patient fields are fixed placeholders and UIDs are derived
    from ``case_uid_seed``, so the file's bytes are deterministic.
    """
    meta = FileMetaDataset()
    sop_uid = generate_uid(entropy_srcs=[case_uid_seed, "sop"])
    meta.MediaStorageSOPClassUID = UID(OPHTHALMIC_PHOTOGRAPHY_8BIT)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = OPHTHALMIC_PHOTOGRAPHY_8BIT
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[case_uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[case_uid_seed, "series"])
    ds.Modality = "OP"
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = "SYNTHETIC"
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
