"""Hostile and broken input files (made by tests/hostile_files.py) through the one reader,
the convert stage and ``medseg predict``: every one refused with one line naming the file,
before memory past the limit is committed, and nothing half-written left behind."""

from __future__ import annotations

import json
import os
import re
import struct
import subprocess
import sys
import tempfile
import tracemalloc
import zlib
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
import pytest
from conftest import REPO, make_bundle, tiny_params, write_params
from hostile_files import (
    GREY,
    HOSTILE,
    LIMIT,
    _png_chunk,
    dicom_deflate_bomb,
    dicom_deflated_ok,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless

from medseg.errors import MedsegError
from medseg.io.images import write_png
from medseg.io.limits import ReadOptions
from medseg.io.reader import read

OPTIONS = ReadOptions(max_pixels=LIMIT)


@pytest.mark.parametrize("name", sorted(HOSTILE))
def test_hostile_file_is_refused_in_one_line(tmp_path: Path, name: str):
    make, pattern = HOSTILE[name]
    path = make(tmp_path)
    with pytest.raises(MedsegError) as info:
        read(path, OPTIONS)
    message = str(info.value)
    assert message.startswith(f"{path}: ") and "\n" not in message
    assert re.search(pattern, message), message


def test_deflate_bomb_is_stopped_while_inflating(tmp_path: Path):
    """Python's and numpy's peak allocation stays within one copy of the byte bound: the data
    set is never inflated whole (the bench measures the whole process's RSS)."""
    path = dicom_deflate_bomb(tmp_path)
    tracemalloc.start()
    try:
        with pytest.raises(MedsegError, match="inflates past"):
            read(path, OPTIONS)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * 2**20, f"peak {peak:,} bytes"


def test_default_limit_refuses_the_many_page_tiff_and_huge_headers(tmp_path: Path):
    for name in ("tiff_many_pages", "dicom_huge_header", "png_huge_ihdr", "tiff_huge_page"):
        with pytest.raises(MedsegError, match=HOSTILE[name][1]):
            read(HOSTILE[name][0](tmp_path), ReadOptions())


def test_convert_max_pixels_governs_below_pillows_own_bomb_limit(tmp_path: Path):
    """A 10000 x 10000 grey PNG header (100M pixels, past Pillow's 89.5M warning): refused by
    our limit when it is lower, and not refused as a bomb when our limit allows it."""
    ihdr = struct.pack(">IIBBBBB", 10_000, 10_000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
    data += _png_chunk(b"IDAT", zlib.compress(bytes(1000))) + _png_chunk(b"IEND", b"")
    path = tmp_path / "big.png"
    path.write_bytes(data)
    with pytest.raises(MedsegError, match=r"big\.png") as low:
        read(path, ReadOptions(max_pixels=50_000_000))
    assert "decompression-bomb" not in str(low.value) and "50,000,000" in str(low.value)
    with pytest.raises(MedsegError, match=r"big\.png") as high:  # the data is far too short
        read(path, ReadOptions(max_pixels=200_000_000))
    assert "decompression-bomb" not in str(high.value)


def test_deflate_bomb_as_a_seg_candidate_is_not_inflated(tmp_path: Path):
    """Masks are asked whether they are DICOM SEG before they are read: that look must not
    inflate a deflated file either (pydicom would, whole)."""
    from medseg.io.seg import is_seg, read_seg_header

    path = dicom_deflate_bomb(tmp_path)
    assert not is_seg(path)
    with pytest.raises(MedsegError, match="deflated DICOM SEG is not supported"):
        read_seg_header(path)


def test_bits_allocated_outside_the_standard_is_refused(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.BitsAllocated = 4096
    ds.save_as(tmp_path / "bits.dcm")
    with pytest.raises(MedsegError, match="BitsAllocated is 4096"):
        read(tmp_path / "bits.dcm")


def test_the_two_readers_do_not_import_each_other():
    """DICOM and raster readers meet only in io/reader.py; the demo writer is not a reader's."""
    import ast

    for name, other in (("dicom", "images"), ("images", "dicom")):
        tree = ast.parse((REPO / f"src/medseg/io/{name}.py").read_text())
        imported = {
            node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)
        } | {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import)
             for alias in node.names}  # fmt: skip
        assert f"medseg.io.{other}" not in imported and "medseg.io.reader" not in imported
    assert "write_rgb_dicom" not in (REPO / "src/medseg/io/dicom.py").read_text()


def _wrapped(path: Path, syntax: str, stream: bytes) -> Path:
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    del ds.WindowCenter, ds.WindowWidth
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([stream + b"\0" * (len(stream) % 2)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


@pytest.mark.parametrize(
    ("syntax", "encode"),
    [
        (JPEG2000Lossless, lambda: imagecodecs.jpeg2k_encode(GREY, level=0, codecformat="j2k")),
        (JPEGLSLossless, lambda: imagecodecs.jpegls_encode(GREY)),
    ],
    ids=["j2k", "jpegls"],
)
def test_whole_codestreams_of_the_header_size_still_decode(tmp_path: Path, syntax, encode):
    """The checks refuse only what is wrong: the same streams, whole, decode exactly."""
    path = _wrapped(tmp_path / "ok.dcm", syntax, bytes(encode()))
    assert np.array_equal(read(path, OPTIONS)[0], GREY)


def test_deflated_dicom_within_the_limit_reads_exactly(tmp_path: Path):
    assert np.array_equal(read(dicom_deflated_ok(tmp_path), OPTIONS)[0], GREY)


def test_rle_within_the_limit_reads_exactly(tmp_path: Path):
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.compress(RLELossless, encoding_plugin="pydicom")
    ds.save_as(tmp_path / "rle.dcm")
    assert np.array_equal(read(tmp_path / "rle.dcm")[0], read(get_testdata_file("MR_small.dcm"))[0])


# --- through the convert stage and medseg predict -------------------------------------------


@pytest.mark.parametrize("name", ["dicom_deflate_bomb", "png_huge_ihdr"])
def test_convert_stage_refuses_a_hostile_image(tmp_path: Path, name: str):
    make, pattern = HOSTILE[name]
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    image = make(root / "images")
    (root / "masks").mkdir()
    write_png(root / "masks" / f"{image.stem}.png", np.zeros((64, 64), np.uint8))
    params = tiny_params(
        data={"root": str(root), "layout": "folders"},
        convert={"max_pixels": LIMIT, "workers": 1},
    )
    write_params(tmp_path / "params.yaml", params)
    out = tmp_path / "converted"
    done = subprocess.run(
        [sys.executable, str(REPO / "stages/convert.py"), "--params", str(tmp_path / "params.yaml"),
         "--out", str(out)],
        capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO / "src")},
        timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and image.name in last and re.search(pattern, last), last
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def _predict(*args: str | Path) -> int:
    from medseg.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *map(str, args)])
    return int(exit_info.value.code or 0)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from medseg.config.sections import ConvertConfig
    from medseg.names import CONVERT_RECORD
    from medseg.spec import ModelSpec

    folder = make_bundle(
        tmp_path_factory.mktemp("bundle") / "models", ModelSpec("unet", "resnet18", [8] * 5, 1, 1)
    )
    record = ConvertConfig(None, None, max_pixels=LIMIT, fov_fallback="whole_image")
    (folder / CONVERT_RECORD).write_text(json.dumps(record.__dict__))
    return folder


