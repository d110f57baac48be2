"""DICOM reading: pixel data with modality and VOI LUTs applied.

Grey images go through the modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence),
then a window (from `convert` params, else the file's WindowCenter/Width or VOI LUT), and are
scaled from those known bounds to the output depth, never by the image's own min and max, so a
constant image stays constant and intensities mean the same in every case. MONOCHROME1 is
inverted so that bright means dense. Colour (RGB, YBR, palette) comes out as RGB. Enhanced
multi-frame files take their rescale and window per frame from the functional groups.

The header is checked before the pixel data is decoded (presence, size against a limit,
multi-frame and burned-in-annotation policy), and the pixel data is decoded once. Before that,
the file's size is bounded, a deflated data set is inflated only up to the limit, and every
compressed frame's own header (`medseg.io.codestream`) must agree with Rows, Columns and
SamplesPerPixel and the frame must be whole; a warning while decoding is an error. Nothing
identifying the patient is read: messages name the file and technical attributes only.
"""

from __future__ import annotations

import tempfile
import warnings
import zlib
from pathlib import Path
from typing import Any, BinaryIO, cast

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileDataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_dataset, read_file_meta_info
from pydicom.pixels import (
    apply_color_lut,
    apply_modality_lut,
    apply_voi_lut,
    convert_color_space,
    get_decoder,
)
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from medseg.errors import MedsegError
from medseg.io.dicom_header import check_bits_allocated, check_codestreams, check_header
from medseg.io.limits import ReadOptions, check_file_size, decode_guard

