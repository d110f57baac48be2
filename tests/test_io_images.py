from __future__ import annotations

import os
import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from medseg.errors import MedsegError
from medseg.io.images import binarize, mask_to_bool, read_raster, write_png
from medseg.io.limits import ReadOptions
from medseg.io.reader import read, source_format

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (17, 23, 3), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (17, 23), dtype=np.uint16)


@pytest.mark.parametrize("arr", [RGB8, RGB8[..., 0], GREY16], ids=["rgb8", "grey8", "grey16"])
def test_png_round_trip_is_lossless(tmp_path: Path, arr: np.ndarray):
    write_png(tmp_path / "a.png", arr)
    back = read(tmp_path / "a.png")[0]
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


@pytest.mark.parametrize("arr", [RGB8, GREY16], ids=["rgb8", "grey16"])
def test_tiff_keeps_depth(tmp_path: Path, arr: np.ndarray):
    tifffile.imwrite(tmp_path / "a.tif", arr)
    back = read(tmp_path / "a.tif")[0]
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_planar_tiff_is_moved_to_channels_last(tmp_path: Path):
    tifffile.imwrite(
        tmp_path / "p.tif", np.moveaxis(RGB8, -1, 0), photometric="rgb", planarconfig="separate"
    )
    assert np.array_equal(read(tmp_path / "p.tif")[0], RGB8)


def test_palette_gif_mask_reads_as_grey_and_binarizes(tmp_path: Path):
    mask = np.zeros((9, 11), dtype=np.uint8)
    mask[2:5, 3:8] = 255
    Image.fromarray(mask).convert("P").save(tmp_path / "m.gif")
    arr = read(tmp_path / "m.gif")[0]
    assert arr.ndim == 2
    assert np.array_equal(binarize(arr), mask > 0)


@pytest.mark.parametrize("high", [1, 255, 65535])
def test_binarize_accepts_any_foreground_value(high: int):
    arr = np.array([[0, high], [high, 0]], dtype=np.uint16)
    assert binarize(arr).tolist() == [[False, True], [True, False]]
    assert not binarize(np.zeros((3, 3), np.uint8)).any()


def test_rgba_and_bilevel(tmp_path: Path):
    Image.fromarray(np.dstack([RGB8, np.full(RGB8.shape[:2], 7, np.uint8)])).save(
        tmp_path / "a.png"
    )
    assert np.array_equal(read(tmp_path / "a.png")[0], RGB8)
    Image.fromarray(RGB8[..., 0] > 128).save(tmp_path / "b.png")
    assert set(np.unique(read(tmp_path / "b.png")[0])) <= {0, 255}


def test_jpeg_reads(tmp_path: Path):
    Image.fromarray(RGB8).save(tmp_path / "a.jpg", quality=95)
    assert read(tmp_path / "a.jpg")[0].shape == RGB8.shape
    assert source_format(tmp_path / "a.JPEG") == "jpeg"


@pytest.mark.parametrize("name", ["a.png", "a.tif", "a.gif", "a.jpg"])
def test_corrupt_and_empty_files_name_the_file(tmp_path: Path, name: str):
    empty = tmp_path / name
    empty.write_bytes(b"")
    with pytest.raises(MedsegError, match=name):
        read(empty)[0]
    write_png(tmp_path / "ok.png", RGB8)
    truncated = tmp_path / f"t{name}"
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(MedsegError, match=f"t{name}"):
        read(truncated)[0]


def test_unsupported_ending(tmp_path: Path):
    with pytest.raises(MedsegError, match=re.escape("unsupported file type .txt")):
        read(tmp_path / "notes.txt")[0]


def test_16_bit_rgb_png_round_trip(tmp_path: Path):
    rgb16 = RNG.integers(0, 65536, (17, 23, 3), dtype=np.uint16)
    write_png(tmp_path / "a.png", rgb16)
    back = read_raster(tmp_path / "a.png")
    assert back.dtype == np.uint16 and np.array_equal(back, rgb16)
    with Image.open(tmp_path / "a.png") as im:  # a standard PNG that other readers open
        assert im.size == (23, 17)


