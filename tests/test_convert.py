from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import re
import stat
import subprocess
import threading
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import DRIVE, REPO, tiny_params, write_grey_dicom16, write_params
from PIL import Image
from scipy import ndimage

from medseg.cli import main
from medseg.config import load_params
from medseg.config.sections import ConvertConfig, DataConfig, SynthesizeConfig
from medseg.convert.case import MANIFEST_COLUMNS
from medseg.convert.dataset import convert_dataset
from medseg.convert.fov import fov_from_image
from medseg.convert.pseudonyms import ID_KEY_ENV, id_key, key_fingerprint
from medseg.errors import MedsegError
from medseg.io.images import read_raster, write_png
from medseg.io.reader import read
from medseg.synthetic import generate_case, write_dataset


@pytest.fixture
def raw(tmp_path: Path) -> Path:
    params = tiny_params(synthesize={"dicom_fraction": 0.5})
    cfg = load_params(write_params(tmp_path / "p.yaml", params), SynthesizeConfig)
    write_dataset(cfg, tmp_path / "raw")
    return tmp_path / "raw"


def _convert(raw: Path, out: Path) -> pd.DataFrame:
    return convert_dataset(
        DataConfig(root=str(raw), layout="drive"), ConvertConfig(None, None), out
    )


def test_converts_tiff_and_dicom_losslessly(raw: Path, tmp_path: Path):
    out = tmp_path / "converted"
    manifest = _convert(raw, out)
    assert list(manifest.columns) == MANIFEST_COLUMNS
    assert sorted(manifest["source_format"].unique()) == ["dicom", "tiff"]
    assert (manifest["split"] == "train").sum() == 4 and (manifest["split"] == "test").sum() == 2
    assert pd.read_csv(out / "manifest.csv", dtype={"case_id": str}).equals(manifest)
    cfg = load_params(write_params(tmp_path / "p2.yaml", tiny_params()), SynthesizeConfig)
    row = manifest.set_index("case_id").loc["01_test"]  # synthetic case index 0
    case = generate_case(cfg, 0)
    assert np.array_equal(read(out / row["image"])[0], case.image)
    assert np.array_equal(read(out / row["mask"])[0] > 0, case.vessels)
    assert np.array_equal(read(out / row["fov"])[0] > 0, case.fov)
    assert row["bit_depth"] == 8 and row["channels"] == 3 and row["fov_source"] == "given"
    assert not any("SYNTHETIC" in str(v) for v in manifest.to_numpy().ravel())


def test_mismatched_mask_fails_without_partial_output(raw: Path, tmp_path: Path):
    write_png(raw / "training" / "1st_manual" / "04_manual1.gif", np.zeros((5, 5), np.uint8))
    out = tmp_path / "converted"
    with pytest.raises(MedsegError, match=re.escape("04_manual1.gif: mask is 5x5 but its image")):
        _convert(raw, out)
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["p.yaml", "raw"]


def test_corrupt_image_names_the_file(raw: Path, tmp_path: Path):
    victim = next((raw / "training" / "images").iterdir())
    victim.write_bytes(victim.read_bytes()[:100])
    with pytest.raises(MedsegError, match=victim.name):
        _convert(raw, tmp_path / "converted")
    assert not (tmp_path / "converted").exists()


@pytest.fixture(scope="module")
def drive(tmp_path_factory: pytest.TempPathFactory) -> tuple[pd.DataFrame, Path]:
    """The real DRIVE set converted once for the tests of this module."""
    if not DRIVE.is_dir():
        pytest.skip("the DRIVE data set is not in ../shared/datasets")
    out = tmp_path_factory.mktemp("drive") / "converted"
    return _convert(DRIVE, out), out


def test_real_drive_converts(drive: tuple[pd.DataFrame, Path]):
    manifest, out = drive
    assert len(manifest) == 40
    assert set(manifest["source_format"]) == {"tiff"}  # LZW-compressed, through imagecodecs
    assert (manifest[["height", "width", "channels"]] == [584, 565, 3]).all().all()
    row = manifest.set_index("case_id").loc["01_test"]
    assert row["source"] == "test/images/01_test.tif"
    vessels = read(out / row["mask"])[0] > 0
    fov = read(out / row["fov"])[0] > 0
    assert 0.08 < vessels[fov].mean() < 0.18  # DRIVE's vessel share inside the FOV is about 12%


# --- layouts, FOV from the image, frames, bad cases, names, workers ---


def _cfg(**changes: object) -> ConvertConfig:
    return dataclasses.replace(ConvertConfig(None, None, workers=1), **changes)  # type: ignore[arg-type]


