"""Masks from DICOM SEG objects: the real dcmqi SEG, and SEG objects made here with highdicom."""

from __future__ import annotations

import json
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
import pytest
from conftest import REPO, write_grey_dicom16
from PIL import Image
from pydicom.uid import generate_uid

from medseg.config.sections import ConvertConfig, DataConfig
from medseg.convert.dataset import convert_dataset
from medseg.errors import MedsegError
from medseg.io.images import read_raster
from medseg.io.seg import SegIndex, class_names, is_seg

DCMQI = REPO.parent / "shared" / "datasets" / "DCMQI_CT3_SEG"
WHOLE = ConvertConfig(None, None, fov_fallback="whole_image", workers=1)
CATEGORY = hd.sr.CodedConcept("123037004", "SCT", "Anatomical Structure")
ORGAN = hd.sr.CodedConcept("10200004", "SCT", "Liver")
LESION = hd.sr.CodedConcept("108369006", "SCT", "Neoplasm")


def _slices(folder: Path, n: int, size: tuple[int, int] = (24, 32)) -> list[pydicom.Dataset]:
    """``n`` 16-bit grey slices of one series as ``folder/sNN.dcm``, read back."""
    series = generate_uid()
    out = []
    for k in range(n):
        path = folder / f"s{k:02d}.dcm"
        image = np.full(size, 1000 + 100 * k, np.uint16)
        write_grey_dicom16(
            path, image, SOPInstanceUID=generate_uid(), SeriesInstanceUID=series,
            ImagePositionPatient=[0.0, 0.0, float(k)], InstanceNumber=k + 1,
        )  # fmt: skip
        out.append(pydicom.dcmread(path))
    return out


def _segmentation(
    sources: list[pydicom.Dataset], planes: np.ndarray, labels: list[str], path: Path
) -> Path:
    """A BINARY SEG of ``sources`` (planes: (frames, H, W, segments) bool) saved at ``path``."""
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=k + 1,
            segment_label=label,
            segmented_property_category=CATEGORY,
            segmented_property_type=ORGAN if k == 0 else LESION,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for k, label in enumerate(labels)
    ]
    seg = hd.seg.Segmentation(
        source_images=sources, pixel_array=planes.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=generate_uid(), series_number=9,
        sop_instance_uid=generate_uid(), instance_number=1, manufacturer="medseg tests",
        manufacturer_model_name="tests", software_versions="0", device_serial_number="0",
        omit_empty_frames=True,
    )  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    seg.save_as(path)
    return path


def _series_with_seg(root: Path) -> tuple[np.ndarray, np.ndarray]:
    """Training slices 0-2 and a test slice 3, one SEG for all four: an organ (segment 1) and a
    lesion inside it (segment 2, overlapping); slice 2 has neither (no frame in the SEG)."""
    train = _slices(root / "training" / "images", 3)
    test = _slices(root / "test" / "images", 1)
    for ds in test:  # one series across both folders, as a PACS export split by hand
        ds.SeriesInstanceUID = train[0].SeriesInstanceUID
        ds.ImagePositionPatient = [0.0, 0.0, 3.0]
        ds.save_as(root / "test" / "images" / "s00.dcm")
    sources = train + test
    planes = np.zeros((4, 24, 32, 2), bool)
    planes[[0, 1, 3], 4:20, 6:26, 0] = True  # the organ
    planes[[1, 3], 8:12, 10:16, 1] = True  # the lesion, inside the organ
    _segmentation(sources, planes, ["Liver", "Liver tumor"], root / "seg" / "all.dcm")
    labels = planes[..., 0].astype(np.uint8)
    labels[planes[..., 1]] = 2
    return labels[:3], labels[3:]


