from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file

from medseg.errors import MedsegError
from medseg.io.dicom import read_dicom, window_to_unit, write_rgb_dicom


def test_ct_modality_lut_scaled_from_stored_bit_range():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds  # so the stored-bit range gives the bounds
    out = read_dicom(path)
    assert out.dtype == np.uint16 and out.shape == (128, 128)
    # by hand: HU = raw * slope + intercept; bounds are the signed 16-bit range through the same
    raw = ds.pixel_array.astype(np.float64)
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    lo, hi = -32768 * slope + intercept, 32767 * slope + intercept
    expected = ((raw * slope + intercept - lo) / (hi - lo) * 65535 + 0.5).astype(np.uint16)
    assert np.array_equal(out, expected)


def test_mr_voi_window_by_hand():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    raw = ds.pixel_array.astype(np.float64)  # no rescale in this file
    unit = np.clip((raw - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    assert np.array_equal(read_dicom(path), (unit * 65535 + 0.5).astype(np.uint16))
    # a params override replaces the file's window
    wide = read_dicom(path, window=(c, 4 * w))
    assert np.ptp(wide.astype(float)) < np.ptp(read_dicom(path).astype(float))


def test_window_functions():
    x = np.array([0.0, 49.5, 100.0])
    assert window_to_unit(x, 50, 101).tolist() == pytest.approx([0.0, 0.5, 1.0], abs=0.01)
    assert window_to_unit(x, 50, 100, "LINEAR_EXACT").tolist() == pytest.approx([0, 0.495, 1])
    assert window_to_unit(np.array([50.0]), 50, 10, "SIGMOID")[0] == pytest.approx(0.5)


def test_monochrome1_is_inverted(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    normal = read_dicom(get_testdata_file("MR_small.dcm"))
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    assert np.array_equal(read_dicom(tmp_path / "m1.dcm"), 65535 - normal)


def test_constant_image_stays_constant_not_nan(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = np.full((128, 128), 40, dtype=np.int16).tobytes()
    ds.save_as(tmp_path / "flat.dcm")
    out = read_dicom(tmp_path / "flat.dcm")
    assert np.unique(out).size == 1


def test_rgb_round_trip_and_no_patient_data(tmp_path: Path):
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_rgb_dicom(tmp_path / "a.dcm", img, "seed-1")
    assert np.array_equal(read_dicom(tmp_path / "a.dcm"), img)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert ds.Modality == "OP" and str(ds.PatientName) == "SYNTHETIC^PHANTOM"


def test_broken_files_give_clear_errors(tmp_path: Path):
    with pytest.raises(MedsegError, match="not a readable DICOM"):
        bad = tmp_path / "junk.dcm"
        bad.write_bytes(b"not dicom at all")
        read_dicom(bad)
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(MedsegError, match=re.escape("nopixels.dcm: DICOM file has no pixel data")):
        read_dicom(tmp_path / "nopixels.dcm")
    full = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(full[: len(full) // 2])
    with pytest.raises(MedsegError, match=re.escape("cut.dcm")):
        read_dicom(tmp_path / "cut.dcm")