def test_synthetic_16_bit_tiff_keeps_full_range(tmp_path: Path):
    ramp = np.arange(65536, dtype=np.uint16).reshape(256, 256)
    tifffile.imwrite(tmp_path / "ramp.tif", ramp, compression="zlib")
    assert np.array_equal(read(tmp_path / "ramp.tif")[0], ramp)


def test_multipage_tiff_gives_frames_or_is_refused(tmp_path: Path):
    stack = RNG.integers(0, 65536, (5, 17, 23), dtype=np.uint16)
    tifffile.imwrite(tmp_path / "s.tif", stack, photometric="minisblack")
    assert np.array_equal(read(tmp_path / "s.tif"), stack)
    rgb_stack = RNG.integers(0, 256, (2, 17, 23, 3), dtype=np.uint8)
    tifffile.imwrite(tmp_path / "rgb.tif", rgb_stack, photometric="rgb")
    assert np.array_equal(read(tmp_path / "rgb.tif"), rgb_stack)
    with pytest.raises(MedsegError, match=r"s\.tif: holds 5 frames and convert\.multiframe"):
        read(tmp_path / "s.tif", ReadOptions(allow_multiframe=False))


@pytest.mark.parametrize("name", ["a.png", "a.tif", "a.gif"])
def test_pixel_limit_checked_before_decoding(tmp_path: Path, name: str):
    if name.endswith(".tif"):
        tifffile.imwrite(tmp_path / name, RGB8)
    else:
        Image.fromarray(RGB8).save(tmp_path / name)
    samples = 17 * 23 * 3  # a GIF's palette indices count as the RGB they expand to
    with pytest.raises(MedsegError, match=f"{re.escape(name)}: .* = 1,173 samples exceeds"):
        read(tmp_path / name, ReadOptions(max_pixels=samples - 1))
    assert read(tmp_path / name, ReadOptions(max_pixels=samples)).shape[0] == 1


def test_dicom_without_ending_is_recognised(tmp_path: Path):
    from pydicom.data import get_testdata_file

    (tmp_path / "IM0001").write_bytes(Path(get_testdata_file("MR_small.dcm")).read_bytes())
    assert source_format(tmp_path / "IM0001") == "dicom"
    assert read(tmp_path / "IM0001").shape == (1, 64, 64)
    (tmp_path / "notes").write_bytes(b"x" * 200)
    with pytest.raises(MedsegError, match=re.escape("unsupported file type (no ending)")):
        source_format(tmp_path / "notes")


@pytest.mark.parametrize(
    "values",
    [[0, 1], [0, 255], [0, 65535], [2, 4, 252, 254], [255], [0]],
    ids=["0-1", "0-255", "0-65535", "drive-2nd-manual", "all-fg", "all-bg"],
)
def test_binary_masks_are_accepted(values: list[int]):
    arr = np.array(values * 4, dtype=np.uint16).reshape(-1, len(values))
    got = mask_to_bool(arr, "m.png")
    assert np.array_equal(got, arr > max(values) / 2 if len(values) > 1 else arr > 0)


def test_non_binary_masks_are_refused_unless_thresholded():
    labels = np.array([[0, 1], [2, 0]], dtype=np.uint8)
    with pytest.raises(MedsegError, match=r"m\.png: mask is not binary \(3 values: 0, 1, 2\)"):
        mask_to_bool(labels, "m.png")
    lossy = np.array([[0, 9], [240, 255]], dtype=np.uint8)  # a JPEG mask
    with pytest.raises(MedsegError, match=r"convert\.mask_threshold"):
        mask_to_bool(lossy, "m.jpg")
    assert mask_to_bool(lossy, "m.jpg", threshold=0.5).tolist() == [[False, False], [True, True]]


@pytest.mark.skipif(os.geteuid() == 0 if hasattr(os, "geteuid") else True, reason="root reads all")
@pytest.mark.parametrize("name", ["a.png", "a.tif", "a.dcm"])
def test_unreadable_file_names_the_file(tmp_path: Path, name: str):
    path = tmp_path / name
    path.write_bytes(b"x" * 300)
    path.chmod(0)
    with pytest.raises(MedsegError, match=f"{re.escape(name)}: cannot read the file \\(permission"):
        read(path)
