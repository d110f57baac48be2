from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import tifffile
from PIL import Image

from medseg.errors import MedsegError
from medseg.io.images import binarize, read_image, source_format, write_png

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (17, 23, 3), dtype=np.uint8)
GREY16 = RNG.integers(0, 65536, (17, 23), dtype=np.uint16)


@pytest.mark.parametrize("arr", [RGB8, RGB8[..., 0], GREY16], ids=["rgb8", "grey8", "grey16"])
def test_png_round_trip_is_lossless(tmp_path: Path, arr: np.ndarray):
    write_png(tmp_path / "a.png", arr)
    back = read_image(tmp_path / "a.png")
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


@pytest.mark.parametrize("arr", [RGB8, GREY16], ids=["rgb8", "grey16"])
def test_tiff_keeps_depth(tmp_path: Path, arr: np.ndarray):
    tifffile.imwrite(tmp_path / "a.tif", arr)
    back = read_image(tmp_path / "a.tif")
    assert back.dtype == arr.dtype and np.array_equal(back, arr)


def test_planar_tiff_is_moved_to_channels_last(tmp_path: Path):
    tifffile.imwrite(
        tmp_path / "p.tif", np.moveaxis(RGB8, -1, 0), photometric="rgb", planarconfig="separate"
    )
    assert np.array_equal(read_image(tmp_path / "p.tif"), RGB8)


def test_palette_gif_mask_reads_as_grey_and_binarizes(tmp_path: Path):
    mask = np.zeros((9, 11), dtype=np.uint8)
    mask[2:5, 3:8] = 255
    Image.fromarray(mask).convert("P").save(tmp_path / "m.gif")
    arr = read_image(tmp_path / "m.gif")
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
    assert np.array_equal(read_image(tmp_path / "a.png"), RGB8)
    Image.fromarray(RGB8[..., 0] > 128).save(tmp_path / "b.png")
    assert set(np.unique(read_image(tmp_path / "b.png"))) <= {0, 255}


def test_jpeg_reads(tmp_path: Path):
    Image.fromarray(RGB8).save(tmp_path / "a.jpg", quality=95)
    assert read_image(tmp_path / "a.jpg").shape == RGB8.shape
    assert source_format(tmp_path / "a.JPEG") == "jpeg"


@pytest.mark.parametrize("name", ["a.png", "a.tif", "a.gif", "a.jpg"])
def test_corrupt_and_empty_files_name_the_file(tmp_path: Path, name: str):
    empty = tmp_path / name
    empty.write_bytes(b"")
    with pytest.raises(MedsegError, match=name):
        read_image(empty)
    write_png(tmp_path / "ok.png", RGB8)
    truncated = tmp_path / f"t{name}"
    truncated.write_bytes((tmp_path / "ok.png").read_bytes()[:60])
    with pytest.raises(MedsegError, match=f"t{name}"):
        read_image(truncated)


def test_unsupported_ending(tmp_path: Path):
    with pytest.raises(MedsegError, match=re.escape("unsupported file type .txt")):
        read_image(tmp_path / "notes.txt")
