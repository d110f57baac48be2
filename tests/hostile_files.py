"""A corpus of hostile and broken image files, made on the fly (no binary blobs in git).

Each maker writes one file into a folder and returns its path. The files are small on disk
and built to make a careless reader allocate far more than the limit, loop for long, or
return a silently wrong image. Used by tests/test_io_hostile.py and bench/hostile_decode.py.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import imagecodecs
import numpy as np
import pydicom
from PIL import Image
from pydicom.data import get_testdata_file
from pydicom.encaps import encapsulate
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

# The decode limit the corpus is built against (samples), well above every legitimate file here.
LIMIT = 1 << 20

_RNG = np.random.default_rng(0)
GREY = (np.add.outer(np.arange(64), np.arange(64)) * 2 % 256).astype(np.uint8)
GREY = GREY + _RNG.integers(0, 20, GREY.shape).astype(np.uint8)


def _dicom8(rows: int = 64, cols: int = 64) -> pydicom.Dataset:
    """pydicom's real MR_small.dcm turned into an 8-bit grey image of the given size."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    ds.Rows, ds.Columns = rows, cols
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    for keyword in ("WindowCenter", "WindowWidth"):
        if keyword in ds:
            del ds[keyword]
    return ds


def _encapsulated(path: Path, syntax: str, frame: bytes, **fields: int) -> Path:
    ds = _dicom8()
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    ds.file_meta.TransferSyntaxUID = syntax
    ds.PixelData = encapsulate([frame + b"\0" * (len(frame) % 2)])
    ds["PixelData"].VR = "OB"
    ds.save_as(path)
    return path


def _jpeg() -> bytes:
    return bytes(imagecodecs.jpeg8_encode(GREY, level=90))


def _j2k() -> bytes:
    return bytes(imagecodecs.jpeg2k_encode(GREY, level=0, codecformat="j2k"))


def _jpegls() -> bytes:
    return bytes(imagecodecs.jpegls_encode(GREY))


def _rle() -> bytes:
    ds = _dicom8()
    ds.PixelData = GREY.tobytes()
    ds.compress(RLELossless, encoding_plugin="pydicom")
    return next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))


def _patch(data: bytes, marker: bytes, offset: int, value: bytes) -> bytes:
    """``data`` with ``value`` written ``offset`` bytes after the first ``marker``."""
    at = data.index(marker) + offset
    return data[:at] + value + data[at + len(value) :]


