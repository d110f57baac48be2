"""One case of the convert stage: read its files, check them, write its PNGs (a 2D image) or
its arrays (a volume, once: ``volumes/<case>.npy`` and ``volume_masks/<case>.npy``, which the
next stages memory-map; never one PNG a slice). Runs in a worker process: everything it needs
comes in its `Job`."""

from __future__ import annotations

import dataclasses
import errno
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medseg.config.sections import ConvertConfig
from medseg.convert.fov import check_fov_keeps_labels, fov_from_image, labels_outside
from medseg.convert.ids import base_id, source_name
from medseg.convert.pseudonyms import redact
from medseg.errors import MedsegError
from medseg.io.case_files import CaseFiles, Problem
from medseg.io.dicom import header_facts
from medseg.io.images import mask_to_bool, write_png
from medseg.io.limits import ReadOptions
from medseg.io.nifti import Volume, check_same_grid, is_nifti, read_nifti
from medseg.io.reader import read, source_format
from medseg.io.seg import is_seg, read_seg_mask
from medseg.names import AUTO

MANIFEST_COLUMNS = [
    "case_id", "split", "image", "mask", "fov", "source", "source_format", "bit_depth",
    "channels", "height", "width", "fov_source", "mask2", "modality", "spacing_row",
    "spacing_col", "fov_cut", "group", "depth", "spacing_slice", "affine",
]  # fmt: skip
# a volume's files under the converted folder: (C, Z, H, W) image, (Z, H, W) uint8 labels
VOLUME_DIRS = ("volumes", "volume_masks")


@dataclass(frozen=True)
class Job:
    """One case to convert, with everything the worker needs."""

    case: CaseFiles
    root: Path
    out: Path
    cfg: ConvertConfig
    labels: dict[int, int] | None = None  # mask value -> label (data.classes); None: binary
    key: bytes | None = None  # the id key of `names: hash`


@dataclass(frozen=True)
class _Checked:
    """A case read and checked, ready to be written: (F, H, W[, 3]) images, (F, H, W) masks."""

    base: str
    source: str
    images: np.ndarray
    masks: np.ndarray
    fovs: np.ndarray
    masks2: np.ndarray | None
    fov_source: str
    modality: str = ""  # DICOM Modality; empty for other formats
    spacing: tuple[float, float] | None = None  # (row, column) mm, where the file says
    fov_cut: float | None = None  # share of the labels a thresholded FOV leaves out


@dataclass(frozen=True)
class Result:
    """A case's manifest rows (one per frame), or the problem that left it out."""

    rows: list[dict[str, object]]
    problem: Problem | None = None


def _unexpected(case: CaseFiles, err: Exception) -> str:
    """A failure our checks did not foresee, as a problem of the case (no value quoted)."""
    return f"{case.image}: could not be converted ({type(err).__name__}); the file may be damaged"


def convert_case(job: Job) -> Result:
    """Convert one case: read, check, write its PNGs; a problem of its input files becomes a
    `Problem`. A failure to write (disk full, read-only, permission) is raised: no input is to
    blame for it, and the run stops.

    Runs in a worker process: everything it needs comes in ``job``.
    """
    try:
        if is_nifti(job.case.image):
            volume = _convert_volume(job)
        else:
            checked = _convert(job.case, job.root, job.out, job.cfg, job.labels, job.key)
    except Exception as err:  # raised before anything of the case is written
        if isinstance(err, OSError) and err.errno in _NOT_THE_INPUT:
            raise
        reason = str(err) if isinstance(err, MedsegError) else _unexpected(job.case, err)
        if job.key is not None:  # no name from the path in the outputs, the report included
            case = job.case
            paths = [p for p in (case.image, case.mask, case.fov, case.mask2) if p is not None]
            paths += list(case.channels)
            reason = redact(reason, paths, job.root, job.key)
        return Result([], Problem(job.case.image, reason))
    if is_nifti(job.case.image):
        return Result([_write_volume(job, *volume)])
    return Result(_write_case(job.case, job.out, job.cfg, checked))


# OS errors that no input file causes, even while reading (a decoder's scratch file)
_NOT_THE_INPUT = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _convert(
    case: CaseFiles, root: Path, out: Path, cfg: ConvertConfig, labels: dict[int, int] | None,
    key: bytes | None,
) -> _Checked:  # fmt: skip
    options = ReadOptions.from_convert(cfg)
    base = base_id(case, root, key)
    source = source_name(case, root, key)
    if case.channels:
        raise MedsegError(
            f"{case.image}: a 2D image given as {1 + len(case.channels)} channel files; medseg "
            "reads several channel files for NIfTI volumes only (give 2D images as one RGB file)"
        )
    images = read(case.image, options)
    raw = dataclasses.replace(options, window=None)  # a window is for images, never for masks
    masks = _read_mask(case.mask, raw, cfg, images, "mask", labels, case.image)
    masks2 = (
        _read_mask(case.mask2, raw, cfg, images, "mask", labels, case.image) if case.mask2 else None
    )
    if case.fov is not None:
        fovs = _read_mask(case.fov, raw, cfg, images, "FOV mask")
        if not fovs.any(axis=(1, 2)).all():
            raise MedsegError(f"{case.fov}: the field-of-view mask is empty")
        fov_source, fov_cut = "given", None
    else:
        fovs, fov_source, fov_cut = _made_fov(case.image, images, masks, cfg)
    modality, spacing = "", None
    if source_format(case.image) == "dicom":
        modality, spacing = header_facts(case.image)
    return _Checked(
        base, source, images, masks, fovs, masks2, fov_source, modality, spacing, fov_cut
    )