def test_one_seg_of_a_series_gives_each_slice_its_label_map(tmp_path: Path):
    truth_train, truth_test = _series_with_seg(tmp_path / "raw")
    data = DataConfig(str(tmp_path / "raw"), "folders", seg="seg")
    manifest = convert_dataset(data, WHOLE, tmp_path / "out")
    names = json.loads((tmp_path / "out" / "classes.json").read_text())["names"]
    assert names == ["background", "liver", "liver_tumor"]  # from the segment labels
    got = {r.case_id: read_raster(tmp_path / "out" / r.mask) for r in manifest.itertuples()}
    assert sorted(got) == ["s01", "s02", "test_s00", "train_s00"]  # s00 is in both splits
    for k, case in enumerate(["train_s00", "s01", "s02"]):
        assert np.array_equal(got[case], truth_train[k])
    assert np.array_equal(got["test_s00"], truth_test[0])
    assert (got["s01"] == 2).sum() == 4 * 6  # the lesion wins where they overlap
    assert not got["s02"].any()  # referenced, no frame: empty


def test_data_classes_picks_the_segment_numbers(tmp_path: Path):
    _series_with_seg(tmp_path / "raw")
    data = DataConfig(str(tmp_path / "raw"), "folders", seg="seg", classes={"tumor": 2})
    with pytest.raises(MedsegError, match=r"all\.dcm: mask value\(s\) 1 are not in data\.classes"):
        convert_dataset(data, WHOLE, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    data = DataConfig(str(tmp_path / "raw"), "folders", seg="seg",
                      classes={"organ": 1, "tumor": 2})  # fmt: skip
    convert_dataset(data, WHOLE, tmp_path / "out")
    names = json.loads((tmp_path / "out" / "classes.json").read_text())["names"]
    assert names == ["background", "organ", "tumor"]


def test_an_image_no_seg_refers_to_is_named(tmp_path: Path):
    _series_with_seg(tmp_path / "raw")
    stray = tmp_path / "raw" / "training" / "images" / "stray.dcm"
    write_grey_dicom16(stray, np.ones((24, 32), np.uint16), SOPInstanceUID=generate_uid())
    data = DataConfig(str(tmp_path / "raw"), "folders", seg="seg")
    with pytest.raises(MedsegError, match=r"stray\.dcm: no DICOM SEG object in data\.seg refers"):
        convert_dataset(data, WHOLE, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    skip = ConvertConfig(None, None, fov_fallback="whole_image", workers=1, on_error="skip")
    manifest = convert_dataset(data, skip, tmp_path / "out")
    assert len(manifest) == 4
    assert "stray.dcm" in (tmp_path / "out" / "skipped.csv").read_text()


def test_a_seg_mask_file_per_image_reads_as_binary(tmp_path: Path):
    root = tmp_path / "raw"
    sources = _slices(root / "images", 2)
    planes = np.zeros((2, 24, 32, 2), bool)
    planes[:, 2:9, 3:30, 0] = True
    planes[1, 12:20, 3:30, 1] = True
    for k, ds in enumerate(sources):  # masks/sNN.dcm: a SEG of its own image only
        path = root / "masks" / f"s{k:02d}.dcm"
        _segmentation([ds], planes[k : k + 1], ["Liver", "Spleen"], path)
    assert is_seg(root / "masks" / "s00.dcm") and not is_seg(root / "images" / "s00.dcm")
    data = DataConfig(str(root), "folders", test_fraction=0.5, group="file")  # one patient
    manifest = convert_dataset(data, WHOLE, tmp_path / "out")
    for row in manifest.itertuples():
        k = int(row.case_id[1:])
        assert np.array_equal(read_raster(tmp_path / "out" / row.mask) > 0, planes[k].any(axis=2))


def test_a_seg_of_another_size_is_refused(tmp_path: Path):
    root = tmp_path / "raw"
    sources = _slices(root / "images", 1, size=(16, 16))
    planes = np.ones((1, 16, 16, 1), bool)
    _segmentation(sources, planes, ["Liver"], root / "seg.dcm")
    write_grey_dicom16(
        root / "images" / "s00.dcm",
        np.ones((20, 16), np.uint16),
        SOPInstanceUID=sources[0].SOPInstanceUID,
    )  # fmt: skip  (the image was replaced by one of another size, same UID)
    data = DataConfig(str(root), "folders", seg="seg.dcm", test_fraction=0.5)
    with pytest.raises(MedsegError, match=r"seg\.dcm: its frames are 16x16 but the image .*16x20"):
        convert_dataset(data, WHOLE, tmp_path / "out")


def test_bad_data_seg_paths_and_files(tmp_path: Path):
    root = tmp_path / "raw"
    _slices(root / "images", 1)
    with pytest.raises(MedsegError, match=r"data\.seg: \.\./elsewhere is outside data\.root"):
        convert_dataset(DataConfig(str(root), "folders", seg="../elsewhere"), WHOLE, tmp_path / "o")
    (root / "seg").mkdir()
    with pytest.raises(MedsegError, match=r"data\.seg: no DICOM Segmentation object in"):
        convert_dataset(DataConfig(str(root), "folders", seg="seg"), WHOLE, tmp_path / "o")
    Image.fromarray(np.zeros((4, 4), np.uint8)).save(root / "seg" / "x.png")
    with pytest.raises(MedsegError, match=r"x\.png: not a readable DICOM file"):
        SegIndex.scan(root / "seg" / "x.png")
    with pytest.raises(MedsegError, match=r"data\.seg must be"):
        DataConfig(str(root), "folders", seg="  ")
    assert not (tmp_path / "o").exists()


def test_a_truncated_seg_is_one_clear_error(tmp_path: Path):
    _series_with_seg(tmp_path / "raw")
    path = tmp_path / "raw" / "seg" / "all.dcm"
    path.write_bytes(path.read_bytes()[:-200])  # the pixel data cut short
    data = DataConfig(str(tmp_path / "raw"), "folders", seg="seg")
    with pytest.raises(MedsegError, match=r"all\.dcm: cannot read the DICOM SEG"):
        convert_dataset(data, WHOLE, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_two_segs_that_disagree_on_a_name_are_refused(tmp_path: Path):
    one = _slices(tmp_path / "a", 1)
    two = _slices(tmp_path / "b", 1)
    planes = np.ones((1, 24, 32, 1), bool)
    first = _segmentation(one, planes, ["Liver"], tmp_path / "seg" / "a.dcm")
    _segmentation(two, planes, ["Kidney"], tmp_path / "seg" / "b.dcm")
    index = SegIndex.scan(tmp_path / "seg")
    assert index.mask_of(tmp_path / "a" / "s00.dcm") == first
    with pytest.raises(MedsegError, match=r"segment 1 is 'Kidney' but .*a\.dcm calls it 'Liver'"):
        class_names(index.headers)


@pytest.mark.skipif(not DCMQI.is_dir(), reason=f"{DCMQI} is absent (only in the dev checkout)")
def test_the_real_dcmqi_seg_equals_its_png_masks(tmp_path: Path):
    seg = convert_dataset(DataConfig(str(DCMQI), "folders", seg="seg"), WHOLE, tmp_path / "seg")
    png = convert_dataset(DataConfig(str(DCMQI), "folders"), WHOLE, tmp_path / "png")
    assert json.loads((tmp_path / "seg" / "classes.json").read_text())["names"] == [
        "background", "liver",
    ]  # fmt: skip
    assert len(seg) == len(png) == 3
    for a, b in zip(seg.itertuples(), png.itertuples(), strict=True):
        assert a.case_id == b.case_id
        from_seg = read_raster(tmp_path / "seg" / a.mask)
        from_png = read_raster(tmp_path / "png" / b.mask)
        assert from_seg.any() and np.array_equal(from_seg > 0, from_png > 0)
        image = read_raster(tmp_path / "seg" / a.image)
        assert np.array_equal(image, read_raster(tmp_path / "png" / b.image))
