from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medseg.config import ConvertConfig, DataConfig, PreprocessConfig, SynthesizeConfig
from medseg.convert import convert_dataset
from medseg.errors import MedsegError
from medseg.io.images import read_raster, write_png
from medseg.preprocess import (
    RECORD,
    clahe,
    crop_to,
    load_record,
    load_split,
    normalize_in_fov,
    pad_to,
    padded_size,
    prepare_image,
    preprocess_dataset,
    select_channel,
    split_cases,
)
from medseg.synthetic import write_dataset


@pytest.mark.parametrize(
    ("size", "expected"), [((565, 584), (576, 608)), ((32, 64), (32, 64)), ((1, 33), (32, 64))]
)
def test_padded_size(size: tuple[int, int], expected: tuple[int, int]):
    assert padded_size(*size, 32) == expected


def test_pad_crop_round_trip():
    x = np.random.default_rng(0).random((2, 565, 584)).astype(np.float32)
    padded = pad_to(x, *padded_size(565, 584, 32))
    assert padded.shape == (2, 576, 608)
    assert not padded[:, 565:].any() and not padded[:, :, 584:].any()
    assert np.array_equal(crop_to(padded, 565, 584), x)


def test_channels():
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 1] = 255
    assert select_channel(img, "green").tolist() == [[1.0, 1.0], [1.0, 1.0]]
    assert select_channel(img, "gray") == pytest.approx(np.full((2, 2), 0.587))
    grey16 = np.full((2, 2), 65535, np.uint16)
    assert select_channel(grey16, "green") == pytest.approx(np.ones((2, 2)))


def test_normalize_in_fov():
    rng = np.random.default_rng(0)
    x = rng.normal(5.0, 3.0, (50, 50)).astype(np.float32)
    fov = np.zeros((50, 50), bool)
    fov[10:40, 5:45] = True
    out = normalize_in_fov(x, fov)
    assert out[fov].mean() == pytest.approx(0.0, abs=1e-5)
    assert out[fov].std() == pytest.approx(1.0, abs=1e-4)
    assert not out[~fov].any()
    flat = normalize_in_fov(np.full((4, 4), 0.3, np.float32), np.ones((4, 4), bool))
    assert np.isfinite(flat).all() and not flat.any()


def test_split_is_seeded_and_sized():
    ids = [f"{i:02d}" for i in range(20)]
    val = split_cases(ids, 0.2, seed=0)
    assert len(val) == 4 and val == split_cases(list(reversed(ids)), 0.2, seed=0)
    assert val != split_cases(ids, 0.2, seed=1)
    assert split_cases(ids, 0.0, 0) == set()
    assert len(split_cases(["a", "b"], 0.01, 0)) == 1
    assert split_cases(["a"], 0.5, 0) == set()  # never the only training case


def test_split_keeps_the_frames_of_one_file_together():
    ids = [f"scan{s}_f{k}" for s in range(5) for k in range(1, 4)]
    groups = {cid: cid.split("_")[0] for cid in ids}
    for seed in range(10):
        val = split_cases(ids, 0.2, seed, groups)
        assert len(val) == 3  # one of five files, with its three frames
        assert len({groups[cid] for cid in val}) == 1
    assert split_cases(["a_f1", "a_f2"], 0.5, 0, {"a_f1": "a", "a_f2": "a"}) == set()


def test_preprocess_dataset(tmp_path: Path):
    synth = SynthesizeConfig(0, 5, 2, 70, 66, 0.4, 6.0, 1.0, 0.02)
    write_dataset(synth, tmp_path / "raw")
    convert_dataset(
        DataConfig(str(tmp_path / "raw"), "drive"), ConvertConfig(None, None), tmp_path / "c"
    )
    cfg = PreprocessConfig(channel="green", pad_multiple=32, val_fraction=0.2, seed=0)
    stats = preprocess_dataset(cfg, tmp_path / "c", tmp_path / "p")
    assert (stats["padded_height"], stats["padded_width"]) == (96, 96)
    assert (stats["train"]["cases"], stats["val"]["cases"], stats["test"]["cases"]) == (4, 1, 2)
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "convert.json", "preprocess.json", "split.csv", "stats.json", "test.npz", "train.npz",
        "val.npz",
    ]  # fmt: skip
    assert load_record(tmp_path / "p" / RECORD) == cfg
    # the convert params are passed on unchanged (train copies them beside the weights)
    assert (tmp_path / "p" / "convert.json").read_bytes() == (
        tmp_path / "c" / "convert.json"
    ).read_bytes()
    train = load_split(tmp_path / "p" / "train.npz")
    assert train.images.shape == (4, 1, 96, 96) and train.images.dtype == np.float32
    assert train.masks.shape == (4, 96, 96) and set(np.unique(train.masks)) == {0, 1}
    assert train.shapes.tolist() == [[70, 66]] * 4
    assert not train.fov[:, 70:].any() and not train.fov[:, :, 66:].any()
    fov = train.fov[0].astype(bool)
    assert train.images[0, 0][fov].mean() == pytest.approx(0.0, abs=1e-4)
    split = pd.read_csv(tmp_path / "p" / "split.csv", dtype=str)
    assert (split["split"] == "val").sum() == 1
    assert set(split.loc[split["split"] == "test", "case_id"]) == {"01_test", "02_test"}
    assert train.masks2 is None and train.has_mask2 is None