def _made_fov(
    image: Path, images: np.ndarray, masks: np.ndarray, cfg: ConvertConfig
) -> tuple[np.ndarray, str, float | None]:
    """The FOV of a case that ships none, its source (``threshold`` or ``whole_image``), and the
    share of its labelled pixels a thresholded FOV leaves out (None where none was made).

    ``threshold`` refuses a case where the threshold finds no field or cuts its labels.
    ``auto`` treats every case alike, whatever its labels say: the thresholded FOV wherever the
    image has one (the image alone decides, as it does for `medseg predict`), and the share it
    leaves out recorded for the plan, which decides for the whole data set from the training
    cases (`medseg.planning.plan`); a case whose labels it cuts is named in the log, not
    switched, so that no test label chooses its own scoring region.
    """
    if cfg.fov_fallback == "whole_image":
        return np.ones(images.shape[:3], dtype=bool), "whole_image", None
    fovs = np.stack([fov_from_image(im, cfg.fov_threshold, cfg.fov_erode) for im in images])
    if not fovs.any(axis=(1, 2)).all():
        if cfg.fov_fallback == AUTO:
            return np.ones(images.shape[:3], dtype=bool), "whole_image", None
        raise MedsegError(
            f"{image}: no field of view found above convert.fov_threshold "
            f"({cfg.fov_threshold}); lower it, give FOV masks, or set "
            "convert.fov_fallback: whole_image"
        )
    if cfg.fov_fallback != AUTO:
        check_fov_keeps_labels(image, masks, fovs)
    return fovs, "threshold", labels_outside(masks, fovs)[0]