def _disc_image(seed: int, h: int = 40, w: int = 48) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """An RGB 'fundus' on black (the FOV disc), a 0/255 mask and the disc itself."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 < (0.45 * min(h, w)) ** 2
    image = np.zeros((h, w, 3), np.uint8)
    image[disc] = rng.integers(90, 200, (int(disc.sum()), 3), dtype=np.uint8)
    mask = ((xx % 7 == 0) & disc).astype(np.uint8) * 255
    return image, mask, disc


def _folders(root: Path, n: int) -> dict[str, np.ndarray]:
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    discs = {}
    for i in range(n):
        image, mask, disc = _disc_image(i)
        Image.fromarray(image).save(root / "images" / f"case{i}.png")
        Image.fromarray(mask).save(root / "masks" / f"case{i}.png")
        discs[f"case{i}"] = disc
    return discs


def test_folders_layout_with_fov_from_the_image(tmp_path: Path):
    discs = _folders(tmp_path / "raw", 5)
    data = DataConfig(str(tmp_path / "raw"), "folders", test_fraction=0.4)
    manifest = convert_dataset(data, _cfg(), tmp_path / "out")
    assert len(manifest) == 5 and (manifest["split"] == "test").sum() == 2
    assert set(manifest["fov_source"]) == {"threshold"} and manifest["mask2"].isna().all()
    for row in manifest.itertuples():
        fov = read(tmp_path / "out" / row.fov)[0] > 0
        assert (fov == discs[row.case_id]).mean() > 0.97
        assert row.source == f"images/{row.case_id}.png"
    whole = convert_dataset(data, _cfg(fov_fallback="whole_image"), tmp_path / "out2")
    assert set(whole["fov_source"]) == {"whole_image"}
    assert (read(tmp_path / "out2" / whole["fov"][0])[0] == 255).all()


def test_black_image_has_no_fov_and_says_what_to_do(tmp_path: Path):
    _folders(tmp_path / "raw", 2)
    Image.fromarray(np.zeros((40, 48, 3), np.uint8)).save(tmp_path / "raw/images/case1.png")
    with pytest.raises(MedsegError, match=r"case1\.png: no field of view found above"):
        convert_dataset(DataConfig(str(tmp_path / "raw"), "folders"), _cfg(), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_multiframe_is_split_or_refused(tmp_path: Path):
    raw = tmp_path / "raw"
    for sub in ("images", "masks"):
        (raw / sub).mkdir(parents=True)
    stack = np.random.default_rng(0).integers(0, 65536, (3, 16, 20), dtype=np.uint16)
    masks = np.zeros((3, 16, 20), np.uint8)
    masks[:, 4:8, 5:9] = 255
    tifffile.imwrite(raw / "images" / "vol.tif", stack, photometric="minisblack")
    tifffile.imwrite(raw / "masks" / "vol.tif", masks, photometric="minisblack")
    data = DataConfig(str(raw), "folders", test_fraction=0.5)
    manifest = convert_dataset(data, _cfg(fov_fallback="whole_image"), tmp_path / "out")
    assert manifest["case_id"].tolist() == ["vol_f1", "vol_f2", "vol_f3"]
    assert set(manifest["source"]) == {"images/vol.tif"} and manifest["split"].nunique() == 1
    assert (manifest["bit_depth"] == 16).all()
    assert np.array_equal(read(tmp_path / "out" / "images" / "vol_f2.png")[0], stack[1])
    with pytest.raises(MedsegError, match=r"vol\.tif: holds 3 frames and convert\.multiframe"):
        convert_dataset(data, _cfg(multiframe="refuse"), tmp_path / "out3")
    short = masks[:2]
    tifffile.imwrite(raw / "masks" / "vol.tif", short, photometric="minisblack")
    with pytest.raises(MedsegError, match=r"vol\.tif: mask has 2 frames but its image has 3"):
        convert_dataset(data, _cfg(), tmp_path / "out4")


def test_16_bit_kept_or_reduced_to_8(tmp_path: Path):
    raw = tmp_path / "raw"
    for sub in ("images", "masks"):
        (raw / sub).mkdir(parents=True)
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    tifffile.imwrite(raw / "images" / "ramp.tif", ramp)
    tifffile.imwrite(raw / "masks" / "ramp.tif", (ramp > 30000).astype(np.uint8))
    (raw / "images" / "b.tif").write_bytes((raw / "images" / "ramp.tif").read_bytes())
    (raw / "masks" / "b.tif").write_bytes((raw / "masks" / "ramp.tif").read_bytes())
    data = DataConfig(str(raw), "folders")
    kept = convert_dataset(data, _cfg(fov_fallback="whole_image"), tmp_path / "o16")
    assert np.array_equal(read(tmp_path / "o16" / kept["image"][0])[0], ramp)
    assert (kept["bit_depth"] == 16).all()
    small = convert_dataset(
        data, _cfg(fov_fallback="whole_image", max_bit_depth=8), tmp_path / "o8"
    )
    eight = read(tmp_path / "o8" / small["image"][0])[0]
    assert eight.dtype == np.uint8 and eight.min() == 0 and eight.max() == 255
    assert (small["bit_depth"] == 8).all()


def _broken_set(raw: Path) -> None:
    """Five good cases and one of each problem a user brings."""
    _folders(raw, 5)
    Image.fromarray(_disc_image(9)[0]).save(raw / "images" / "nomask.png")
    (raw / "images" / "empty.png").write_bytes(b"")
    (raw / "masks" / "empty.png").write_bytes((raw / "masks" / "case0.png").read_bytes())
    Image.fromarray(_disc_image(8)[0]).save(raw / "images" / "labels.png")
    Image.fromarray(np.arange(40 * 48, dtype=np.uint8).reshape(40, 48) % 3).save(
        raw / "masks" / "labels.png"
    )
    Image.fromarray(_disc_image(7)[0]).save(raw / "images" / "small.png")
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(raw / "masks" / "small.png")


BROKEN = {
    "images/nomask.png": "no mask",
    "images/empty.png": "cannot read png image",
    "images/labels.png": "mask is not binary (3 values: 0, 1, 2)",
    "images/small.png": "mask is 10x10 but its image is 48x40",
}


def test_on_error_skip_lists_every_bad_case(tmp_path: Path):
    raw = tmp_path / "raw"
    _broken_set(raw)
    data = DataConfig(str(raw), "folders")
    manifest = convert_dataset(data, _cfg(on_error="skip"), tmp_path / "out")
    assert sorted(manifest["case_id"]) == [f"case{i}" for i in range(5)]
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert sorted(skipped["source"]) == sorted(BROKEN)
    for source, reason in zip(skipped["source"], skipped["reason"], strict=True):
        assert BROKEN[source] in reason and Path(source).name in reason
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    groups = report.pop("groups")
    assert report == {"cases": 5, "source_images": 5, "skipped": 4, "on_error": "skip"}
    assert groups["from"] == {"file": 5} and groups["train"] + groups["test"] == 5
    assert sorted(p.name for p in (tmp_path / "out" / "images").iterdir()) == [
        f"case{i}.png" for i in range(5)
    ]


@pytest.mark.parametrize("name", sorted(BROKEN))
def test_on_error_fail_names_the_file_and_leaves_nothing(tmp_path: Path, name: str):
    raw = tmp_path / "raw"
    _broken_set(raw)
    for other in set(BROKEN) - {name}:
        (raw / other).unlink()
    with pytest.raises(MedsegError, match=re.escape(BROKEN[name])) as info:
        convert_dataset(DataConfig(str(raw), "folders"), _cfg(), tmp_path / "out")
    assert Path(name).name in str(info.value) and "on_error: skip" in str(info.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw"]


def test_zero_usable_cases_is_an_error_even_when_skipping(tmp_path: Path):
    raw = tmp_path / "raw"
    _broken_set(raw)
    for i in range(5):
        (raw / "masks" / f"case{i}.png").unlink()
    with pytest.raises(MedsegError, match="no usable case: all 9 were skipped"):
        convert_dataset(DataConfig(str(raw), "folders"), _cfg(on_error="skip"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_empty_data_set(tmp_path: Path):
    (tmp_path / "raw" / "images").mkdir(parents=True)
    with pytest.raises(MedsegError, match="no cases found in the folders layout"):
        convert_dataset(DataConfig(str(tmp_path / "raw"), "folders"), _cfg(), tmp_path / "out")


def _dicom_with_patient(path: Path, ramp: np.ndarray) -> None:
    write_grey_dicom16(
        path, ramp, PatientName="DOE^JANE", PatientID="PID-98765", PatientBirthDate="19700101"
    )


def test_no_patient_identifier_reaches_the_outputs(tmp_path: Path, monkeypatch):
    monkeypatch.setenv(ID_KEY_ENV, KEY_A)
    raw = tmp_path / "raw"
    ramp = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50).astype(np.uint16)
    uid = "1.2.826.0.1.3680043.8.498.1234567"
    (raw / "masks").mkdir(parents=True)
    for stem in ("a", uid):
        _dicom_with_patient(raw / "images" / f"{stem}.dcm", ramp)
        write_png(raw / "masks" / f"{stem}.png", ramp > 30000)
    data = DataConfig(str(raw), "folders", group="file", test_fraction=0.5)
    with pytest.raises(MedsegError, match=r"holds a DICOM UID .* set convert\.names: hash"):
        convert_dataset(data, _cfg(fov_fallback="whole_image"), tmp_path / "out")
    manifest = convert_dataset(
        data, _cfg(fov_fallback="whole_image", names="hash"), tmp_path / "out"
    )
    assert all(re.fullmatch(r"h[0-9a-f]{12}", i) for i in manifest["case_id"])
    assert all(re.fullmatch(r"hmac:[0-9a-f]{16}", s) for s in manifest["source"])
    written = "\n".join(
        [p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")]
        + [(tmp_path / "out" / f).read_text() for f in ("manifest.csv", "skipped.csv")]
    )
    for secret in ("DOE", "JANE", "PID-98765", "19700101", uid, "a.dcm"):
        assert secret not in written
    assert np.array_equal(read(tmp_path / "out" / manifest["image"][0])[0], ramp)


def test_workers_give_the_same_result_as_one_process(tmp_path: Path):
    _folders(tmp_path / "raw", 6)
    data = DataConfig(str(tmp_path / "raw"), "folders")
    one = convert_dataset(data, _cfg(workers=1), tmp_path / "one")
    two = convert_dataset(data, _cfg(workers=2), tmp_path / "two")  # fork on Linux
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()  # another thread runs: workers are spawned instead
    try:
        spawned = convert_dataset(data, _cfg(workers=2), tmp_path / "spawned")
    finally:
        stop.set()
        other.join()
    assert one.equals(two) and one.equals(spawned)
    for row in one.itertuples():
        for col in ("image", "mask", "fov"):
            a, b, c = (tmp_path / d / getattr(row, col) for d in ("one", "two", "spawned"))
            assert a.read_bytes() == b.read_bytes() == c.read_bytes()


def test_real_drive_masks_binary_second_observer_and_fov_from_image(
    drive: tuple[pd.DataFrame, Path],
):
    manifest, out = drive
    assert (manifest["fov_source"] == "given").all()
    test = manifest[manifest["split"] == "test"]
    assert (
        test["mask2"].notna().all()
        and manifest.loc[manifest["split"] == "train", "mask2"].isna().all()
    )
    row = test.iloc[0]
    for col in ("mask", "fov", "mask2"):
        assert set(np.unique(read(out / row[col])[0])) == {0, 255}
    m1 = read(out / row["mask"])[0] > 0
    m2 = read(out / row["mask2"])[0] > 0
    fov = read(out / row["fov"])[0] > 0
    agreement = (m1 == m2)[fov].mean()
    assert 0.92 < agreement < 0.97  # the second observer's accuracy is about 0.947 in DRIVE papers
    for case in manifest.itertuples():
        if case.case_id in ("01_test", "21_training", "40_training"):
            image = read(out / case.image)[0]
            given = read(out / case.fov)[0] > 0
            made = fov_from_image(image, 0.1)
            assert (made & given).sum() / (made | given).sum() > 0.97


def test_fov_from_image_is_the_median_of_the_threshold_filled_and_eroded():
    rng = np.random.default_rng(3)
    _, _, disc = _disc_image(0, 60, 70)
    image = np.where(disc, rng.integers(60, 255, disc.shape), 0).astype(np.uint8)
    image[rng.random(disc.shape) < 0.05] = 0  # dead pixels inside: the median keeps them in
    image[28:32, 30:36] = 0  # a dark lesion: a hole, filled
    image[2, 2] = image[2, 3] = 255  # specks outside: the median drops them
    reference = ndimage.binary_fill_holes(ndimage.median_filter(image, size=5) > 25.5)
    made = fov_from_image(image, 0.1)
    assert np.array_equal(made, reference) and made[30, 33] and not made[2, 2]
    eroded = fov_from_image(image, 0.1, erode=3)
    assert eroded.sum() < made.sum() and not (eroded & ~made).any()
    assert not eroded[np.nonzero(made[:, 35])[0][0], 35]  # the rim went
    assert not fov_from_image(np.zeros((9, 9), np.uint16), 0.1).any()


def test_window_override_applies_to_images_not_to_dicom_masks(tmp_path: Path):
    raw = tmp_path / "raw"
    ramp = (np.arange(32 * 40, dtype=np.uint16).reshape(32, 40) * 50).astype(np.uint16)
    truth = ramp > 30000
    for stem in ("a", "b"):
        _dicom_with_patient(raw / "images" / f"{stem}.dcm", ramp)
        _dicom_with_patient(raw / "masks" / f"{stem}.dcm", truth.astype(np.uint16))
    cfg = _cfg(fov_fallback="whole_image", window_center=30000.0, window_width=2000.0)
    manifest = convert_dataset(DataConfig(str(raw), "folders", group="file"), cfg, tmp_path / "out")
    image = read(tmp_path / "out" / manifest["image"][0])[0]
    assert image.min() == 0 and image.max() == 65535  # the window clipped the ramp
    assert np.array_equal(read(tmp_path / "out" / manifest["mask"][0])[0] > 0, truth)


def _label_set(root: Path, values: list[int]) -> None:
    """Two grey PNG cases whose masks are label maps holding ``values``, in the folders layout."""
    for split in ("train", "test"):
        for sub in ("images", "masks"):
            (root / split / sub).mkdir(parents=True, exist_ok=True)
        mask = np.zeros((20, 30), np.uint8)
        for k, v in enumerate(values):
            mask[2 + 4 * k : 5 + 4 * k, 3:20] = v
        write_png(root / split / "images" / "0001.png", np.full((20, 30), 90, np.uint8))
        write_png(root / split / "masks" / "0001.png", mask)


def test_label_maps_are_mapped_to_the_named_classes(tmp_path: Path):
    _label_set(tmp_path / "raw", [63, 126, 189])
    data = DataConfig(str(tmp_path / "raw"), "folders",
                      classes={"liver": 63, "kidney": [126, 189]})  # fmt: skip
    cfg = ConvertConfig(None, None, fov_fallback="whole_image")
    manifest = convert_dataset(data, cfg, tmp_path / "c")
    assert json.loads((tmp_path / "c" / "classes.json").read_text()) == {
        "names": ["background", "liver", "kidney"]
    }
    # the same file name under both splits is two cases
    assert len(manifest) == 2 and manifest["case_id"].is_unique
    mask = read_raster(tmp_path / "c" / manifest["mask"][0])
    assert set(np.unique(mask)) == {0, 1, 2} and (mask == 2).sum() == 2 * 3 * 17


def test_a_mask_value_not_in_data_classes_is_one_error_and_no_output(tmp_path: Path):
    _label_set(tmp_path / "raw", [1, 7])
    data = DataConfig(str(tmp_path / "raw"), "folders", classes={"liver": 1})
    with pytest.raises(MedsegError, match=r"0001\.png: mask value\(s\) 7 are not in data\.classes"):
        convert_dataset(data, ConvertConfig(None, None), tmp_path / "c")
    assert not (tmp_path / "c").exists()


def test_binary_data_sets_name_their_one_class_foreground(tmp_path: Path):
    _label_set(tmp_path / "raw", [255])
    convert_dataset(DataConfig(str(tmp_path / "raw"), "folders"), ConvertConfig(None, None),
                    tmp_path / "c")  # fmt: skip
    names = json.loads((tmp_path / "c" / "classes.json").read_text())["names"]
    assert names == ["background", "foreground"]


def test_every_common_raster_format_converts(tmp_path: Path):
    root = tmp_path / "raw"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i, ext in enumerate(("ppm", "pgm", "webp", "jp2", "bmp", "tga")):
        mode = "L" if ext == "pgm" else "RGB"
        shape = (24, 32) if mode == "L" else (24, 32, 3)
        kw = {"lossless": True} if ext == "webp" else {}
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(
            root / "images" / f"c{i}.{ext}", **kw
        )
        write_png(root / "masks" / f"c{i}.png", np.eye(24, 32, dtype=bool))
    manifest = convert_dataset(DataConfig(str(root), "folders", test_fraction=0.34),
                               ConvertConfig(None, None, fov_fallback="whole_image"),
                               tmp_path / "c")  # fmt: skip
    assert len(manifest) == 6 and set(manifest["height"]) == {24}


def test_a_folder_of_files_no_reader_takes_is_named_not_empty(tmp_path: Path):
    root = tmp_path / "raw"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i in range(3):
        (root / "images" / f"scan{i}.xyz").write_bytes(b"\x00" * 64)
        write_png(root / "masks" / f"scan{i}.png", np.zeros((4, 4), bool))
    with pytest.raises(MedsegError, match=r"scan0\.xyz: not an image type medseg reads") as info:
        convert_dataset(DataConfig(str(root), "folders"), ConvertConfig(None, None),
                        tmp_path / "c")  # fmt: skip
    assert "empty" not in str(info.value)
    assert not (tmp_path / "c").exists()


def test_file_browser_leftovers_in_images_are_not_cases(tmp_path: Path):
    _folders(tmp_path / "raw", 3)
    for name in ("Thumbs.db", "desktop.ini", ".DS_Store"):
        (tmp_path / "raw" / "images" / name).write_bytes(b"\x00" * 16)
    manifest = convert_dataset(DataConfig(str(tmp_path / "raw"), "folders", test_fraction=0.34),
                               _cfg(), tmp_path / "c")  # fmt: skip
    assert len(manifest) == 3
    assert len(pd.read_csv(tmp_path / "c" / "skipped.csv")) == 0


def test_a_thresholded_fov_that_cuts_away_labelled_anatomy_is_refused(tmp_path: Path):
    """A dark structure at the border (air, lungs, a dark lesion) is not a surround: the
    threshold made for fundus photographs would drop it from training and scoring."""
    root = tmp_path / "raw"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    image = np.full((40, 48), 160, np.uint8)
    image[:, :14] = 5  # a dark lesion reaching the left border
    mask = np.zeros((40, 48), np.uint8)
    mask[10:30, 2:20] = 255  # labelled: mostly inside the dark part
    for k in range(2):
        write_png(root / "images" / f"c{k}.png", image)
        write_png(root / "masks" / f"c{k}.png", mask)
    data = DataConfig(str(root), "folders", test_fraction=0.5)
    with pytest.raises(MedsegError, match=r"c\d\.png: 50\.0% of the labelled pixels lie well "
                       r"outside.*convert\.fov_fallback: whole_image"):  # fmt: skip
        convert_dataset(data, _cfg(), tmp_path / "out")
    assert not (tmp_path / "out").exists()
    manifest = convert_dataset(data, _cfg(fov_fallback="whole_image"), tmp_path / "out")
    assert len(manifest) == 2
    # labels that cross the rim by a few pixels (vessels at a fundus rim) are not refused
    mask[:] = 0
    mask[10:30, 12:40] = 255  # 2 of its 28 columns in the dark part, next to the rim
    for k in range(2):
        write_png(root / "masks" / f"c{k}.png", mask)
    assert len(convert_dataset(data, _cfg(), tmp_path / "out2")) == 2


# --- convert.names: hash: a keyed hash, and no name from a path in any output ----------------

KEY_A = "a1" * 32  # test keys; a real one comes from secrets.token_hex(32)
KEY_B = "b2" * 32
PATIENT = "SMITHJOHN"


def _named_set(raw: Path) -> None:
    """`_broken_set` with a patient's name in every file name, and a stray text file."""
    _broken_set(raw)
    for path in [p for p in raw.rglob("*") if p.is_file()]:
        path.rename(path.with_name(f"{PATIENT}_{path.name}"))
    (raw / "images" / f"{PATIENT}_notes.txt").write_text("not an image")