def _cut(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def _flip(data: bytes) -> bytes:
    """Damage eight bytes in the middle of the entropy-coded data."""
    out = bytearray(data)
    for k in range(len(out) // 2, len(out) // 2 + 8):
        out[k] ^= 0x5A
    return bytes(out)


# --- DICOM ---------------------------------------------------------------------------------


def dicom_huge_header(folder: Path) -> Path:
    """Rows x Columns claim 60000 x 60000 over 4 KiB of pixel data."""
    ds = _dicom8()
    ds.PixelData = GREY.tobytes()
    ds.Rows = ds.Columns = 60000
    ds.save_as(folder / "huge_header.dcm")
    return folder / "huge_header.dcm"


def dicom_many_frames(folder: Path) -> Path:
    """NumberOfFrames claims 10 million frames of 64 x 64."""
    ds = _dicom8()
    ds.PixelData = GREY.tobytes()
    ds.NumberOfFrames = 10_000_000
    ds.save_as(folder / "many_frames.dcm")
    return folder / "many_frames.dcm"


def dicom_deflate_bomb(folder: Path) -> Path:
    """A deflated data set of a 64 x 64 image that inflates to 40 MiB (a private element of
    zeros): about 40 KiB on disk."""
    ds = _dicom8()
    ds.PixelData = GREY.tobytes()
    ds.add_new(0x00091010, "OB", bytes(40 * 2**20))
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(folder / "deflate_bomb.dcm")
    return folder / "deflate_bomb.dcm"


def dicom_deflated_ok(folder: Path) -> Path:
    """A genuine deflated 64 x 64 image (the control for the bomb)."""
    ds = _dicom8()
    ds.PixelData = GREY.tobytes()
    ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    ds.save_as(folder / "deflated_ok.dcm")
    return folder / "deflated_ok.dcm"


def dicom_deflate_truncated(folder: Path) -> Path:
    path = dicom_deflated_ok(folder)
    data = path.read_bytes()
    (folder / "deflate_cut.dcm").write_bytes(data[: len(data) - 200])
    return folder / "deflate_cut.dcm"


def dicom_jpeg_sof_huge(folder: Path) -> Path:
    """A 64 x 64 JPEG whose frame header (SOF) claims 60000 x 60000."""
    stream = _patch(_jpeg(), b"\xff\xc0", 5, struct.pack(">HH", 60000, 60000))
    return _encapsulated(folder / "jpeg_sof_huge.dcm", JPEGBaseline8Bit, stream)


def dicom_jpeg_size_disagrees(folder: Path) -> Path:
    """A genuine 64 x 64 JPEG inside a header that says 32 x 32."""
    return _encapsulated(
        folder / "jpeg_disagrees.dcm", JPEGBaseline8Bit, _jpeg(), Rows=32, Columns=32
    )


def dicom_jpegls_size_disagrees(folder: Path) -> Path:
    stream = _patch(_jpegls(), b"\xff\xf7", 5, struct.pack(">HH", 40000, 40000))
    return _encapsulated(folder / "jpegls_disagrees.dcm", JPEGLSLossless, stream)


def dicom_j2k_siz_huge(folder: Path) -> Path:
    """A 64 x 64 JPEG 2000 codestream whose SIZ marker claims 60000 x 60000."""
    stream = _patch(_j2k(), b"\xff\x51", 6, struct.pack(">II", 60000, 60000))
    return _encapsulated(folder / "j2k_siz_huge.dcm", JPEG2000Lossless, stream)


def dicom_rle_segments_disagree(folder: Path) -> Path:
    """An 8-bit grey RLE frame (one segment) in a header that says 16 bits (two segments)."""
    return _encapsulated(
        folder / "rle_disagrees.dcm", RLELossless, _rle(), BitsAllocated=16, BitsStored=16,
        HighBit=15,
    )  # fmt: skip


def dicom_jpeg_truncated(folder: Path) -> Path:
    return _encapsulated(folder / "jpeg_cut.dcm", JPEGBaseline8Bit, _cut(_jpeg()))


def dicom_jpegls_truncated(folder: Path) -> Path:
    return _encapsulated(folder / "jpegls_cut.dcm", JPEGLSLossless, _cut(_jpegls()))


def dicom_j2k_truncated(folder: Path) -> Path:
    return _encapsulated(folder / "j2k_cut.dcm", JPEG2000Lossless, _cut(_j2k()))


def dicom_rle_truncated(folder: Path) -> Path:
    return _encapsulated(folder / "rle_cut.dcm", RLELossless, _cut(_rle()))


def dicom_jpegls_flipped(folder: Path) -> Path:
    return _encapsulated(folder / "jpegls_flip.dcm", JPEGLSLossless, _flip(_jpegls()))


# --- plain files ---------------------------------------------------------------------------


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_huge_ihdr(folder: Path) -> Path:
    """A valid PNG (CRCs right) whose IHDR claims 100000 x 100000 RGB over a few bytes."""
    ihdr = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(bytes(1000)))
        + _png_chunk(b"IEND", b"")
    )
    (folder / "huge_ihdr.png").write_bytes(data)
    return folder / "huge_ihdr.png"


def png_over_limit(folder: Path) -> Path:
    """A genuine 1024 x 1024 RGB PNG: three times the corpus limit, under Pillow's own."""
    Image.new("RGB", (1024, 1024)).save(folder / "over_limit.png")
    return folder / "over_limit.png"


