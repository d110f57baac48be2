"""DICOM reading (pixel data with modality and VOI LUTs applied) and writing of demo files.

Grey images go through the modality LUT (RescaleSlope/Intercept), then a window (from
`convert` params, else the file's VOI LUT or WindowCenter/Width), and are scaled from those known
bounds to the output depth, never by the image's own min and max, so a constant image stays
constant and intensities mean the same in every case. MONOCHROME1 is inverted so that bright means
dense. Colour images come out as RGB. Nothing identifying the patient is read into any output.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.pixels import apply_modality_lut, apply_voi_lut, convert_color_space
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

from medseg.errors import MedsegError

# Ophthalmic Photography 8 Bit Image Storage: what a fundus camera writes.
OPHTHALMIC_PHOTOGRAPHY_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"


def read_dicom(
    path: str | Path,
    window: tuple[float, float] | None = None,
) -> np.ndarray:
    """Read the pixel data of a single-frame DICOM file as a display-ready image.

    Args:
        path: the file.
        window: ``(center, width)`` overriding the file's VOI window, or ``None``.

    Returns:
        (H, W) uint8 or uint16 grey image (16 bit when more than 8 bits are stored), or
        (H, W, 3) uint8 RGB.

    Raises:
        MedsegError: the file is not DICOM, has no pixel data, cannot be decoded or is multi-frame.
    """
    path = Path(path)
    try:
        ds = pydicom.dcmread(path)
    except (InvalidDicomError, OSError, EOFError, ValueError) as err:
        raise MedsegError(f"{path}: not a readable DICOM file ({err})") from err
    if "PixelData" not in ds:
        raise MedsegError(f"{path}: DICOM file has no pixel data (PixelData element missing)")
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        raise MedsegError(
            f"{path}: multi-frame DICOM files are not supported yet; split the frames"
        )
    try:
        arr = ds.pixel_array
    except Exception as err:  # pydicom raises many types for undecodable pixel data
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", "unknown")
        raise MedsegError(
            f"{path}: cannot decode DICOM pixel data (transfer syntax {syntax}): {err}"
        ) from err
    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2")).upper()
    if photometric.startswith("MONOCHROME"):
        return _grey(ds, arr, window, invert=photometric == "MONOCHROME1")
    if photometric.startswith("YBR"):
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise MedsegError(f"{path}: unexpected colour pixel data of shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = (arr.astype(np.float64) / (2 ** int(ds.BitsStored) - 1) * 255.0 + 0.5).astype(
            np.uint8
        )
    return np.ascontiguousarray(arr)


def _grey(
    ds: Dataset, arr: np.ndarray, window: tuple[float, float] | None, invert: bool
) -> np.ndarray:
    bits = int(ds.get("BitsStored", 8))
    signed = int(ds.get("PixelRepresentation", 0)) == 1
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
        unit = apply_voi_lut(values, ds).astype(np.float64) / float(2**lut_bits - 1)
    else:
        # no window: scale from the range the stored bits can hold, after the modality LUT
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