def _everything_written(out: Path) -> str:
    names = [p.relative_to(out).as_posix() for p in out.rglob("*")]
    texts = [p.read_text() for p in out.rglob("*") if p.suffix in (".csv", ".json")]
    return "\n".join(names + texts)


def test_names_hash_keeps_every_name_out_of_outputs_and_logs(tmp_path: Path, monkeypatch, caplog):
    monkeypatch.setenv(ID_KEY_ENV, KEY_A)
    raw = tmp_path / "raw"
    _named_set(raw)
    data = DataConfig(str(raw), "folders")
    with caplog.at_level("DEBUG"):
        manifest = convert_dataset(data, _cfg(on_error="skip", names="hash"), tmp_path / "out")
    written = _everything_written(tmp_path / "out") + caplog.text
    assert PATIENT not in written and "nomask" not in written and "notes" not in written
    assert str(raw) not in written.replace(f"{raw}:", "")  # the root is a param, not a name
    assert len(manifest) == 5 and all(
        re.fullmatch(r"h[0-9a-f]{12}", i) for i in manifest["case_id"]
    )
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    assert len(skipped) == 5 and all(
        re.fullmatch(r"hmac:[0-9a-f]{16}", s) for s in skipped["source"]
    )
    for reason in skipped["reason"]:  # the file each names is its token (image or mask)
        assert re.match(r"hmac:[0-9a-f]{16}: ", reason), reason
    reasons = " ".join(skipped["reason"])
    for why in ("mask is 10x10 but its image is 48x40", "cannot read png image", "0/255 PNG"):
        assert why in reasons
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["id_key"] == key_fingerprint(bytes.fromhex(KEY_A))


