"""What a compressed frame of DICOM pixel data says about itself, read before it is decoded.

A DICOM file's Rows, Columns and SamplesPerPixel are what the size limit is checked against,
but a decoder trusts the codestream's own header: a JPEG whose frame header (SOF) claims
60000 x 60000 inside a file that says 64 x 64 would make it allocate gigabytes. `frame_header`
reads the codestream's own size (the SOF marker of JPEG and JPEG-LS, the SIZ marker of JPEG 2000,
the segment count of the RLE header) so that a disagreement is refused, and checks that the
frame is whole (it ends with its end-of-image marker; JPEG 2000 tile-parts and RLE segments lie
inside it), so that a truncated fragment is an error rather than a partly decoded image.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass

# JPEG frame headers: SOF0-3, 5-7, 9-11, 13-15 (C4 DHT, C8 JPG, CC DAC are not frames), and
# JPEG-LS's SOF55 (F7).
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC} | {0xF7}
_EOI = b"\xff\xd9"  # end of image (JPEG, JPEG-LS); end of codestream (JPEG 2000)
_JP2_SIGNATURE = b"\x00\x00\x00\x0cjP  \r\n\x87\n"
_J2K_SOC_SIZ = b"\xff\x4f\xff\x51"
_J2K_SOT = 0xFF90


class CodestreamError(ValueError):
    """A compressed frame is malformed or incomplete; the message says how."""


@dataclass(frozen=True)
class FrameHeader:
    """The size a compressed frame declares.

    Attributes:
        rows: image height in pixels.
        columns: image width in pixels.
        samples: components (1 grey, 3 colour); for RLE, the number of byte segments.
        bits: sample precision in bits (0 where the codestream does not say: RLE).
    """

    rows: int
    columns: int
    samples: int
    bits: int


def frame_header(kind: str, data: bytes) -> FrameHeader:
    """The header of one compressed frame, after checking the frame is complete.

    Args:
        kind: ``"jpeg"`` (JPEG and JPEG-LS), ``"j2k"`` (JPEG 2000, HTJ2K) or ``"rle"``.
        data: the frame's bytes, as `pydicom.encaps.generate_frames` yields them.

    Returns:
        Its declared size (RLE: rows and columns 0, samples = segment count).

    Raises:
        CodestreamError: the frame is malformed or truncated.
    """
    if kind == "jpeg":
        return _jpeg(data)
    if kind == "j2k":
        return _j2k(data)
    if kind == "rle":
        return _rle(data)
    raise ValueError(f"unknown codestream kind {kind!r}")


def _u16(data: bytes, pos: int) -> int:
    if pos + 2 > len(data):
        raise CodestreamError("the codestream ends inside a marker segment")
    return int.from_bytes(data[pos : pos + 2], "big")


def _u32(data: bytes, pos: int) -> int:
    if pos + 4 > len(data):
        raise CodestreamError("the codestream ends inside a marker segment")
    return int.from_bytes(data[pos : pos + 4], "big")


def _unpadded(data: bytes) -> bytes:
    # DICOM pads a fragment to even length with a zero byte; some writers pad with 0xFF or more
    return data.rstrip(b"\x00\xff")


def _check_ends_with_eoi(data: bytes, what: str) -> None:
    if not _unpadded(data).endswith(_EOI):
        raise CodestreamError(f"the {what} codestream has no end marker: it is truncated")


def _jpeg(data: bytes) -> FrameHeader:
    """JPEG (ISO 10918) and JPEG-LS (ISO 14495): markers up to the first frame header."""
    if data[:2] != b"\xff\xd8":
        raise CodestreamError("the frame does not start with a JPEG start-of-image marker")
    _check_ends_with_eoi(data, "JPEG")
    pos = 2
    while pos + 4 <= len(data):
        if data[pos] != 0xFF:
            raise CodestreamError(f"JPEG marker expected at byte {pos}")
        marker = data[pos + 1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in (0xDA, 0xD9):
            break  # a scan or the end before any frame header
        length = _u16(data, pos + 2)
        if marker in _SOF_MARKERS:
            if length < 8 or pos + 10 > len(data):
                raise CodestreamError("the JPEG frame header is too short")
            bits, rows, cols, comps = (
                data[pos + 4],
                _u16(data, pos + 5),
                _u16(data, pos + 7),
                data[pos + 9],
            )
            return FrameHeader(rows, cols, comps, bits)
        if length < 2:
            raise CodestreamError(f"JPEG marker segment of length {length} at byte {pos}")
        pos += 2 + length
    raise CodestreamError("the JPEG codestream has no frame header (SOF marker)")


def _j2k(data: bytes) -> FrameHeader:
    """JPEG 2000 (ISO 15444): the SIZ marker, then the tile-parts' lengths against the data."""
    if data.startswith(_JP2_SIGNATURE):  # a JP2 file rather than a bare codestream
        start = data.find(b"jp2c")
        if start < 4:
            raise CodestreamError("the JP2 file holds no codestream box")
        data = data[start + 4 :]
    if not data.startswith(_J2K_SOC_SIZ):
        raise CodestreamError("the frame does not start with JPEG 2000 SOC and SIZ markers")
    _check_ends_with_eoi(data, "JPEG 2000")
    width = _u32(data, 8) - _u32(data, 16)  # Xsiz - XOsiz
    height = _u32(data, 12) - _u32(data, 20)  # Ysiz - YOsiz
    comps = _u16(data, 40)
    if comps == 0 or 42 + 3 * comps > len(data):
        raise CodestreamError("the JPEG 2000 SIZ marker is too short")
    bits = max((data[42 + 3 * k] & 0x7F) + 1 for k in range(comps))
    _check_j2k_tile_parts(data, 4 + _u16(data, 4))  # after SIZ: SOC, SIZ marker, Lsiz
    return FrameHeader(height, width, comps, bits)


def _check_j2k_tile_parts(data: bytes, pos: int) -> None:
    """Walk the main header's marker segments, then the tile-parts by their Psot lengths: each
    must lie inside the frame, and the last must end at the EOC marker."""
    end = len(_unpadded(data)) - 2  # where EOC starts
    while _u16(data, pos) != _J2K_SOT:
        if data[pos] != 0xFF:
            raise CodestreamError(f"JPEG 2000 marker expected at byte {pos}")
        pos += 2 + _u16(data, pos + 2)
        if pos >= end:
            raise CodestreamError("the JPEG 2000 codestream has no tile-part")
    while pos < end:
        if _u16(data, pos) != _J2K_SOT:
            raise CodestreamError(f"JPEG 2000 tile-part expected at byte {pos}")
        length = _u32(data, pos + 6)  # Psot: from SOT to the end of the tile-part's data
        if length == 0:  # the last tile-part runs to EOC
            return
        pos += length
    if pos != end:
        raise CodestreamError("the JPEG 2000 tile-parts run past the end: it is truncated")


def _rle(data: bytes) -> FrameHeader:
    """DICOM RLE (PS3.5 G): a 64-byte header of segment count and offsets."""
    if len(data) < 64:
        raise CodestreamError("the RLE frame is shorter than its 64-byte header")
    count = int.from_bytes(data[:4], "little")
    offsets = [int.from_bytes(data[4 * k : 4 * k + 4], "little") for k in range(1, count + 1)]
    if not 1 <= count <= 15 or offsets[0] != 64:
        raise CodestreamError(f"the RLE header is malformed ({count} segments)")
    if any(b <= a for a, b in itertools.pairwise(offsets)) or offsets[-1] >= len(data):
        raise CodestreamError("the RLE segment offsets run past the frame: it is truncated")
    return FrameHeader(0, 0, count, 0)
