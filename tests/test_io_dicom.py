from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate

from medseg.errors import MedsegError
from medseg.io.dicom import window_to_unit
from medseg.io.limits import ReadOptions
from medseg.io.reader import read
from medseg.synthetic import write_rgb_dicom


def test_ct_modality_lut_scaled_from_stored_bit_range():
    path = get_testdata_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    assert "WindowCenter" not in ds  # so the stored-bit range gives the bounds
    out = read(path)[0]
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
    assert np.array_equal(read(path)[0], (unit * 65535 + 0.5).astype(np.uint16))
    # a params override replaces the file's window
    wide = read(path, ReadOptions(window=(c, 4 * w)))[0]
    assert np.ptp(wide.astype(float)) < np.ptp(read(path)[0].astype(float))


def test_window_functions():
    x = np.array([0.0, 49.5, 100.0])
    assert window_to_unit(x, 50, 101).tolist() == pytest.approx([0.0, 0.5, 1.0], abs=0.01)
    assert window_to_unit(x, 50, 100, "LINEAR_EXACT").tolist() == pytest.approx([0, 0.495, 1])
    assert window_to_unit(np.array([50.0]), 50, 10, "SIGMOID")[0] == pytest.approx(0.5)


def test_monochrome1_is_inverted(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    normal = read(get_testdata_file("MR_small.dcm"))[0]
    ds.PhotometricInterpretation = "MONOCHROME1"
    ds.save_as(tmp_path / "m1.dcm")
    assert np.array_equal(read(tmp_path / "m1.dcm")[0], 65535 - normal)


def test_constant_image_stays_constant_not_nan(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ds.PixelData = np.full((128, 128), 40, dtype=np.int16).tobytes()
    ds.save_as(tmp_path / "flat.dcm")
    out = read(tmp_path / "flat.dcm")[0]
    assert np.unique(out).size == 1


def test_rgb_round_trip_and_no_patient_data(tmp_path: Path):
    img = np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    write_rgb_dicom(tmp_path / "a.dcm", img, "seed-1")
    assert np.array_equal(read(tmp_path / "a.dcm")[0], img)
    ds = pydicom.dcmread(tmp_path / "a.dcm")
    assert ds.Modality == "OP" and str(ds.PatientName) == "SYNTHETIC^PHANTOM"


def test_broken_files_give_clear_errors(tmp_path: Path):
    with pytest.raises(MedsegError, match="not a readable DICOM"):
        bad = tmp_path / "junk.dcm"
        bad.write_bytes(b"not dicom at all")
        read(bad)[0]
    ds = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    del ds.PixelData
    ds.save_as(tmp_path / "nopixels.dcm")
    with pytest.raises(MedsegError, match=re.escape("nopixels.dcm: DICOM file has no pixel data")):
        read(tmp_path / "nopixels.dcm")[0]
    full = Path(get_testdata_file("CT_small.dcm")).read_bytes()
    (tmp_path / "cut.dcm").write_bytes(full[: len(full) // 2])
    with pytest.raises(MedsegError, match=re.escape("cut.dcm")):
        read(tmp_path / "cut.dcm")[0]


# --- compressed syntaxes, colour, multi-frame, policies (pydicom's bundled files, offline) ---

MR_VARIANTS = [
    "MR_small_RLE.dcm",  # RLE lossless
    "MR_small_jp2klossless.dcm",  # JPEG 2000 lossless
    "MR_small_jpeg_ls_lossless.dcm",  # JPEG-LS lossless
    "MR_small_bigendian.dcm",
    "MR_small_implicit.dcm",
]
# SC_rgb test pattern: one colour per 10-row band, read at column 50
SC_RGB_BANDS = [
    (255, 0, 0), (255, 128, 128), (0, 255, 0), (128, 255, 128), (0, 0, 255),
    (128, 128, 255), (0, 0, 0), (64, 64, 64), (192, 192, 192), (255, 255, 255),
]  # fmt: skip


MR = get_testdata_file("MR_small.dcm")
SC = ReadOptions(allow_burned_in=True)  # pydicom's test files: many are secondary captures


@pytest.mark.parametrize("name", MR_VARIANTS)
def test_lossless_syntaxes_give_the_uncompressed_result(name: str):
    assert np.array_equal(read(get_testdata_file(name), SC)[0], read(MR, SC)[0])


def test_jpeg_extended_12_bit_scaled_from_stored_bits():
    path = get_testdata_file("JPGExtended.dcm")
    ds = pydicom.dcmread(path)
    out = read(path, SC)[0]
    assert out.dtype == np.uint16 and out.shape == (1024, 256)
    raw = ds.pixel_array.astype(np.float64)  # 12 bits stored, no rescale, no window
    assert np.array_equal(out, (raw / 4095 * 65535 + 0.5).astype(np.uint16))


@pytest.mark.parametrize("name", ["JPEG2000.dcm", "693_J2KI.dcm", "J2K_pixelrep_mismatch.dcm"])
def test_jpeg2000_grey_decodes(name: str):
    out = read(get_testdata_file(name), SC)[0]
    assert out.dtype == np.uint16 and out.ndim == 2 and np.ptp(out) > 0


@pytest.mark.parametrize(
    ("name", "tolerance"),
    [
        ("SC_rgb_rle.dcm", 0),  # RLE
        ("SC_rgb_dcmtk_+eb+cr.dcm", 0),  # JPEG baseline, RGB
        ("SC_rgb_jpeg_gdcm.dcm", 0),  # JPEG lossless
        ("SC_rgb_gdcm_KY.dcm", 0),  # JPEG 2000
        ("SC_rgb_dcmtk_+eb+cy+n1.dcm", 6),  # JPEG baseline, YBR_FULL
        ("SC_rgb_dcmtk_+eb+cy+np.dcm", 6),  # JPEG baseline, YBR_FULL_422
        ("SC_ybr_full_422_uncompressed.dcm", 6),  # uncompressed YBR_FULL_422
        ("SC_rgb_jls_lossy_line.dcm", 4),  # JPEG-LS near-lossless
    ],
)
def test_colour_comes_out_as_rgb(name: str, tolerance: int):
    out = read(get_testdata_file(name), SC)[0]
    assert out.dtype == np.uint8 and out.shape == (100, 100, 3)
    got = np.array([out[10 * i + 5, 50] for i in range(10)], dtype=int)
    assert np.abs(got - np.array(SC_RGB_BANDS)).max() <= tolerance


def test_16_bit_rgb_is_kept():
    out = read(get_testdata_file("SC_rgb_rle_16bit.dcm"), SC)[0]
    assert out.dtype == np.uint16 and out.shape == (100, 100, 3)
    got = np.array([out[10 * i + 5, 50] for i in range(10)], dtype=int)
    assert np.array_equal(got, np.array(SC_RGB_BANDS) * 257)


def test_32_bit_rgb_is_scaled_to_16():
    out = read(get_testdata_file("SC_rgb_rle_32bit.dcm"), SC)[0]
    assert out.dtype == np.uint16
    assert tuple(out[5, 50]) == (65535, 0, 0) and tuple(out[95, 50]) == (65535, 65535, 65535)


def test_palette_colour_by_hand():
    path = get_testdata_file("examples_palette.dcm")
    ds = pydicom.dcmread(path)
    out = read(path, SC)[0]
    index = ds.pixel_array
    red = np.frombuffer(ds.RedPaletteColorLookupTableData, dtype="<u2")
    first = int(ds.RedPaletteColorLookupTableDescriptor[1])
    assert out.shape == (*index.shape, 3) and out.dtype == np.uint16
    assert np.array_equal(out[..., 0], red[np.clip(index.astype(int) - first, 0, len(red) - 1)])


def test_multiframe_frames_and_refusal():
    path = get_testdata_file("SC_rgb_rle_2frame.dcm")
    frames = read(path, ReadOptions(allow_burned_in=True))  # a secondary capture
    assert frames.shape == (2, 100, 100, 3)
    assert tuple(frames[0, 5, 50]) == (255, 0, 0)
    assert np.array_equal(frames[1], 255 - frames[0])  # the second frame is the negative
    with pytest.raises(MedsegError, match=r"2 frames\) and convert\.multiframe is 'refuse'"):
        read(path, ReadOptions(allow_multiframe=False))
    video = read(get_testdata_file("examples_ybr_color.dcm"))
    assert video.shape == (30, 240, 320, 3) and video.dtype == np.uint8


@pytest.mark.parametrize("name", ["CR1/6154", "CR2/6247", "CR3/6278"])
def test_monochrome1_cr_files_by_hand(name: str):
    path = get_testdata_file(f"dicomdirtests/77654033/{name}")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    hu = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    c, w = float(ds.WindowCenter), float(ds.WindowWidth)
    unit = np.clip((hu - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
    expected = ((1.0 - unit) * 65535 + 0.5).astype(np.uint16)  # inverted: bright means dense
    assert np.array_equal(read(path)[0], expected)


def test_voi_lut_sequence_by_hand(tmp_path: Path):
    ds = pydicom.dcmread(MR)
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    first, n = 100, 1024
    item.LUTDescriptor = [n, first, 12]
    table = (np.linspace(0, 4095, n) ** 1.0).astype(np.uint16)[::-1].copy()  # a reversing LUT
    item.add_new(0x00283006, "US", table.tolist())  # LUTData
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "voi.dcm")
    raw = ds.pixel_array.astype(int)
    expected_unit = table[np.clip(raw - first, 0, n - 1)] / 4095.0
    assert np.array_equal(
        read(tmp_path / "voi.dcm")[0], (expected_unit * 65535 + 0.5).astype(np.uint16)
    )


def test_enhanced_multiframe_rescale_and_window_per_frame(tmp_path: Path):
    ds = pydicom.dcmread(MR)
    raw = ds.pixel_array
    del ds.WindowCenter, ds.WindowWidth
    ds.NumberOfFrames = 2
    ds.PixelData = np.stack([raw, raw]).tobytes()
    shared, rescale = Dataset(), Dataset()
    rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = 2, -100, "US"
    shared.PixelValueTransformationSequence = [rescale]
    ds.SharedFunctionalGroupsSequence = [shared]
    per_frame = []
    for center, width in ((1000.0, 800.0), (2000.0, 3000.0)):
        group, voi = Dataset(), Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        group.FrameVOILUTSequence = [voi]
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = per_frame
    ds.save_as(tmp_path / "enhanced.dcm")
    frames = read(tmp_path / "enhanced.dcm")
    values = raw.astype(np.float64) * 2 - 100
    for frame, (c, w) in zip(frames, ((1000.0, 800.0), (2000.0, 3000.0)), strict=True):
        unit = np.clip((values - (c - 0.5)) / (w - 1) + 0.5, 0, 1)
        assert np.array_equal(frame, (unit * 65535 + 0.5).astype(np.uint16))


def test_synthetic_16_bit_keeps_its_full_range(tmp_path: Path):
    ramp = np.arange(256 * 256, dtype=np.uint16).reshape(256, 256)
    ds = pydicom.dcmread(MR)
    del ds.WindowCenter, ds.WindowWidth
    ds.Rows, ds.Columns = ramp.shape
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
    ds.PixelData = ramp.tobytes()
    ds.save_as(tmp_path / "ramp.dcm")
    assert np.array_equal(read(tmp_path / "ramp.dcm")[0], ramp)  # every one of 65536 levels


def test_pixel_limit_is_checked_before_decoding():
    # MR_truncated's pixel data is short: decoding would fail, the size check comes first
    with pytest.raises(MedsegError, match=r"64x64x1x1\) = 4,096 samples exceeds"):
        read(get_testdata_file("MR_truncated.dcm"), ReadOptions(max_pixels=4000))
    assert read(MR, ReadOptions(max_pixels=4096)).shape == (1, 64, 64)


def test_burned_in_annotation_is_refused_unless_allowed(tmp_path: Path):
    ds = pydicom.dcmread(MR)
    ds.BurnedInAnnotation = "YES"
    ds.save_as(tmp_path / "burned.dcm")
    with pytest.raises(MedsegError, match=r"burned\.dcm: BurnedInAnnotation is YES"):
        read(tmp_path / "burned.dcm")
    allowed = read(tmp_path / "burned.dcm", ReadOptions(allow_burned_in=True))
    assert np.array_equal(allowed[0], read(MR)[0])


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("MR_truncated.dcm", "cannot decode DICOM pixel data"),
        ("badVR.dcm", "element NumberOfFrames is not a valid number"),
        ("meta_missing_tsyntax.dcm", "no Transfer Syntax UID"),
        ("JPEG-lossy.dcm", r"cannot decode DICOM pixel data \(transfer syntax JPEG Extended"),
        ("no_meta.dcm", "not a readable DICOM file"),
        ("rtplan.dcm", "has no pixel data"),
    ],
)
def test_broken_bundled_files_give_one_clear_message(name: str, message: str):
    path = get_testdata_file(name)
    with pytest.raises(MedsegError, match=message) as info:
        read(path, ReadOptions(allow_burned_in=True))  # some are secondary captures
    assert str(info.value).startswith(f"{path}: ")


def test_unsupported_transfer_syntax(tmp_path: Path):
    ds = pydicom.dcmread(MR)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2: not decodable here
    ds.PixelData = encapsulate([b"\x00" * 64])
    ds.save_as(tmp_path / "mpeg.dcm")
    with pytest.raises(MedsegError, match=r"mpeg\.dcm: unsupported transfer syntax MPEG2"):
        read(tmp_path / "mpeg.dcm")


def test_messages_never_quote_patient_fields(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("badVR.dcm"))  # NumberOfFrames is "1A"
    ds.PatientName, ds.PatientID, ds.PatientBirthDate = "DOE^JANE", "PID-98765", "19700101"
    ds.save_as(tmp_path / "a.dcm")
    with pytest.raises(MedsegError) as info:
        read(tmp_path / "a.dcm")
    for secret in ("DOE", "JANE", "PID-98765", "19700101", str(ds.SOPInstanceUID)):
        assert secret not in str(info.value)


def test_empty_display_attributes_count_as_absent(tmp_path: Path):
    """Anonymisers often blank type 2 attributes: an empty window or rescale is no window."""
    ds = pydicom.dcmread(MR)
    ds.WindowCenter, ds.WindowWidth = None, None
    ds.save_as(tmp_path / "blank_window.dcm")
    plain = pydicom.dcmread(MR)
    del plain.WindowCenter, plain.WindowWidth
    plain.save_as(tmp_path / "no_window.dcm")
    assert np.array_equal(
        read(tmp_path / "blank_window.dcm")[0], read(tmp_path / "no_window.dcm")[0]
    )

    ct = pydicom.dcmread(get_testdata_file("CT_small.dcm"))
    ct.RescaleSlope, ct.RescaleIntercept = None, None
    ct.save_as(tmp_path / "blank_rescale.dcm")
    raw = ct.pixel_array.astype(np.float64)  # no rescale: the stored values, signed 16 bit
    expected = ((raw + 32768) / 65535 * 65535 + 0.5).astype(np.uint16)
    assert np.array_equal(read(tmp_path / "blank_rescale.dcm")[0], expected)


def test_malformed_lut_is_one_clear_error_naming_the_file(tmp_path: Path):
    ds = pydicom.dcmread(MR)
    del ds.WindowCenter, ds.WindowWidth
    item = Dataset()
    item.add_new(0x00283006, "US", [0, 1, 2])  # LUTData without its LUTDescriptor
    ds.VOILUTSequence = [item]
    ds.save_as(tmp_path / "bad_lut.dcm")
    with pytest.raises(MedsegError, match=r"bad_lut\.dcm: cannot apply the file's rescale"):
        read(tmp_path / "bad_lut.dcm")[0]


# --- burned-in annotation and secondary captures ------------------------------------------


def _flagged(path: Path, **elements: object) -> Path:
    """MR_small with ``elements`` set as written (any case, padding or multiplicity)."""
    ds = pydicom.dcmread(MR)
    tags = {"BurnedInAnnotation": (0x00280301, "CS"), "ConversionType": (0x00080064, "CS")}
    with warnings.catch_warnings():  # pydicom warns of the invalid values written on purpose
        warnings.simplefilter("ignore")
        for keyword, value in elements.items():
            if keyword in tags:
                ds.add(DataElement(*tags[keyword], value))
            else:
                setattr(ds, keyword, value)
        ds.save_as(path)
    return path


@pytest.mark.parametrize(
    "value",
    ["YES", "yes ", "Yes", " YES\0\0", "YES\0", ["NO", "YES"], "NO\\yes", "Y", "UNKNOWN"],
)
def test_burned_in_annotation_is_refused_whatever_its_spelling(tmp_path: Path, value: object):
    path = _flagged(tmp_path / "burned.dcm", BurnedInAnnotation=value)
    with pytest.raises(MedsegError) as info:
        read(path)
    assert re.fullmatch(
        rf"{re.escape(str(path))}: BurnedInAnnotation is (YES|not NO), so the pixels may show "
        r"patient identifiers; remove or redact the file, or set convert\.allow_burned_in: true "
        r"once you have checked the images",
        str(info.value),
    )
    assert len(read(path, ReadOptions(allow_burned_in=True))) == 1


@pytest.mark.parametrize("value", ["NO", "no ", "NO\0", "", ["NO", "NO"]])
def test_burned_in_annotation_no_or_empty_is_read(tmp_path: Path, value: object):
    path = _flagged(tmp_path / "clean.dcm", BurnedInAnnotation=value)
    assert np.array_equal(read(path)[0], read(MR)[0])


SECONDARY_CAPTURE = "1.2.840.10008.5.1.4.1.1.7"


@pytest.mark.parametrize(
    "elements",
    [
        {"SOPClassUID": SECONDARY_CAPTURE},  # a screenshot without the flag
        {"SOPClassUID": SECONDARY_CAPTURE + ".4", "ConversionType": "WSD"},
        {"ConversionType": "SYN"},  # the SC equipment module alone marks a secondary capture
        {"ConversionType": "sd "},
    ],
)
def test_a_secondary_capture_is_refused_unless_it_says_no_burned_in(tmp_path: Path, elements):
    path = _flagged(tmp_path / "screen.dcm", **elements)
    with pytest.raises(MedsegError, match=r"screen\.dcm: a secondary capture \(screenshot"):
        read(path)
    assert len(read(path, ReadOptions(allow_burned_in=True))) == 1
    flagged = _flagged(tmp_path / "said_no.dcm", BurnedInAnnotation="NO", **elements)
    assert len(read(flagged)) == 1


def test_a_bundled_secondary_capture_is_refused_by_default():
    path = get_testdata_file("SC_rgb_rle.dcm")  # pydicom's own: SC, ConversionType SYN, no flag
    with pytest.raises(MedsegError, match="a secondary capture"):
        read(path)