@pytest.mark.parametrize("name", ["images/nomask.png", "images/small.png"])
def test_names_hash_keeps_names_out_of_a_failing_runs_message(
    tmp_path: Path, monkeypatch, name: str
):
    monkeypatch.setenv(ID_KEY_ENV, KEY_A)
    raw = tmp_path / "raw"
    _named_set(raw)
    (raw / "images" / f"{PATIENT}_notes.txt").unlink()
    for other in set(BROKEN) - {name}:
        (raw / Path(other).parent / f"{PATIENT}_{Path(other).name}").unlink()
    with pytest.raises(MedsegError, match=re.escape(BROKEN[name])) as info:
        convert_dataset(DataConfig(str(raw), "folders"), _cfg(names="hash"), tmp_path / "out")
    assert PATIENT not in str(info.value) and "hmac:" in str(info.value)
    assert not (tmp_path / "out").exists()


def test_hash_ids_depend_on_the_key_and_cannot_be_found_by_hashing_names(tmp_path: Path):
    _folders(tmp_path / "raw", 3)
    data = DataConfig(str(tmp_path / "raw"), "folders")
    ids = {}
    for run, key in (("a1", KEY_A), ("a2", KEY_A), ("b", KEY_B)):
        out = tmp_path / run
        manifest = convert_dataset(data, _cfg(names="hash"), out, key=bytes.fromhex(key))
        ids[run] = sorted(manifest["case_id"])
        assert json.loads((out / "report.json").read_text())["id_key"] == key_fingerprint(
            bytes.fromhex(key)
        )
    assert ids["a1"] == ids["a2"] and not set(ids["a1"]) & set(ids["b"])
    unkeyed = {
        "h" + hashlib.sha256(f"images/case{i}.png".encode()).hexdigest()[:12] for i in range(3)
    }
    assert not unkeyed & set(ids["a1"])


