from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from medseg.config.sections import ConvertConfig, DataConfig, PreprocessConfig, SynthesizeConfig
from medseg.convert.dataset import convert_dataset
from medseg.errors import MedsegError
from medseg.io.images import read_raster, write_png
from medseg.preprocess.dataset import preprocess_dataset, split_cases
from medseg.preprocess.processed import RECORD, load_record, open_split, read_case
from medseg.preprocess.transforms import (
    clahe,
    model_size,
    normalize_in_fov,
    prepare_image,
    resize_labels,
    select_channel,
)
from medseg.synthetic import write_dataset


def test_channels():
    img = np.zeros((2, 2, 3), np.uint8)
    img[..., 1] = 255
    img[..., 2] = 51
    assert select_channel(img, "green").tolist() == [[[1.0, 1.0], [1.0, 1.0]]]
    assert select_channel(img, "gray") == pytest.approx(np.full((1, 2, 2), 0.587 + 0.114 * 0.2))
    rgb = select_channel(img, "rgb")
    assert rgb.shape == (3, 2, 2) and rgb[:, 0, 0] == pytest.approx([0.0, 1.0, 0.2])
    grey16 = np.full((2, 2), 65535, np.uint16)
    assert select_channel(grey16, "green") == pytest.approx(np.ones((1, 2, 2)))
    with pytest.raises(MedsegError, match=r"scan\.png: a grey image, but preprocess\.channel"):
        select_channel(grey16, "rgb", "scan.png")


def test_normalize_per_channel():
    rng = np.random.default_rng(0)
    x = np.stack([rng.normal(m, s, (30, 30)) for m, s in ((1, 2), (5, 0.5), (-3, 7))])
    fov = np.zeros((30, 30), bool)
    fov[5:25, 2:28] = True
    out = normalize_in_fov(x.astype(np.float32), fov)
    assert out.shape == (3, 30, 30)
    for c in out:
        assert c[fov].mean() == pytest.approx(0.0, abs=1e-5)
        assert c[fov].std() == pytest.approx(1.0, abs=1e-4)
        assert not c[~fov].any()


def test_resizing_on_request_only():
    assert model_size(3504, 2336, None) == (3504, 2336)
    assert model_size(500, 400, 512) == (500, 400)
    assert model_size(3504, 2336, 1024) == (1024, 683)
    labels = np.zeros((40, 40), np.uint8)
    labels[:20] = 1
    labels[30:, 30:] = 2
    small = resize_labels(labels, (10, 10), 3)
    assert (small[:5] == 1).all() and (small[8:, 8:] == 2).all() and small[6, 2] == 0
    rng = np.random.default_rng(2)
    image = rng.integers(0, 256, size=(300, 200, 3), dtype=np.uint8)
    fov = np.ones((300, 200), bool)
    cfg = PreprocessConfig("rgb", 0.2, 0, max_side=150)
    x, small_fov = prepare_image(image, fov, cfg)
    assert x.shape == (3, 150, 100) and small_fov.shape == (150, 100)


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
    with pytest.raises(MedsegError, match="all 2 training cases belong to one group"):
        split_cases(["a_f1", "a_f2"], 0.5, 0, {"a_f1": "a", "a_f2": "a"})


def test_preprocess_dataset(tmp_path: Path):
    synth = SynthesizeConfig(0, 5, 2, 70, 66, 0.4, 6.0, 1.0, 0.02)
    write_dataset(synth, tmp_path / "raw")
    convert_dataset(
        DataConfig(str(tmp_path / "raw"), "drive"), ConvertConfig(None, None), tmp_path / "c"
    )
    cfg = PreprocessConfig(channel="green", val_fraction=0.2, seed=0)
    stats = preprocess_dataset(cfg, tmp_path / "c", tmp_path / "p")
    assert (stats["train"]["cases"], stats["val"]["cases"], stats["test"]["cases"]) == (4, 1, 2)
    assert stats["classes"] == ["background", "foreground"]
    assert 0.05 < stats["train"]["foreground_fraction_in_fov"] < 0.3
    assert sorted(p.name for p in (tmp_path / "p").iterdir()) == [
        "classes.json", "convert.json", "preprocess.json", "split.csv", "stats.json",
        "test-00000.bin", "test.json", "train-00000.bin", "train.json", "val-00000.bin",
        "val.json",
    ]  # fmt: skip
    assert load_record(tmp_path / "p" / RECORD) == cfg
    # the convert params are passed on unchanged (train copies them beside the weights)
    assert (tmp_path / "p" / "convert.json").read_bytes() == (
        tmp_path / "c" / "convert.json"
    ).read_bytes()
    train = open_split(tmp_path / "p", "train")
    case = read_case(train, 0)
    assert case.image.shape == (1, 70, 66) and case.image.dtype == np.float32
    assert case.mask.shape == (70, 66) and set(np.unique(case.mask)) == {0, 1}
    assert case.truth is case.mask and case.mask2 is None
    assert case.image[0][case.fov].mean() == pytest.approx(0.0, abs=1e-4)
    assert train.get(0, "fov_rows").sum() == case.fov.sum()
    assert train.get(0, "fg_rows").sum() == (case.mask.astype(bool) & case.fov).sum()
    split = pd.read_csv(tmp_path / "p" / "split.csv", dtype=str)
    assert (split["split"] == "val").sum() == 1
    assert set(split.loc[split["split"] == "test", "case_id"]) == {"01_test", "02_test"}


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
    cfg = PreprocessConfig(channel="green", val_fraction=0.0, seed=0)
    preprocess_dataset(cfg, tmp_path / "c", tmp_path / "p")
    test = open_split(tmp_path / "p", "test")
    cases = [read_case(test, i) for i in test]
    assert [c.case_id for c in cases if c.mask2 is not None] == [first["case_id"]]
    second = cases[0].mask2
    assert second is not None
    assert np.array_equal(second > 0, mask) and not np.array_equal(cases[0].truth, second)