def test_second_observer_masks_travel_when_the_manifest_has_them(tmp_path: Path):
    synth = SynthesizeConfig(0, 3, 2, 70, 66, 0.0, 6.0, 1.0, 0.02)
    write_dataset(synth, tmp_path / "raw")
    convert_dataset(
        DataConfig(str(tmp_path / "raw"), "drive"), ConvertConfig(None, None), tmp_path / "c"
    )
    manifest = pd.read_csv(tmp_path / "c" / "manifest.csv", dtype={"case_id": str})
    # a second observer for the first test case only; it misses the top 10 rows of vessels
    first = manifest[manifest["split"] == "test"].iloc[0]
    mask = read_raster(tmp_path / "c" / first["mask"]) > 0
    mask[:10] = False
    write_png(tmp_path / "c" / "masks2.png", mask)
    manifest["mask2"] = [
        "masks2.png" if cid == first["case_id"] else "" for cid in manifest["case_id"]
    ]
    manifest.to_csv(tmp_path / "c" / "manifest.csv", index=False)
    cfg = PreprocessConfig(channel="green", pad_multiple=32, val_fraction=0.0, seed=0)
    preprocess_dataset(cfg, tmp_path / "c", tmp_path / "p")
    test = load_split(tmp_path / "p" / "test.npz")
    assert test.has_mask2 is not None and test.has_mask2.tolist() == [True, False]
    cases = list(test.second_observer())
    assert [c[0] for c in cases] == [first["case_id"]]
    _, truth, second, _ = cases[0]
    assert np.array_equal(second > 0, mask) and not np.array_equal(truth, second)
    assert load_split(tmp_path / "p" / "train.npz").masks2 is None


def test_prepare_image_is_channel_then_fov_normalisation():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    fov = np.zeros((20, 30), bool)
    fov[2:18, 3:27] = True
    cfg = PreprocessConfig(channel="green", pad_multiple=32, val_fraction=0.2, seed=0)
    x = prepare_image(image, fov, cfg)
    assert x.shape == (1, 20, 30) and x.dtype == np.float32
    assert np.array_equal(x[0], normalize_in_fov(select_channel(image, "green"), fov))


def _faint_lines_on_a_ramp() -> np.ndarray:
    """A dark-to-bright ramp with faint dark lines, both in the dim and in the bright half."""
    x = np.tile(np.linspace(0.05, 0.9, 128, dtype=np.float32), (128, 1))
    x[::8, :] -= 0.02
    return x


def test_clahe_raises_local_contrast_of_faint_structures():
    x = _faint_lines_on_a_ramp()
    out = clahe(x, clip=0.01, tiles=8)
    assert out.shape == x.shape and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    for cols in (slice(8, 24), slice(104, 120)):  # the dim and the bright end of the ramp
        before = x[1:8, cols].mean() - x[0, cols].mean()
        after = out[1:8, cols].mean() - out[0, cols].mean()
        assert after > 1.4 * before
    # a higher clip limit lets the equalisation go further
    strong = clahe(x, clip=0.05, tiles=8)
    gap = lambda a: float(a[1:8, 8:24].mean() - a[0, 8:24].mean())  # noqa: E731
    assert gap(strong) > gap(out)


def test_clahe_of_a_constant_image_is_constant_and_finite():
    flat = np.full((40, 50), 0.3, np.float32)
    flat[::7, ::5] += 1e-4  # invisible noise must not be blown up to the full range
    out = clahe(flat, clip=0.01, tiles=4)
    assert np.isfinite(out).all() and np.ptp(out) < 1e-3


def test_prepare_image_applies_clahe_before_normalisation():
    image = (_faint_lines_on_a_ramp() * 255).astype(np.uint8)
    fov = np.ones(image.shape, bool)
    cfg = PreprocessConfig("gray", 32, 0.2, 0, contrast="clahe", clahe_clip=0.02, clahe_tiles=4)
    x = prepare_image(image, fov, cfg)
    expected = normalize_in_fov(clahe(select_channel(image, "gray"), 0.02, 4), fov)
    assert np.array_equal(x[0], expected)
    plain = prepare_image(image, fov, PreprocessConfig("gray", 32, 0.2, 0))
    assert not np.allclose(x, plain)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("contrast", "hist", "preprocess.contrast must be one of"),
        ("clahe_clip", 0.0, "preprocess.clahe_clip"),
        ("clahe_tiles", 0, "preprocess.clahe_tiles"),
    ],
)
def test_bad_contrast_params_are_refused(key: str, value: object, message: str):
    with pytest.raises(MedsegError, match=message):
        PreprocessConfig("green", 32, 0.2, 0, **{key: value})  # type: ignore[arg-type]


def test_load_record_errors_name_the_file(tmp_path: Path):
    with pytest.raises(MedsegError, match="cannot read the preprocess record"):
        load_record(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(MedsegError, match=r"bad\.json: not a valid preprocess record"):
        load_record(bad)
    bad.write_text(
        '{"channel": "blue", "pad_multiple": 32, "val_fraction": 0.2, "seed": 0, '
        '"contrast": "none", "clahe_clip": 0.01, "clahe_tiles": 8}'
    )
    with pytest.raises(MedsegError, match=r"preprocess\.channel must be one of"):
        load_record(bad)