def test_the_id_key_is_created_once_private_and_found_from_a_dvc_temporary_copy(
    tmp_path: Path, monkeypatch
):
    monkeypatch.delenv(ID_KEY_ENV, raising=False)
    repo = tmp_path / "repo"
    copy = repo / ".dvc" / "tmp" / "exps" / "tmp123"  # where `dvc exp run --temp` works
    copy.mkdir(parents=True)
    key = id_key(copy)  # the first use, from the temporary copy: the key goes to the repo
    path = repo / ".medseg" / "id_key"
    assert path.is_file() and not (copy / ".medseg").exists() and len(key) == 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert (repo / ".medseg" / ".gitignore").read_text() == "*\n"
    assert id_key(repo) == key and id_key(copy) == key
    path.chmod(0o644)
    with pytest.raises(MedsegError, match=r"readable by other users; run `chmod 600 "):
        id_key(repo)
    path.chmod(0o600)
    monkeypatch.setenv(ID_KEY_ENV, KEY_B)  # the environment wins over the file
    assert id_key(repo) == bytes.fromhex(KEY_B)
    monkeypatch.setenv(ID_KEY_ENV, "secret")
    with pytest.raises(MedsegError, match=r"\$MEDSEG_ID_KEY: the id key .* 32 or more hex"):
        id_key(repo)