def _write_case(
    case: CaseFiles, out: Path, cfg: ConvertConfig, checked: _Checked
) -> list[dict[str, object]]:
    """Write a checked case's PNGs into ``out``; its manifest rows."""
    base, source, fov_source = checked.base, checked.source, checked.fov_source
    masks, fovs, masks2 = checked.masks, checked.fovs, checked.masks2
    images = checked.images
    rows = []
    for k, image in enumerate(images):
        case_id = base if len(images) == 1 else f"{base}_f{k + 1}"
        if cfg.max_bit_depth == 8 and image.dtype == np.uint16:
            image = ((image.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)
        names = {sub: f"{sub}/{case_id}.png" for sub in ("images", "masks", "fov", "masks2")}
        write_png(out / names["images"], image)
        write_png(out / names["masks"], masks[k])
        write_png(out / names["fov"], fovs[k if len(fovs) > 1 else 0])
        if masks2 is not None:
            write_png(out / names["masks2"], masks2[k])
        rows.append(
            {
                "case_id": case_id,
                "split": case.split,
                "image": names["images"],
                "mask": names["masks"],
                "fov": names["fov"],
                "source": source,
                "source_format": source_format(case.image),
                "bit_depth": 16 if image.dtype == np.uint16 else 8,
                "channels": 1 if image.ndim == 2 else image.shape[2],
                "height": image.shape[0],
                "width": image.shape[1],
                "fov_source": fov_source,
                "fov_cut": "" if checked.fov_cut is None else round(checked.fov_cut, 4),
                "mask2": names["masks2"] if masks2 is not None else "",
                "modality": checked.modality,
                "spacing_row": checked.spacing[0] if checked.spacing else None,
                "spacing_col": checked.spacing[1] if checked.spacing else None,
                "group": case.group,  # the patient (medseg.convert.groups): never empty
            }
        )
    return rows


def _convert_volume(job: Job) -> tuple[np.ndarray, np.ndarray, Volume]:
    """Read and check a NIfTI case: its (C, Z, H, W) image (int16 where every channel's values
    fit, else float32), its (Z, H, W) uint8 labels and the first channel's `Volume` (spacing,
    affine); every check before anything is written."""
    case, cfg = job.case, job.cfg
    options = ReadOptions.from_convert(cfg)
    first = read_nifti(case.image, options)
    channels = [first.array]
    for path in case.channels:
        other = read_nifti(path, options)
        check_same_grid(case.image, first, path, other)
        channels.append(other.array)
    dtype = np.int16 if all(c.dtype == np.int16 for c in channels) else np.float32
    image = np.stack([c.astype(dtype, copy=False) for c in channels])
    truth = read_nifti(case.mask, options, labels=True)
    check_same_grid(case.image, first, case.mask, truth)
    if job.labels is not None:
        labels = to_labels(truth.array, case.mask, job.labels)
    else:
        values = np.unique(truth.array)
        if len(values) > 2:
            raise MedsegError(
                f"{case.mask}: a label map with {len(values)} values but no data.classes; name "
                "the classes in data.classes (e.g. {liver: 1, tumour: 2})"
            )
        labels = (truth.array > 0).astype(np.uint8)
    return image, labels, first


def _write_volume(job: Job, image: np.ndarray, labels: np.ndarray, volume: Volume) -> dict:
    """Write a checked volume's two arrays into ``job.out``; its manifest row."""
    case = job.case
    base = base_id(case, job.root, job.key)
    names = {sub: f"{sub}/{base}.npy" for sub in VOLUME_DIRS}
    np.save(job.out / names["volumes"], image)
    np.save(job.out / names["volume_masks"], labels)
    z, h, w = labels.shape
    return {
        "case_id": base,
        "split": case.split,
        "image": names["volumes"],
        "mask": names["volume_masks"],
        "fov": "",
        "source": source_name(case, job.root, job.key),
        "source_format": "nifti",
        "bit_depth": 16 if image.dtype == np.int16 else 32,
        "channels": int(image.shape[0]),
        "height": h,
        "width": w,
        "fov_source": "whole_image",
        "mask2": "",
        "modality": case.modality,
        "fov_cut": "",
        "spacing_row": volume.spacing[1],
        "spacing_col": volume.spacing[2],
        "group": case.group or base,  # the patient (medseg.convert.groups); else the volume
        "depth": z,
        "spacing_slice": volume.spacing[0],
        "affine": json.dumps([[round(float(v), 6) for v in row] for row in volume.affine]),
    }


def _read_mask(
    path: Path | None, options: ReadOptions, cfg: ConvertConfig, images: np.ndarray, what: str,
    labels: dict[int, int] | None = None, image: Path | None = None,
) -> np.ndarray:  # fmt: skip
    """A mask file as (F, H, W) bool matching the image's frames and size (an FOV mask may have
    one frame for all); with ``labels`` (mask value -> label) as (F, H, W) uint8 labels.

    A DICOM SEG mask gives the segment numbers of the frames that refer to ``image``."""
    assert path is not None
    if image is not None and is_seg(path):
        if len(images) != 1:
            raise MedsegError(
                f"{image}: a multi-frame image with a DICOM SEG mask; medseg reads SEG masks of "
                "single-frame images (one file per slice)"
            )
        raw = read_seg_mask(path, image, images.shape[1:3], options)
        seg = True
    else:
        raw = read(path, options)
        seg = False
    if seg and labels is None:  # binary: any segment is foreground
        frames = raw > 0
    elif labels is not None:
        frames = to_labels(raw, path, labels)
    else:
        frames = mask_to_bool(raw, path, cfg.mask_threshold)
    n, h, w = images.shape[:3]
    if frames.shape[1:] != (h, w):
        raise MedsegError(
            f"{path}: {what} is {frames.shape[2]}x{frames.shape[1]} but its image is {w}x{h} "
            "(width x height); they must match"
        )
    if len(frames) != n and not (what == "FOV mask" and len(frames) == 1):
        raise MedsegError(
            f"{path}: {what} has {len(frames)} frames but its image has {n}; give one mask "
            "frame per image frame"
        )
    return frames


def to_labels(raw: np.ndarray, path: Path, labels: dict[int, int]) -> np.ndarray:
    """A label-map mask (F, H, W) (or grey-valued colour) as uint8 labels 1..K, 0 background.

    Raises:
        MedsegError: a colour mask whose channels differ, or a value not in ``data.classes``.
    """
    if raw.ndim == 4:
        if not (
            np.array_equal(raw[..., 0], raw[..., 1]) and np.array_equal(raw[..., 1], raw[..., 2])
        ):
            raise MedsegError(
                f"{path}: a colour mask; a label map with data.classes must be single-channel "
                "(grey) with one value per class"
            )
        raw = raw[..., 0]
    values = np.unique(raw)
    unknown = [int(v) for v in values if v != 0 and int(v) not in labels]
    if unknown:
        shown = ", ".join(map(str, unknown[:6])) + (", ..." if len(unknown) > 6 else "")
        known = ", ".join(f"{v} ({k})" for v, k in sorted(labels.items()))
        raise MedsegError(
            f"{path}: mask value(s) {shown} are not in data.classes (known: 0 background, "
            f"{known} as labels); add them to data.classes or fix the mask"
        )
    lut = np.zeros(int(values[-1]) + 1, dtype=np.uint8)
    for value, label in labels.items():
        if value < len(lut):
            lut[value] = label
    return lut[raw]
