from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import DRIVE, tiny_params, write_params

from medseg.config import ConvertConfig, DataConfig, SynthesizeConfig, load_params
from medseg.convert import MANIFEST_COLUMNS, convert_dataset
from medseg.errors import MedsegError
from medseg.io.images import read_image, write_png
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
    assert np.array_equal(read_image(out / row["image"]), case.image)
    assert np.array_equal(read_image(out / row["mask"]) > 0, case.vessels)
    assert np.array_equal(read_image(out / row["fov"]) > 0, case.fov)
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


@pytest.mark.skipif(not DRIVE.is_dir(), reason="the DRIVE data set is not in ../shared/datasets")
def test_real_drive_converts(tmp_path: Path):
    manifest = _convert(DRIVE, tmp_path / "converted")
    assert len(manifest) == 40
    assert set(manifest["source_format"]) == {"tiff"}  # LZW-compressed, through imagecodecs
    assert (manifest[["height", "width", "channels"]] == [584, 565, 3]).all().all()
    row = manifest.set_index("case_id").loc["01_test"]
    assert row["source"] == "test/images/01_test.tif"
    vessels = read_image(tmp_path / "converted" / row["mask"]) > 0
    fov = read_image(tmp_path / "converted" / row["fov"]) > 0
    assert 0.08 < vessels[fov].mean() < 0.18  # DRIVE's vessel share inside the FOV is about 12%