def test_the_repository_never_commits_the_id_key():
    if not (REPO / ".git").exists():
        pytest.skip("not a git checkout")
    proc = subprocess.run(
        ["git", "check-ignore", "-q", ".medseg/id_key"], cwd=REPO, capture_output=True
    )
    assert proc.returncode == 0


def test_find_source_names_the_file_behind_a_token(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setenv(ID_KEY_ENV, KEY_A)
    raw = tmp_path / "raw"
    _named_set(raw)
    data = DataConfig(str(raw), "folders")
    convert_dataset(data, _cfg(on_error="skip", names="hash"), tmp_path / "out")
    skipped = pd.read_csv(tmp_path / "out" / "skipped.csv")
    token = skipped["source"][skipped["reason"].str.contains("no mask")].item()
    params = write_params(
        tmp_path / "p.yaml", tiny_params(data={"root": str(raw), "layout": "folders"})
    )
    with pytest.raises(SystemExit) as code:
        main(["find-source", "--params", str(params), token, "hmac:0000000000000000"])
    assert code.value.code == 0
    assert capsys.readouterr().out.splitlines() == [
        f"{token}: {raw / 'images' / f'{PATIENT}_nomask.png'}",
        f"hmac:0000000000000000: no file under {raw}",
    ]
    monkeypatch.delenv(ID_KEY_ENV)
    monkeypatch.chdir(tmp_path)  # no key here: nothing is created, one line says so
    with pytest.raises(SystemExit) as code:
        main(["find-source", "--params", str(params), token])
    assert code.value.code != 0 and "no id key" in capsys.readouterr().err
    assert not (tmp_path / ".medseg").exists()


def test_auto_fov_thresholds_every_case_alike_and_preprocess_applies_the_plan(tmp_path: Path):
    """fov_fallback auto: convert makes the FOV by threshold for every case from its image (a
    photograph on black and a dark lesion at the border alike), records the share of labels it
    leaves out (fov_cut) without refusing or switching; preprocess then uses or drops all the
    made FOVs as the plan decides, and passes the decision on in convert.json for predict."""
    from medseg.config.sections import PreprocessConfig
    from medseg.io.shards import CaseStore
    from medseg.preprocess.dataset import preprocess_dataset

    root = tmp_path / "raw"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for k in range(2):
        image, mask, _ = _disc_image(k)
        write_png(root / "images" / f"disc{k}.png", image)
        write_png(root / "masks" / f"disc{k}.png", mask)
    dark = np.full((40, 48, 3), 160, np.uint8)
    dark[:, :14] = 5
    cut = np.zeros((40, 48), np.uint8)
    cut[10:30, 2:20] = 255
    for k in range(2):
        write_png(root / "images" / f"lesion{k}.png", dark)
        write_png(root / "masks" / f"lesion{k}.png", cut)
    data = DataConfig(str(root), "folders", test_fraction=0.5, split_seed=1)
    manifest = convert_dataset(data, _cfg(fov_fallback="auto"), tmp_path / "c")
    assert set(manifest["fov_source"]) == {"threshold"}
    share = dict(zip(manifest["case_id"], manifest["fov_cut"], strict=True))
    assert all(share[c] == 0 for c in share if c.startswith("disc"))
    assert all(share[c] == pytest.approx(0.5, abs=0.05) for c in share if c.startswith("lesion"))
    pre = PreprocessConfig("green", 0.0, 0)
    with pytest.raises(MedsegError, match=r"converted with convert\.fov_fallback: auto"):
        preprocess_dataset(pre, tmp_path / "c", tmp_path / "p0")
    assert not (tmp_path / "p0").exists()
    for decision in ("threshold", "whole_image"):
        out = tmp_path / f"p-{decision}"
        preprocess_dataset(pre, tmp_path / "c", out, fov_fallback=decision)
        record = json.loads((out / "convert.json").read_text())
        assert record["fov_fallback"] == decision
        for split in ("train", "test"):
            store = CaseStore.open(out, split)
            for i in store:
                fov = np.asarray(store.get(i, "fov"), bool)
                assert fov.all() == (decision == "whole_image")


def test_a_test_cases_labels_never_choose_its_fov(tmp_path: Path, caplog):
    """Labels painted into the dark surround of one test photograph: under auto its FOV is
    made from its image like every other case's (not switched to the whole image), the cut is
    named in the log, and the plan, which reads training cases only, still says threshold."""
    from medseg.planning.fingerprint import fingerprint
    from medseg.planning.plan import plan

    discs = _folders(tmp_path / "raw", 6)
    data = DataConfig(str(tmp_path / "raw"), "folders", test_fraction=0.34, split_seed=0)
    first = convert_dataset(data, _cfg(fov_fallback="auto"), tmp_path / "c0")
    victim = first.loc[first["split"] == "test", "case_id"].iloc[0]
    mask = np.zeros((40, 48), np.uint8)
    mask[:, :6] = 255  # all of it in the black surround, left of the disc
    Image.fromarray(mask).save(tmp_path / "raw" / "masks" / f"{victim}.png")
    with caplog.at_level(logging.WARNING):
        manifest = convert_dataset(data, _cfg(fov_fallback="auto"), tmp_path / "c")
    row = manifest.set_index("case_id").loc[victim]
    assert row["fov_source"] == "threshold" and row["fov_cut"] > 0.5
    fov = read(tmp_path / "c" / row["fov"])[0] > 0
    assert (fov == discs[victim]).mean() > 0.97  # the disc, as for the other cases
    assert "test case(s) whose thresholded FOV" in caplog.text and victim in caplog.text
    result = plan(fingerprint(tmp_path / "c"), {}, 0.1, 1.0)
    assert result["params"]["convert"]["fov_fallback"] == "threshold"