def test_prepare_image_is_channel_then_fov_normalisation():
    rng = np.random.default_rng(1)
    image = rng.integers(0, 256, size=(20, 30, 3), dtype=np.uint8)
    fov = np.zeros((20, 30), bool)
    fov[2:18, 3:27] = True
    cfg = PreprocessConfig(channel="green", val_fraction=0.2, seed=0)
    x, same = prepare_image(image, fov, cfg)
    assert x.shape == (1, 20, 30) and x.dtype == np.float32 and same is fov
    assert np.array_equal(x, normalize_in_fov(select_channel(image, "green"), fov))


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
    cfg = PreprocessConfig("gray", 0.2, 0, contrast="clahe", clahe_clip=0.02, clahe_tiles=4)
    x, _ = prepare_image(image, fov, cfg)
    expected = normalize_in_fov(clahe(select_channel(image, "gray")[0], 0.02, 4), fov)
    assert np.array_equal(x[0], expected)
    plain, _ = prepare_image(image, fov, PreprocessConfig("gray", 0.2, 0))
    assert not np.allclose(x, plain)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("contrast", "hist", "preprocess.contrast must be one of"),
        ("clahe_clip", 0.0, "preprocess.clahe_clip"),
        ("clahe_tiles", 0, "preprocess.clahe_tiles"),
        ("max_side", 16, "preprocess.max_side must be >= 32"),
    ],
)
def test_bad_contrast_params_are_refused(key: str, value: object, message: str):
    with pytest.raises(MedsegError, match=message):
        PreprocessConfig("green", 0.2, 0, **{key: value})  # type: ignore[arg-type]