def png_truncated(folder: Path) -> Path:
    Image.fromarray(_RNG.integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(folder / "a.png")
    data = (folder / "a.png").read_bytes()
    (folder / "a.png").unlink()
    (folder / "cut.png").write_bytes(_cut(data))
    return folder / "cut.png"


def jpeg_truncated(folder: Path) -> Path:
    (folder / "cut.jpg").write_bytes(_cut(_jpeg()))
    return folder / "cut.jpg"


def gif_many_frames(folder: Path) -> Path:
    """A GIF of 5000 frames of 1 x 1 on an 8 x 8 screen: 25 KB."""
    frame = (
        b"\x21\xf9\x04\x00\x00\x00\x00\x00"  # graphic control: no delay, no transparency
        b"\x2c\x00\x00\x00\x00\x01\x00\x01\x00\x00"  # image descriptor: 1 x 1 at (0, 0)
        b"\x02\x02\x44\x01\x00"  # LZW minimum code size 2; clear, index 0, end; terminator
    )
    screen = b"GIF89a\x08\x00\x08\x00\x80\x00\x00" + b"\x00\x00\x00\xff\xff\xff"
    (folder / "many.gif").write_bytes(screen + frame * 5000 + b"\x3b")
    return folder / "many.gif"


def _tiff(ifds: list[list[tuple[int, int, int, int]]], pixels: bytes) -> bytes:
    """A little-endian classic TIFF of the given IFDs (tag, type, count, value entries), each
    pointing at the same strip of ``pixels``."""
    out = bytearray(b"II*\x00" + struct.pack("<I", 8 + len(pixels)) + pixels)
    for k, entries in enumerate(ifds):
        entries = sorted(entries)
        size = 2 + 12 * len(entries) + 4
        following = len(out) + size if k + 1 < len(ifds) else 0
        out += struct.pack("<H", len(entries))
        for tag, kind, count, value in entries:
            out += struct.pack("<HHII", tag, kind, count, value)
        out += struct.pack("<I", following)
    return bytes(out)


def _tiff_page(width: int, height: int, n_bytes: int) -> list[tuple[int, int, int, int]]:
    return [
        (256, 4, 1, width), (257, 4, 1, height), (258, 3, 1, 8), (259, 3, 1, 1),
        (262, 3, 1, 1), (273, 4, 1, 8), (277, 3, 1, 1), (278, 4, 1, height),
        (279, 4, 1, n_bytes),
    ]  # fmt: skip


def tiff_huge_page(folder: Path) -> Path:
    """A TIFF page claiming 60000 x 60000 over 64 bytes of strip."""
    data = _tiff([_tiff_page(60000, 60000, 64)], bytes(64))
    (folder / "huge_page.tif").write_bytes(data)
    return folder / "huge_page.tif"


def tiff_many_pages(folder: Path) -> Path:
    """100,000 pages of 1 x 1, every one pointing at the same byte: 11 MB of IFDs."""
    data = _tiff([_tiff_page(1, 1, 1)] * 100_000, b"\x00\x00")
    (folder / "many_pages.tif").write_bytes(data)
    return folder / "many_pages.tif"


def tiff_truncated(folder: Path) -> Path:
    """A strip whose byte count runs past the end of the file."""
    data = _tiff([_tiff_page(64, 64, 4096)], bytes(100))
    (folder / "cut.tif").write_bytes(data)
    return folder / "cut.tif"


# Every hostile file, by name: (maker, a regular expression the error message must match).
HOSTILE: dict[str, tuple[Callable[[Path], Path], str]] = {
    "dicom_huge_header": (dicom_huge_header, r"60000x60000x1x1\) = 3,600,000,000 samples exceeds"),
    "dicom_many_frames": (dicom_many_frames, r"exceeds convert\.max_pixels"),
    "dicom_deflate_bomb": (dicom_deflate_bomb, r"inflates past"),
    "dicom_deflate_truncated": (dicom_deflate_truncated, r"deflated DICOM data set is (trunc|dam)"),
    "dicom_jpeg_sof_huge": (dicom_jpeg_sof_huge, r"60000x60000 .* by its own header"),
    "dicom_jpeg_size_disagrees": (
        dicom_jpeg_size_disagrees,
        r"64x64 .* but Columns x Rows is 32x32",
    ),
    "dicom_jpegls_size_disagrees": (dicom_jpegls_size_disagrees, r"40000x40000 .* by its own"),
    "dicom_j2k_siz_huge": (dicom_j2k_siz_huge, r"60000x60000 .* by its own header"),
    "dicom_rle_segments_disagree": (dicom_rle_segments_disagree, r"1 RLE segments where"),
    "dicom_jpeg_truncated": (dicom_jpeg_truncated, r"no end marker: it is truncated"),
    "dicom_jpegls_truncated": (dicom_jpegls_truncated, r"no end marker: it is truncated"),
    "dicom_j2k_truncated": (dicom_j2k_truncated, r"no end marker: it is truncated"),
    "dicom_rle_truncated": (dicom_rle_truncated, r"truncated|cannot decode"),
    "dicom_jpegls_flipped": (dicom_jpegls_flipped, r"JPEG-LS data is damaged"),
    "png_huge_ihdr": (png_huge_ihdr, r"decompression-bomb limit"),
    "png_over_limit": (png_over_limit, r"3,145,728 samples exceeds convert\.max_pixels"),
    "png_truncated": (png_truncated, r"cannot read png image .*truncated"),
    "jpeg_truncated": (jpeg_truncated, r"cannot read jpeg image .*truncated"),
    "gif_many_frames": (gif_many_frames, r"5,000 frames x at least"),
    "tiff_huge_page": (tiff_huge_page, r"3,600,000,000 samples exceeds"),
    "tiff_many_pages": (tiff_many_pages, r"100,000 frames x at least"),
    "tiff_truncated": (tiff_truncated, r"cannot read tiff image"),
}
