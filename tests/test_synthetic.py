from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_params, write_params
from scipy import ndimage

from medseg.config import load_params
from medseg.config.sections import SynthesizeConfig
from medseg.io.images import binarize
from medseg.io.reader import read
from medseg.synthetic import generate_case, write_dataset


@pytest.fixture
def cfg(tmp_path: Path) -> SynthesizeConfig:
    params = tiny_params(synthesize={"height": 200, "width": 192, "n_train": 3, "n_test": 2})
    return load_params(write_params(tmp_path / "p.yaml", params), SynthesizeConfig)


def test_same_seed_same_case_other_seed_other_case(cfg: SynthesizeConfig):
    a, b = generate_case(cfg, 0), generate_case(cfg, 0)
    assert np.array_equal(a.image, b.image) and np.array_equal(a.vessels, b.vessels)
    other = generate_case(SynthesizeConfig(**{**cfg.__dict__, "seed": 1}), 0)
    assert not np.array_equal(a.vessels, other.vessels)
    assert not np.array_equal(generate_case(cfg, 1).vessels, a.vessels)


def test_case_looks_like_a_fundus(cfg: SynthesizeConfig):
    case = generate_case(cfg, 0)
    assert case.image.shape == (200, 192, 3) and case.image.dtype == np.uint8
    # circular FOV covering about pi * 0.47^2 of the square
    assert 0.55 < case.fov.mean() / (192 / 200) < 0.8
    assert not case.vessels[~case.fov].any()
    fraction = case.vessels[case.fov].mean()
    assert 0.03 < fraction < 0.25, fraction
    # vessels are darker than background, mostly in green
    img = case.image.astype(float)
    background = case.fov & ~ndimage.binary_dilation(case.vessels, iterations=3)
    contrast = [img[..., c][background].mean() - img[..., c][case.vessels].mean() for c in range(3)]
    assert contrast[1] > 0 and contrast[1] > contrast[0]
    # outside the FOV is dark
    assert img[~case.fov].mean() < 10


def _widths(vessel_width_max: float) -> np.ndarray:
    cfg = SynthesizeConfig(
        seed=3, n_train=1, n_test=1, height=440, width=424, dicom_fraction=0.0,
        vessel_width_max=vessel_width_max, vessel_width_min=1.0, noise=0.03,
    )  # fmt: skip
    case = generate_case(cfg, 0)
    # about twice the distance to the background, at the centre line: the local width
    width = 2 * ndimage.distance_transform_edt(case.vessels) - 1
    # on the disc the trunks start on top of each other: measure away from it
    x, y, r = case.disc
    yy, xx = np.mgrid[: cfg.height, : cfg.width]
    away = np.hypot(xx - x, yy - y) > 1.5 * r
    return width[case.vessels & away]


def test_vessel_widths_taper_from_max_to_min():
    widths = _widths(8.0)
    # (the maximum is larger where branches split: the inscribed circle of a fork is wider)
    assert 6.0 <= np.percentile(widths, 99) <= 9.0
    assert np.mean(widths <= 2.0) > 0.5  # most vessel pixels belong to thin vessels
    assert np.percentile(_widths(4.0), 99) < np.percentile(widths, 99) - 2


def test_write_dataset_drive_layout_with_dicom(cfg: SynthesizeConfig, tmp_path: Path):
    cfg = SynthesizeConfig(**{**cfg.__dict__, "dicom_fraction": 0.4})
    out = tmp_path / "synthetic"
    assert write_dataset(cfg, out) == 5
    test_images = sorted(p.name for p in (out / "test" / "images").iterdir())
    train_images = sorted(p.name for p in (out / "training" / "images").iterdir())
    assert [n.split(".")[0] for n in test_images] == ["01_test", "02_test"]
    assert [n.split(".")[0] for n in train_images] == ["03_training", "04_training", "05_training"]
    suffixes = [n.rsplit(".", 1)[1] for n in test_images + train_images]
    assert suffixes.count("dcm") == 2 and suffixes.count("tif") == 3
    mask = binarize(read(out / "training" / "1st_manual" / "03_manual1.gif")[0])
    fov = binarize(read(out / "training" / "mask" / "03_training_mask.gif")[0])
    case = generate_case(cfg, 2)
    assert np.array_equal(mask, case.vessels) and np.array_equal(fov, case.fov)
    image_file = next((out / "training" / "images").glob("03_training.*"))
    assert np.array_equal(read(image_file)[0], case.image)  # TIFF and DICOM both lossless


def test_write_dataset_is_byte_identical(cfg: SynthesizeConfig, tmp_path: Path):
    cfg = SynthesizeConfig(**{**cfg.__dict__, "dicom_fraction": 0.5})
    write_dataset(cfg, tmp_path / "a")
    write_dataset(cfg, tmp_path / "b")
    files = sorted(
        p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file()
    )
    assert len(files) == 15
    for rel in files:
        assert (tmp_path / "a" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