DICOM_SUFFIXES = (".dcm", ".dicom")
# Bytes inflated per step of a deflated data set (the check against the limit runs per step).
_INFLATE_STEP = 2**20
# pydicom's decode warnings that report a header it has corrected from the pixel data itself, or
# padding it has dropped: the image is whole. Every other warning while decoding is an error.
_BENIGN = (
    r"The \(0028,0004\) 'Photometric Interpretation' value is",
    r"The pixel data is \d+ bytes long, which indicates it contains \d+ bytes of excess padding",
    r"The decoded RLE segment contains non-conformant padding",
)
# Value representations whose length field is 4 bytes in explicit VR (PS3.5 7.1.2).
_LONG_VRS = frozenset(
    (b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR", b"UT", b"UV")
)
# Elements that the modality and VOI LUT steps read, per frame in enhanced multi-frame files.
_LUT_SEQUENCES = ("PixelValueTransformationSequence", "FrameVOILUTSequence")
_LUT_KEYWORDS = (
    "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence",
    "WindowCenter", "WindowWidth", "VOILUTFunction", "VOILUTSequence",
)  # fmt: skip


def is_dicom_file(path: str | Path) -> bool:
    """Whether ``path`` starts with the DICOM preamble and ``DICM`` prefix (for files without an
    ending, as scanners often write them)."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def is_deflated(path: str | Path) -> bool:
    """Whether a DICOM file's data set is deflate-compressed (read from its file meta only):
    such a file must not reach `pydicom.dcmread`, which inflates it whole."""
    try:
        syntax = read_file_meta_info(path).get("TransferSyntaxUID")
    except Exception:  # not DICOM, or a damaged meta group: the reader says why, later
        return False
    return bool(syntax == DeflatedExplicitVRLittleEndian)


def read_dicom_frames(path: str | Path, options: ReadOptions) -> np.ndarray:
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
    path = Path(path)
    with warnings.catch_warnings():
        # pydicom warns about odd element values, quoting them: they may identify the patient
        warnings.simplefilter("ignore")
        ds = _read_dataset(path, options)
        _drop_empty(ds)
        check_header(path, ds, options)
        check_bits_allocated(path, ds)
        check_codestreams(path, ds)
    arr, meta = _decode(path, ds)  # decoder warnings are errors here
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
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


def _read_dataset(path: Path, options: ReadOptions) -> Dataset:
    check_file_size(path, options)  # pydicom holds every element's value in memory
    try:
        meta = read_file_meta_info(path)
        if meta.get("TransferSyntaxUID") == DeflatedExplicitVRLittleEndian:
            return _read_deflated(path, meta, options)
        return pydicom.dcmread(path)
    except MedsegError:
        raise
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


def _read_deflated(path: Path, meta: FileMetaDataset, options: ReadOptions) -> Dataset:
    """A Deflated Explicit VR Little Endian file, inflated at most to ``options.max_bytes``
    (pydicom would inflate it whole, however large it grows).

    The data set is inflated piece by piece into a temporary file, so that memory holds one
    copy of it (as pydicom reads it back), not the inflated bytes and the parsed data set.
    """
    with open(path, "rb") as f:
        f.seek(_dataset_offset(path, f.read(min(options.max_bytes, 2**20))))
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        with tempfile.TemporaryFile() as inflated:
            size = 0
            while not inflater.eof:
                chunk = inflater.unconsumed_tail or f.read(2**20)
                try:
                    piece = inflater.decompress(chunk, _INFLATE_STEP)
                except zlib.error as err:
                    raise MedsegError(
                        f"{path}: the deflated DICOM data set is damaged ({err})"
                    ) from err
                if not chunk and not piece:
                    break  # the file ended before the deflate stream did
                size += len(piece)
                if size > options.max_bytes:
                    raise MedsegError(
                        f"{path}: the deflated DICOM data set inflates past "
                        f"{options.max_bytes:,} bytes, more than convert.max_pixels "
                        f"({options.max_pixels:,}) samples can fill; raise convert.max_pixels if "
                        "the file is genuine"
                    )
                inflated.write(piece)
            if not inflater.eof:
                raise MedsegError(f"{path}: the deflated DICOM data set is truncated")
            inflated.seek(0)
            dataset = read_dataset(
                cast(BinaryIO, inflated), is_implicit_VR=False, is_little_endian=True
            )
    return FileDataset(str(path), dataset, None, meta, False, True)


def _dataset_offset(path: Path, raw: bytes) -> int:
    """Where the data set starts: after the preamble, ``DICM`` and the group 0002 elements
    (always explicit VR little endian)."""
    pos = 132
    while pos + 8 <= len(raw) and int.from_bytes(raw[pos : pos + 2], "little") == 0x0002:
        vr = raw[pos + 4 : pos + 6]
        if vr in _LONG_VRS:
            pos += 12 + int.from_bytes(raw[pos + 8 : pos + 12], "little")
        else:
            pos += 8 + int.from_bytes(raw[pos + 6 : pos + 8], "little")
    if pos > len(raw):
        raise MedsegError(f"{path}: the DICOM file meta information is truncated")
    return pos


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
    with decode_guard(path, f"decode DICOM pixel data (transfer syntax {name})", _BENIGN):
        arr, info = decoder.as_array(ds, as_rgb=True)  # type: ignore[arg-type]
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


def header_facts(path: str | Path) -> tuple[str, tuple[float, float] | None]:
    """The modality (``CT``, ``MR``, ``DX``...; empty where absent) and the pixel spacing of a
    DICOM file that `read_dicom_frames` has read (neither identifies anyone).

    The spacing is (row, column) in mm: ``PixelSpacing`` (in the patient), else the shared
    functional groups' ``PixelMeasuresSequence`` (enhanced multi-frame objects), else
    ``ImagerPixelSpacing`` (at the detector: projection radiographs). None where none is present
    or it is not two positive finite numbers. A deflated file is not read again (its inflation
    is bounded only inside `read_dicom_frames`): modality and spacing stay unknown.
    """
    path = Path(path)
    if is_deflated(path):
        return "", None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except Exception:  # read whole a moment ago; a header read cannot add a new problem
            return "", None
        modality = str(ds.get("Modality", "") or "").strip()
        candidates = [ds.get("PixelSpacing")]
        try:
            shared = ds.SharedFunctionalGroupsSequence[0].PixelMeasuresSequence[0]
            candidates.append(shared.get("PixelSpacing"))
        except (AttributeError, IndexError, KeyError, TypeError):
            pass
        candidates.append(ds.get("ImagerPixelSpacing"))
    for value in candidates:
        spacing = _spacing(value)
        if spacing is not None:
            return modality, spacing
    return modality, None


def _spacing(value: object) -> tuple[float, float] | None:
    try:
        row, col = (float(v) for v in value)  # type: ignore[attr-defined]
    except (TypeError, ValueError):
        return None
    ok = all(np.isfinite(v) and v > 0 for v in (row, col))
    return (row, col) if ok else None