@pytest.mark.parametrize("name", ["dicom_j2k_siz_huge", "png_over_limit"])
def test_predict_refuses_a_hostile_image_by_the_models_limit(
    tmp_path: Path, model: Path, name: str, capsys: pytest.CaptureFixture[str]
):
    make, pattern = HOSTILE[name]
    image = make(tmp_path)
    out = tmp_path / "out"
    assert _predict("--model", model, "--out", out, image, "--device", "cpu") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err and str(image) in err
    assert re.search(pattern, err), err
    assert not out.exists()
    if name == "png_over_limit":  # under the default limit: the model's record refused it
        assert read(image, ReadOptions()).shape == (1, 1024, 1024, 3)


# --- property-based: random and mutated bytes never escape as anything but MedsegError ------

_SEEDS: dict[str, bytes] = {}


def _seed_file(suffix: str) -> bytes:
    """A small valid file of each kind, the start for mutations."""
    if suffix not in _SEEDS:
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder) / f"seed{suffix}"
            if suffix == ".dcm":
                _wrapped(path, JPEG2000Lossless, bytes(imagecodecs.jpeg2k_encode(GREY[:16, :16])))
                ds = pydicom.dcmread(path)
                ds.Rows = ds.Columns = 16
                ds.save_as(path)
            elif suffix == ".tif":
                import tifffile

                tifffile.imwrite(path, GREY[:16, :16], compression="zlib")
            else:
                Image.fromarray(GREY[:16, :16]).save(path)
            _SEEDS[suffix] = path.read_bytes()
    return _SEEDS[suffix]


SMALL = ReadOptions(max_pixels=4096)
SUFFIXES = st.sampled_from([".png", ".gif", ".jpg", ".tif", ".dcm", ".bmp"])
FUZZ = settings(
    max_examples=40, deadline=None, database=None,
    suppress_health_check=[HealthCheck.too_slow],
)  # fmt: skip


def _read_bytes(data: bytes, suffix: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / f"x{suffix}"
        path.write_bytes(data)
        try:
            frames = read(path, SMALL)
        except MedsegError as err:
            assert str(path) in str(err) and "\n" not in str(err)
            return
        assert frames.size <= SMALL.max_pixels


@FUZZ
@given(suffix=SUFFIXES, data=st.binary(max_size=2048))
def test_random_bytes_never_escape_as_anything_but_medseg_error(suffix: str, data: bytes):
    _read_bytes(data, suffix)


@FUZZ
@given(
    suffix=st.sampled_from([".png", ".gif", ".jpg", ".tif", ".dcm"]),
    edits=st.lists(st.tuples(st.floats(0, 1), st.integers(0, 255)), min_size=1, max_size=6),
    cut=st.one_of(st.none(), st.floats(0, 1)),
)
def test_mutated_valid_files_never_escape_as_anything_but_medseg_error(
    suffix: str, edits: list[tuple[float, int]], cut: float | None
):
    data = bytearray(_seed_file(suffix))
    for where, value in edits:
        data[int(where * (len(data) - 1))] = value
    if cut is not None:
        data = data[: int(cut * len(data))]
    _read_bytes(bytes(data), suffix)