def test_load_record_errors_name_the_file(tmp_path: Path):
    with pytest.raises(MedsegError, match="cannot read the preprocess record"):
        load_record(tmp_path / "nope.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    with pytest.raises(MedsegError, match=r"bad\.json: not a valid preprocess record"):
        load_record(bad)
    bad.write_text(
        '{"channel": "blue", "val_fraction": 0.2, "seed": 0, '
        '"contrast": "none", "clahe_clip": 0.01, "clahe_tiles": 8, "max_side": null}'
    )
    with pytest.raises(MedsegError, match=r"preprocess\.channel must be one of"):
        load_record(bad)


def _converted(tmp_path: Path, sizes: list[tuple[int, int]], rgb: bool = False,
               labels: int = 2) -> Path:  # fmt: skip
    """A convert-stage output folder of synthetic cases of the given sizes, half train."""
    out = tmp_path / "c"
    for sub in ("images", "masks", "fov"):
        (out / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i, (h, w) in enumerate(sizes):
        cid = f"case{i}"
        shape = (h, w, 3) if rgb else (h, w)
        write_png(out / "images" / f"{cid}.png", rng.integers(0, 256, shape, dtype=np.uint8))
        mask = rng.integers(0, labels, (h, w)).astype(np.uint8)
        write_png(out / "masks" / f"{cid}.png", mask * 255 if labels == 2 else mask)
        write_png(out / "fov" / f"{cid}.png", np.full((h, w), 255, np.uint8))
        rows.append({"case_id": cid, "split": "train" if i % 2 == 0 else "test",
                     "image": f"images/{cid}.png", "mask": f"masks/{cid}.png",
                     "fov": f"fov/{cid}.png", "source": cid, "mask2": ""})  # fmt: skip
    pd.DataFrame(rows).to_csv(out / "manifest.csv", index=False)
    if labels > 2:
        names = ["background", *(f"c{k}" for k in range(1, labels))]
        (out / "classes.json").write_text('{"names": ["' + '", "'.join(names) + '"]}')
    return out


def test_mixed_sizes_are_kept_unpadded_and_rgb_travels(tmp_path: Path):
    sizes = [(40, 300), (256, 64), (90, 90), (33, 47), (128, 200), (64, 64)]
    converted = _converted(tmp_path, sizes, rgb=True)
    cfg = PreprocessConfig(channel="rgb", val_fraction=0.0, seed=0)
    preprocess_dataset(cfg, converted, tmp_path / "p")
    got = {}
    for split in ("train", "test"):
        store = open_split(tmp_path / "p", split)
        for i in store:
            case = read_case(store, i)
            got[case.case_id] = case.image.shape
    assert got == {f"case{i}": (3, h, w) for i, (h, w) in enumerate(sizes)}
    # the shards hold the cases' own pixels, nothing padded to the largest
    total = sum((tmp_path / "p" / f).stat().st_size for f in ("train-00000.bin", "test-00000.bin"))
    pixels = sum(h * w for h, w in sizes)
    assert total < pixels * (3 * 4 + 2) + 64 * 8 * len(sizes) + sum(h for h, _ in sizes) * 8


def test_max_side_keeps_the_truth_at_full_size(tmp_path: Path):
    converted = _converted(tmp_path, [(200, 100), (50, 40)])
    cfg = PreprocessConfig(channel="gray", val_fraction=0.0, seed=0, max_side=64)
    stats = preprocess_dataset(cfg, converted, tmp_path / "p")
    assert stats["train"]["resized"] == 1
    case = read_case(open_split(tmp_path / "p", "train"), 0)
    assert case.image.shape == (1, 64, 32) and case.mask.shape == (64, 32)
    assert case.truth.shape == (200, 100) and case.truth_fov.shape == (200, 100)
    assert read_case(open_split(tmp_path / "p", "test"), 0).image.shape == (1, 50, 40)


def test_label_maps_keep_their_classes(tmp_path: Path):
    converted = _converted(tmp_path, [(30, 40), (20, 20)], labels=4)
    stats = preprocess_dataset(PreprocessConfig("gray", 0.0, 0), converted, tmp_path / "p")
    assert stats["classes"] == ["background", "c1", "c2", "c3"]
    assert set(stats["train"]["class_fraction_in_fov"]) == {"c1", "c2", "c3"}
    store = open_split(tmp_path / "p", "train")
    assert set(np.unique(read_case(store, 0).mask)) == {0, 1, 2, 3}
    assert store.get(0, "fg_rows").shape == (3, 30)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ("label", r"case0\.png: label 7 but data\.classes names 3 classes"),
        ("size", r"masks/case0\.png: mask is 10x10 but its image .* is 40x30"),
        ("grey_for_rgb", r"case0\.png: a grey image, but preprocess\.channel is rgb"),
    ],
)
def test_bad_cases_are_one_clear_error_and_no_output(tmp_path: Path, change: str, message: str):
    converted = _converted(tmp_path, [(30, 40), (20, 20)], labels=4)
    cfg = PreprocessConfig("gray", 0.0, 0)
    if change == "label":
        write_png(converted / "masks" / "case0.png", np.full((30, 40), 7, np.uint8))
    elif change == "size":
        write_png(converted / "masks" / "case0.png", np.zeros((10, 10), np.uint8))
    else:
        cfg = PreprocessConfig("rgb", 0.0, 0)
    with pytest.raises(MedsegError, match=message):
        preprocess_dataset(cfg, converted, tmp_path / "p")
    assert not (tmp_path / "p").exists()


def test_a_colour_image_with_a_flat_chosen_channel_is_refused():
    """Fluorescence in blue only: the green channel the fundus default takes is blank."""
    image = np.zeros((12, 10, 3), np.uint8)
    image[..., 2] = np.arange(120, dtype=np.uint8).reshape(12, 10)
    fov = np.ones((12, 10), bool)
    cfg = PreprocessConfig("green", 0.2, 0)
    with pytest.raises(MedsegError, match=r"dapi\.png: its green channel is constant inside"):
        prepare_image(image, fov, cfg, "dapi.png")
    x, _ = prepare_image(image, fov, PreprocessConfig("rgb", 0.2, 0))
    assert x.shape == (3, 12, 10) and x[2].std() > 0.9
    grey = np.repeat(np.full((12, 10, 1), 7, np.uint8), 3, axis=2)  # flat everywhere: allowed
    assert prepare_image(grey, fov, cfg)[0].shape == (1, 12, 10)


def test_volumes_are_normalised_as_a_whole():
    """MR and others: z-score per channel over the whole volume; CT: clip to the training
    foreground's percentiles, then the data set's mean and std (nnU-Net's rules)."""
    from medseg.preprocess.transforms import Intensity, normalise_volume, zscore_volume

    rng = np.random.default_rng(0)
    volume = rng.normal(300.0, 40.0, (1, 4, 6, 5)).astype(np.float32)
    z = zscore_volume(volume)
    assert abs(float(z.mean())) < 1e-5 and abs(float(z.std()) - 1.0) < 1e-4
    assert np.array_equal(normalise_volume(volume, None), z)
    fg = [np.arange(100, dtype=np.float32)[:, None], np.full((100, 1), 50.0, np.float32)]
    ct = Intensity.from_samples(fg)
    lo, hi = ct.clip[0]
    assert lo == pytest.approx(np.percentile(np.concatenate(fg), 0.5))
    assert hi == pytest.approx(np.percentile(np.concatenate(fg), 99.5))
    x = ct.apply(np.array([[[[-1000.0, 50.0, 5000.0]]]], np.float32))
    expected = (np.clip([-1000.0, 50.0, 5000.0], lo, hi) - ct.mean[0]) / ct.std[0]
    np.testing.assert_allclose(x[0, 0, 0], expected, rtol=1e-5)
