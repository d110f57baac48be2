"""Masks from DICOM Segmentation (SEG) objects, as PACS and annotation tools store them.

A SEG object holds one or more segments (each with a number and a label, e.g. 1 "Liver") as
frames, each frame naming the source image it was drawn on (its SOP Instance UID). One SEG may
cover a whole series; `SegIndex` finds, for each DICOM image, the SEG that refers to it, and
`read_seg_mask` returns that image's mask as a map of segment numbers (0 where no segment is).
Where segments overlap, the one listed later wins (an organ and a lesion inside it: the lesion).
Decoding goes through highdicom, frame by frame, after the header's size has been checked.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from medseg.errors import MedsegError
from medseg.io.dicom import is_deflated, is_dicom_file
from medseg.io.limits import ReadOptions, check_pixel_count

SEG_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.66.4"
_NOT_NAME = re.compile(r"[^a-z0-9_-]+")


def is_seg(path: str | Path) -> bool:
    """Whether ``path`` is a DICOM Segmentation object (reads the header only)."""
    if not is_dicom_file(path) or is_deflated(path):  # a deflated file: read as an image
        return False
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID"])
    except Exception:  # not readable as DICOM: the image reader says why, later
        return False
    return str(ds.get("SOPClassUID", "")) == SEG_SOP_CLASS


def instance_uid(path: Path) -> str:
    """The SOP Instance UID of a DICOM image, from its header."""
    if not is_dicom_file(path):
        raise MedsegError(
            f"{path}: not a DICOM image; a DICOM SEG mask refers to DICOM images by their SOP "
            "Instance UID, so the images must be the DICOM files the SEG was drawn on"
        )
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
        return str(ds.SOPInstanceUID)
    except (InvalidDicomError, AttributeError, OSError) as err:
        raise MedsegError(f"{path}: no readable SOP Instance UID ({type(err).__name__})") from err


@dataclass(frozen=True)
class SegHeader:
    """What a SEG's header says: its segments and the images it refers to."""

    path: Path
    segments: dict[int, str]  # segment number -> label
    instances: frozenset[str]  # SOP Instance UIDs of the source images
    size: tuple[int, int]  # rows, columns of each frame
    n_frames: int


def read_seg_header(path: Path) -> SegHeader:
    """Segments and referenced images of a SEG file, without its pixel data."""
    if is_deflated(path):  # pydicom would inflate it whole, whatever its size
        raise MedsegError(f"{path}: a deflated DICOM SEG is not supported; re-export it")
    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
    except Exception as err:
        raise MedsegError(
            f"{path}: not a readable DICOM file ({type(err).__name__}); is the file complete?"
        ) from err
    if str(ds.get("SOPClassUID", "")) != SEG_SOP_CLASS:
        raise MedsegError(f"{path}: not a DICOM Segmentation object (SOP Class {SEG_SOP_CLASS})")
    segments: dict[int, str] = {}
    try:
        for item in ds.SegmentSequence:
            number = int(item.SegmentNumber)
            label = str(item.get("SegmentLabel", "") or f"segment_{number}")
            if number in segments or not 0 < number < 2**16:
                raise MedsegError(f"{path}: segment number {number} is invalid or repeated")
            segments[number] = label
        instances = set()
        for series in ds.get("ReferencedSeriesSequence", []):
            for ref in series.get("ReferencedInstanceSequence", []):
                instances.add(str(ref.ReferencedSOPInstanceUID))
        groups = [*ds.get("PerFrameFunctionalGroupsSequence", [])]
        groups += [*ds.get("SharedFunctionalGroupsSequence", [])]
        for frame in groups:
            for derivation in frame.get("DerivationImageSequence", []):
                for source in derivation.get("SourceImageSequence", []):
                    instances.add(str(source.ReferencedSOPInstanceUID))
        size = (int(ds.Rows), int(ds.Columns))
        n_frames = int(ds.get("NumberOfFrames", 1) or 1)
    except MedsegError:
        raise
    except Exception as err:  # a damaged sequence: the message may quote values, so omit it
        raise MedsegError(
            f"{path}: DICOM SEG header cannot be read ({type(err).__name__}); is it complete?"
        ) from err
    if not segments:
        raise MedsegError(f"{path}: DICOM SEG without segments")
    return SegHeader(path, segments, frozenset(instances), size, n_frames)


@dataclass
class SegIndex:
    """The SEG objects under a path, and which of them refers to which image."""

    headers: list[SegHeader] = field(default_factory=list)
    by_instance: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def scan(cls, location: Path) -> SegIndex:
        """Every SEG in ``location`` (a SEG file, or a folder searched recursively).

        Raises:
            MedsegError: no SEG there, or one image claimed by two SEG objects.
        """
        if location.is_file():
            files = [location]
        elif location.is_dir():
            files = sorted(p for p in location.rglob("*") if p.is_file() and is_seg(p))
        else:
            raise MedsegError(f"data.seg: {location} is neither a file nor a folder")
        if not files:
            raise MedsegError(f"data.seg: no DICOM Segmentation object in {location}")
        index = cls()
        for path in files:
            header = read_seg_header(path)
            index.headers.append(header)
            for uid in header.instances:
                other = index.by_instance.setdefault(uid, path)
                if other != path:
                    raise MedsegError(
                        f"{path}: refers to an image that {other} also segments; give each "
                        "image one SEG object"
                    )
        return index

    def mask_of(self, image: Path) -> Path | None:
        """The SEG that refers to ``image``, or ``None``."""
        return self.by_instance.get(instance_uid(image))


def class_names(headers: list[SegHeader]) -> dict[str, int]:
    """``data.classes`` as the segments name them: a metrics-safe name -> segment number.

    Raises:
        MedsegError: one segment number with two labels in different SEG objects.
    """
    labels: dict[int, tuple[str, Path]] = {}
    for header in headers:
        for number, label in header.segments.items():
            seen = labels.setdefault(number, (label, header.path))
            if seen[0].strip().lower() != label.strip().lower():
                raise MedsegError(
                    f"{header.path}: segment {number} is {label!r} but {seen[1]} calls it "
                    f"{seen[0]!r}; name the classes in data.classes (name: segment number)"
                )
    names: dict[str, int] = {}
    for number, (label, _) in sorted(labels.items()):
        name = _NOT_NAME.sub("_", label.strip().lower()).strip("_")[:40]
        if not name or not name[0].isalpha() or name == "background" or name in names:
            name = f"segment_{number}"
        names[name] = number
    return names


@functools.lru_cache(maxsize=2)
def _open_seg(seg_path: Path, max_pixels: int) -> tuple[SegHeader, Any]:
    """Header and highdicom object (frames read lazily) of a SEG, kept for the next image of the
    same series (one SEG usually covers many)."""
    import highdicom as hd  # imported here: only data sets with SEG masks need it

    header = read_seg_header(seg_path)
    rows, cols = header.size
    check_pixel_count(
        seg_path, rows * cols * header.n_frames, max_pixels, "rows x columns x frames"
    )
    try:
        seg = hd.seg.segread(seg_path, lazy_frame_retrieval=True)
    except Exception as err:
        raise MedsegError(  # the message may quote header values (UIDs): only its type
            f"{seg_path}: cannot read the DICOM SEG ({type(err).__name__}); is it complete?"
        ) from err
    return header, seg


def read_seg_mask(
    seg_path: Path, image: Path, shape: tuple[int, int], options: ReadOptions
) -> np.ndarray:
    """The mask of one single-frame DICOM ``image`` from a SEG: (1, H, W) uint16 segment numbers.

    Raises:
        MedsegError: naming the SEG file (and the image) and the reason.
    """
    header, seg = _open_seg(seg_path, options.max_pixels)
    size = header.size
    uid = instance_uid(image)
    if uid not in header.instances:
        raise MedsegError(f"{seg_path}: does not refer to the image {image}")
    if size != shape:
        raise MedsegError(
            f"{seg_path}: its frames are {size[1]}x{size[0]} but the image {image} is "
            f"{shape[1]}x{shape[0]} (width x height); they must match"
        )
    try:
        planes = seg.get_pixels_by_source_instance(
            source_sop_instance_uids=[uid],
            combine_segments=False,
            assert_missing_frames_are_empty=True,
            ignore_spatial_locations=True,  # many tools leave SpatialLocationsPreserved out
            rescale_fractional=True,
        )
    except Exception as err:  # a damaged or unusual SEG, in any way highdicom reports it
        raise MedsegError(  # the message may quote header values (UIDs): only its type
            f"{seg_path}: cannot read the DICOM SEG for {image} ({type(err).__name__}); is it "
            "complete?"
        ) from err
    out = np.zeros(shape, dtype=np.uint16)
    for k, number in enumerate(seg.segment_numbers):  # a later segment wins where they overlap
        plane = planes[0, :, :, k]
        out[plane > 0.5 if plane.dtype.kind == "f" else plane > 0] = int(number)
    return out[None]
