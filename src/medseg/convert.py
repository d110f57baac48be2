"""Conversion of a raw data set (any layout, DICOM/TIFF/PNG/GIF/JPEG) to lossless PNG + manifest.

Each case is converted on its own (in parallel worker processes), written into a temporary
output folder, and the folder is moved into place only when the run is complete. A bad case
either stops the run (``convert.on_error: fail``) or is left out and listed with its reason in
``skipped.csv`` (``skip``).
"""

from __future__ import annotations

import ctypes
import dataclasses
import errno
import hashlib
import hmac
import logging
import multiprocessing
import os
import re
import secrets
import signal
import stat
import sys
import threading
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import ndimage
from tqdm import tqdm

from medseg.config import CLASSES, CONVERT_RECORD, ConvertConfig, DataConfig, label_map
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_dir, check_output, write_json
from medseg.io.images import mask_to_bool, write_png
from medseg.io.layouts import CaseFiles, Problem, scan_cases
from medseg.io.reader import ReadOptions, read, source_format
from medseg.io.seg import SegIndex, class_names, is_seg, read_seg_mask

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "case_id", "split", "image", "mask", "fov", "source", "source_format", "bit_depth",
    "channels", "height", "width", "fov_source", "mask2",
]  # fmt: skip
SKIPPED_COLUMNS = ["source", "reason"]
# A path part made of 4+ dot-separated numbers is a DICOM UID, which identifies a study or image.
_UID = re.compile(r"^\d+(\.\d+){3,}$")
# The secret of `convert.names: hash`: an environment variable, else a git-ignored file in the
# repository (created on first use). Without a secret, anyone with a list of candidate names
# could hash them and recognise the ids.
ID_KEY_ENV = "MEDSEG_ID_KEY"
ID_KEY_FILE = Path(".medseg") / "id_key"
_KEY_HEX = re.compile(r"^[0-9a-fA-F]{32,}$")  # 128 bits at least


@dataclass(frozen=True)
class _Job:
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


@dataclass(frozen=True)
class _Result:
    rows: list[dict[str, object]]
    problem: Problem | None = None


def convert_dataset(
    data: DataConfig, cfg: ConvertConfig, out: str | Path, key: bytes | None = None
) -> pd.DataFrame:
    """Convert every case under ``data.root`` into ``out``.

    Writes ``out/images/<case>.png`` (8 or 16 bit, grey or RGB), ``out/masks/<case>.png``,
    ``out/fov/<case>.png`` and, where a second observer's mask exists, ``out/masks2/<case>.png``
    (masks 0/255); ``out/manifest.csv`` (one row per case, columns `MANIFEST_COLUMNS`, paths
    relative to ``out``; ``mask2`` empty, read back as NaN, where there is none);
    ``out/skipped.csv`` (the files left out and why) and ``out/report.json`` (counts).
    ``out`` appears only when the run completes.

    With ``convert.names: hash`` case ids and sources are keyed hashes of the paths (``key``,
    by default `id_key`) and no name from a path reaches an output, a message or a log line.

    Returns:
        The manifest.

    Raises:
        MedsegError: a bad case with ``on_error: fail``, no usable case at all, or ``out`` is,
            holds or lies inside ``data.root``.
        OutputError: writing ``out`` failed (disk full, read-only, permission), whatever
            ``on_error`` says: only problems of input files are skipped.
    """
    if cfg.names != "hash":
        return _convert_dataset(data, cfg, Path(out), None)
    key = key if key is not None else id_key()
    try:
        return _convert_dataset(data, cfg, Path(out), key)
    except MedsegError as err:
        # the same class (an OutputError stays one), its message without names from paths
        raise type(err)(_redact(str(err), [], Path(data.root), key, (Path(out),))) from None


def _convert_dataset(
    data: DataConfig, cfg: ConvertConfig, out: Path, key: bytes | None
) -> pd.DataFrame:
    root = Path(data.root)
    check_output(out, {"data.root": root})  # before anything is read or removed
    segs = _seg_index(root, data.seg) if data.seg is not None else None
    scan = scan_cases(
        root, data.layout, data.manifest, data.test_fraction, data.split_seed,
        mask_of=segs.mask_of if segs is not None else None,
    )  # fmt: skip
    classes = data.classes
    if classes is None and segs is not None:
        classes = class_names(segs.headers)  # the segments' labels name the classes
        log.info("classes from the DICOM SEG segment labels: %s", classes)
    if scan.problems and cfg.on_error == "fail":
        raise MedsegError(_fail_hint(_skip_row(scan.problems[0], root, key)["reason"]))
    with atomic_dir(out, {"data.root": root}) as tmp:
        for sub in ("images", "masks", "fov", "masks2"):
            (tmp / sub).mkdir()
        labels = label_map(classes) if classes is not None else None
        jobs = [_Job(case, root, tmp, cfg, labels, key) for case in scan.cases]
        results = _run(jobs, cfg)
        rows = [row for r in results for row in r.rows]
        problems = scan.problems + [r.problem for r in results if r.problem is not None]
        skipped = pd.DataFrame([_skip_row(p, root, key) for p in problems], columns=SKIPPED_COLUMNS)
        skipped.to_csv(tmp / "skipped.csv", index=False)
        if not rows:
            first = f"; the first: {problems[0].reason}" if problems else ""
            raise MedsegError(f"{root}: no usable case: all {len(problems)} were skipped{first}")
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        _check_unique_ids(manifest)
        if not any((tmp / "masks2").iterdir()):
            (tmp / "masks2").rmdir()
        manifest.to_csv(tmp / "manifest.csv", index=False)
        # hand back what the next stage will read (an empty mask2 cell reads as NaN)
        manifest = pd.read_csv(tmp / "manifest.csv", dtype={"case_id": str})
        report = {
            "cases": len(manifest),
            "source_images": len(jobs) - sum(r.problem is not None for r in results),
            "skipped": len(problems),
            "on_error": cfg.on_error,
        }
        if key is not None:  # which key made the ids: a different key gives different ids
            report["id_key"] = key_fingerprint(key)
        write_json(tmp / "report.json", report)
        write_json(tmp / CONVERT_RECORD, dataclasses.asdict(cfg))
        names = ["background", *classes] if classes else ["background", "foreground"]
        write_json(tmp / CLASSES, {"names": names})
    log.info(
        "converted %d cases (%d skipped%s)",
        len(manifest), len(problems), ", listed in skipped.csv" if problems else "",
    )  # fmt: skip
    return manifest


def worker_count(workers: int | None, n_jobs: int) -> int:
    """Processes to use: ``workers`` (0 or ``None``: every core this process may run on), at
    most one per job."""
    if not workers:
        try:
            workers = len(os.sched_getaffinity(0))
        except AttributeError:  # not on Linux
            workers = os.cpu_count() or 1
    return max(1, min(workers, n_jobs))


def _run(jobs: list[_Job], cfg: ConvertConfig) -> list[_Result]:
    """Convert every job, in worker processes when more than one is asked for, with a progress
    bar; in ``fail`` mode the first problem stops the run."""
    results: list[_Result | None] = [None] * len(jobs)
    n_workers = worker_count(cfg.workers, len(jobs))
    if n_workers == 1:
        with _bar(len(jobs)) as bar:
            for i, job in enumerate(jobs):
                results[i] = _finish(convert_case(job), cfg)
                bar.update()
        return [r for r in results if r is not None]
    pool = ProcessPoolExecutor(
        n_workers, mp_context=_start_method(), initializer=_worker_init, initargs=(os.getpid(),)
    )
    with pool:
        try:
            pending = {pool.submit(convert_case, job): i for i, job in enumerate(jobs)}
            with _bar(len(jobs)) as bar:
                while pending:
                    done, _ = wait(pending, return_when=FIRST_COMPLETED)
                    for future in done:
                        results[pending.pop(future)] = _finish(future.result(), cfg)
                        bar.update()
        except BrokenProcessPool as err:
            raise MedsegError(
                "convert: a worker process died (out of memory?); lower convert.workers "
                "or convert.max_pixels"
            ) from err
        except BaseException:
            _stop_workers(pool)
            raise
    return [r for r in results if r is not None]


def _worker_init(parent: int) -> None:
    """In a worker: die with the parent, even when it is SIGKILLed (Linux), and leave Ctrl-C to
    the parent, which stops the workers and removes the unfinished output."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # not the parent's (forked) handler
    if sys.platform.startswith("linux"):
        pr_set_pdeathsig = 1
        ctypes.CDLL(None).prctl(pr_set_pdeathsig, int(signal.SIGKILL))
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _stop_workers(pool: ProcessPoolExecutor) -> None:
    """Kill the workers now (a failure or a stop signal): waiting for the cases they are on
    would keep a stopped run alive, writing into an output that is about to be removed."""
    processes = getattr(pool, "_processes", None) or {}  # no public way before Python 3.14
    for process in list(processes.values()):
        process.terminate()
    pool.shutdown(wait=True, cancel_futures=True)


class _Bar(tqdm):
    """A progress bar without tqdm's monitor thread, so that later runs may still fork."""

    monitor_interval = 0


def _bar(total: int) -> tqdm:
    return _Bar(total=total, unit="case", desc="convert", disable=None)  # off if not a terminal


def _start_method() -> multiprocessing.context.BaseContext:
    """``fork`` on Linux while this process runs no other thread (the stage script runs none):
    workers start in milliseconds without importing everything again, which is most of the
    speed-up on small data sets. Otherwise ``spawn``: clean workers, whatever the parent runs."""
    if sys.platform.startswith("linux") and threading.active_count() == 1:
        return multiprocessing.get_context("fork")
    return multiprocessing.get_context("spawn")


def _finish(result: _Result, cfg: ConvertConfig) -> _Result:
    if result.problem is not None and cfg.on_error == "fail":
        raise MedsegError(_fail_hint(result.problem.reason))
    return result


def _fail_hint(reason: str) -> str:
    return f"{reason} (convert.on_error: skip leaves such cases out and lists them)"


def _unexpected(case: CaseFiles, err: Exception) -> str:
    """A failure our checks did not foresee, as a problem of the case (no value quoted)."""
    return f"{case.image}: could not be converted ({type(err).__name__}); the file may be damaged"


def convert_case(job: _Job) -> _Result:
    """Convert one case: read, check, write its PNGs; a problem of its input files becomes a
    `Problem`. A failure to write (disk full, read-only, permission) is raised: no input is to
    blame for it, and the run stops.

    Runs in a worker process: everything it needs comes in ``job``.
    """
    try:
        checked = _convert(job.case, job.root, job.out, job.cfg, job.labels, job.key)
    except Exception as err:  # raised before anything of the case is written
        if isinstance(err, OSError) and err.errno in _NOT_THE_INPUT:
            raise
        reason = str(err) if isinstance(err, MedsegError) else _unexpected(job.case, err)
        if job.key is not None:  # no name from the path in the outputs, the report included
            case = job.case
            paths = [p for p in (case.image, case.mask, case.fov, case.mask2) if p is not None]
            reason = _redact(reason, paths, job.root, job.key)
        return _Result([], Problem(job.case.image, reason))
    return _Result(_write_case(job.case, job.out, job.cfg, checked))


# OS errors that no input file causes, even while reading (a decoder's scratch file)
_NOT_THE_INPUT = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def _convert(
    case: CaseFiles, root: Path, out: Path, cfg: ConvertConfig, labels: dict[int, int] | None,
    key: bytes | None,
) -> _Checked:  # fmt: skip
    options = ReadOptions.from_convert(cfg)
    base = _base_id(case, root, key)
    source = _source_name(case, root, key)
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
        fov_source = "given"
    elif cfg.fov_fallback == "threshold":
        fovs = np.stack([fov_from_image(im, cfg.fov_threshold, cfg.fov_erode) for im in images])
        if not fovs.any(axis=(1, 2)).all():
            raise MedsegError(
                f"{case.image}: no field of view found above convert.fov_threshold "
                f"({cfg.fov_threshold}); lower it, give FOV masks, or set "
                "convert.fov_fallback: whole_image"
            )
        _check_fov_keeps_labels(case.image, masks, fovs)
        fov_source = "threshold"
    else:
        fovs = np.ones(images.shape[:3], dtype=bool)
        fov_source = "whole_image"
    return _Checked(base, source, images, masks, fovs, masks2, fov_source)


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
                "mask2": names["masks2"] if masks2 is not None else "",
            }
        )
    return rows


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


def fov_from_image(image: np.ndarray, threshold: float, erode: int = 0) -> np.ndarray:
    """A field-of-view mask made from the image itself, for data sets that ship none.

    Steps: 1. the brightest channel as a share of full scale; 2. a 5x5 median against noise
    (it keeps the rim where it is);
    3. threshold; 4. keep the largest connected region; 5. fill its holes (dark vessels, lesions);
    6. shave ``erode`` pixels off the rim.

    Args:
        image: (H, W) or (H, W, 3) uint8 or uint16.
        threshold: share of full scale (255 or 65535) in (0, 1).
        erode: pixels removed from the rim, >= 0.

    Returns:
        (H, W) bool; all False when nothing exceeds the threshold.
    """
    full = 65535.0 if image.dtype == np.uint16 else 255.0
    bright = image.max(axis=2) if image.ndim == 3 else image
    # the 5x5 median of the thresholded image (the same as thresholding the median, and ~30x
    # faster): a pixel is in where the majority of its 25 neighbours is
    above = (bright > threshold * full).astype(np.float32)
    mask = ndimage.uniform_filter(above, size=5) > 0.5
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(labels == int(sizes.argmax()))
    if erode > 0:
        mask = ndimage.distance_transform_edt(mask) > erode
    return np.asarray(mask, dtype=bool)


FOV_LABEL_TOLERANCE = 0.01  # share of a case's labelled pixels a thresholded FOV may leave out
FOV_RIM = 3  # pixels beyond the FOV's rim that count as the rim (a threshold shaves a few)


def _seg_index(root: Path, seg: str) -> SegIndex:
    """The DICOM SEG objects that ``data.seg`` names (a path under ``data.root``)."""
    location = Path(os.path.realpath(root / seg))  # a link out of the root counts as out
    top = Path(os.path.realpath(root))
    if location != top and top not in location.parents:
        raise MedsegError(
            f"data.seg: {seg} is outside data.root ({root}); put the SEG objects under it, so "
            "that DVC tracks them with the images"
        )
    return SegIndex.scan(location)


def _check_fov_keeps_labels(image: Path, masks: np.ndarray, fovs: np.ndarray) -> None:
    """Refuse an FOV made by thresholding that cuts away labelled anatomy.

    The threshold is made for a black surround (fundus photographs). On CT, X-ray or skin a dark
    structure (air, lungs, a dark lesion) that touches the border is not a surround; pixels outside
    the FOV are neither trained on nor scored, so cutting such a structure away would silently
    drop it. More than ``FOV_LABEL_TOLERANCE`` of a case's labelled pixels farther than
    ``FOV_RIM`` pixels outside is an error (vessels that cross a fundus rim lose a pixel or two
    there, which is no reason to refuse).
    """
    for k, mask in enumerate(masks):
        labelled = mask > 0
        total = int(np.count_nonzero(labelled))
        if not total:
            continue
        near = ndimage.binary_dilation(fovs[k if len(fovs) > 1 else 0], iterations=FOV_RIM)
        outside = int(np.count_nonzero(labelled & ~near))
        if outside > FOV_LABEL_TOLERANCE * total:
            frame = f" (frame {k + 1})" if len(masks) > 1 else ""
            raise MedsegError(
                f"{image}{frame}: {100.0 * outside / total:.1f}% of the labelled pixels lie "
                "well outside the field of view found by convert.fov_threshold; dark regions "
                "here belong to the anatomy: set convert.fov_fallback: whole_image (CT, X-ray, "
                "dermoscopy, microscopy) or give FOV masks"
            )


def _base_id(case: CaseFiles, root: Path, key: bytes | None) -> str:
    if key is not None:
        return "h" + _digest(case.image, root, key)[:12]
    return case.case_id


def _source_name(case: CaseFiles, root: Path, key: bytes | None) -> str:
    """The image's path relative to the root, or its keyed hash with ``convert.names: hash``."""
    if key is not None:
        return _hashed_source(case.image, root, key)
    rel = _relative(case.image, root)
    for part in Path(rel).parts:
        if _UID.match(part.removesuffix(Path(part).suffix) if Path(part).suffix else part):
            raise MedsegError(
                f"{case.image}: the path holds a DICOM UID ({part}), which identifies a patient's "
                "study; set convert.names: hash so that no name from the path reaches the outputs"
            )
    return rel


def _relative(path: Path, root: Path) -> str:
    return Path(os.path.relpath(path, root)).as_posix()


def _hashed_source(path: Path, root: Path, key: bytes) -> str:
    return "hmac:" + _digest(path, root, key)[:16]


def _digest(path: Path, root: Path, key: bytes) -> str:
    """HMAC-SHA256 of the path relative to the root: the same file gets the same id on every
    machine that holds the same key."""
    return hmac.new(key, _relative(path, root).encode("utf-8"), hashlib.sha256).hexdigest()


def _skip_row(problem: Problem, root: Path, key: bytes | None) -> dict[str, str]:
    """A row of ``skipped.csv``; with ``names: hash`` the file is named by its hash only."""
    if key is None:
        return {"source": _relative(problem.path, root), "reason": problem.reason}
    return {
        "source": _hashed_source(problem.path, root, key),
        "reason": _redact(problem.reason, [problem.path], root, key),
    }


# A word of a message that names a file: it holds a path separator, ends like an image file,
# or is a DICOM UID. Such words are replaced when no name may reach the outputs.
_FILE_WORD = re.compile(
    r"[^\s'\"(),;]*[/\\][^\s'\"(),;]*"
    r"|[^\s'\"(),;/\\]+\.(?:dcm|dicom|dic|ima|png|tif|tiff|gif|jpe?g|bmp|csv)\b"
    r"|\b\d+(?:\.\d+){3,}\b",
    re.IGNORECASE,
)


def _redact(
    text: str, paths: list[Path], root: Path, key: bytes, keep: tuple[Path, ...] = ()
) -> str:
    """``text`` without a name from the paths under ``root``.

    Steps: 1. each known file (absolute path, path under the root, name, stem) becomes its token,
    the one ``skipped.csv`` and the manifest give it; 2. any other word that names a file
    (see `_FILE_WORD`) becomes ``<path>``, except the root itself and ``keep`` (params and
    outputs, not data) and absolute paths outside the root."""
    tokens: dict[str, str] = {}
    for path in reversed(paths):  # the first path's token wins a name that two paths share
        token = _hashed_source(path, root, key)
        names = {str(path), _relative(path, root), path.name}
        names |= {path.stem} if len(path.stem) >= 3 else set()  # "a" would eat the prose
        tokens.update(dict.fromkeys(names, token))
    for name in sorted(tokens, key=len, reverse=True):  # whole paths before their names
        text = text.replace(name, tokens[name])
    kept = {form for p in (root, *keep) for form in (str(p), p.as_posix(), f"{p.as_posix()}/")}
    top = os.path.abspath(root)

    def word(match: re.Match[str]) -> str:
        name = match[0].rstrip(":.")
        if (
            name in kept
            or not re.search(r"[^\W\d]", name)  # "0/255" names nothing
            or (os.path.isabs(name) and not Path(os.path.abspath(name)).is_relative_to(top))
        ):
            return match[0]
        return "<path>" + match[0][len(name) :]

    return _FILE_WORD.sub(word, text)


def find_sources(root: Path, tokens: list[str], key: bytes) -> dict[str, list[Path]]:
    """The files under ``root`` behind ``hmac:...`` tokens (from ``skipped.csv``, the manifest's
    ``source`` column or a message), found by hashing every path with the key.

    Returns:
        Token -> the files it names (empty where none does).
    """
    found: dict[str, list[Path]] = {token: [] for token in tokens}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        token = _hashed_source(path, root, key)
        if token in found:
            found[token].append(path)
    return found


def id_key(start: Path | None = None, create: bool = True) -> bytes:
    """The secret key of ``convert.names: hash``.

    Looked for in this order: the environment variable ``MEDSEG_ID_KEY`` (hex, 32+ digits);
    ``.medseg/id_key`` in the working folder or a folder above it (so that a ``dvc exp run``
    in a temporary copy under ``.dvc/tmp`` finds the repository's key); else a new random key
    is written (mode 0600) at the repository root, unless ``create`` is false. A different key
    gives different ids.

    Raises:
        MedsegError: the key is malformed, or its file is readable by others.
    """
    if (value := os.environ.get(ID_KEY_ENV)) is not None:
        return _parse_key(value, f"${ID_KEY_ENV}")
    here = (start or Path.cwd()).resolve()
    for folder in (here, *here.parents):
        if (folder / ID_KEY_FILE).is_file():
            return _read_key(folder / ID_KEY_FILE)
    home = Path(*here.parts[: here.parts.index(".dvc")]) if ".dvc" in here.parts else here
    if not create:
        raise MedsegError(
            f"no id key: neither ${ID_KEY_ENV} nor {ID_KEY_FILE} in {here} or a folder above it"
        )
    return _create_key(home / ID_KEY_FILE)


def key_fingerprint(key: bytes) -> str:
    """A short public name of a key (it tells keys apart, and reveals nothing of them)."""
    return hmac.new(key, b"medseg id key fingerprint", hashlib.sha256).hexdigest()[:12]


def _parse_key(text: str, where: str) -> bytes:
    text = text.strip()
    if not _KEY_HEX.match(text) or len(text) % 2:
        raise MedsegError(
            f"{where}: the id key of convert.names: hash must be an even number of 32 or more "
            "hex digits (make one with: python -c 'import secrets; print(secrets.token_hex(32))')"
        )
    return bytes.fromhex(text)


def _read_key(path: Path) -> bytes:
    if os.name == "posix" and path.stat().st_mode & 0o077:
        raise MedsegError(f"{path}: the id key is readable by other users; run `chmod 600 {path}`")
    try:
        return _parse_key(path.read_text(encoding="ascii"), str(path))
    except (OSError, UnicodeDecodeError) as err:
        raise MedsegError(f"{path}: cannot read the id key ({err})") from None


def _create_key(path: Path) -> bytes:
    """Write a new random key, readable by its owner only; another process's key wins a race."""
    path.parent.mkdir(mode=0o700, exist_ok=True)
    ignore = path.parent / ".gitignore"  # never committed, whatever the repository's .gitignore
    if not ignore.exists():
        ignore.write_text("*\n")
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, stat.S_IRUSR | stat.S_IWUSR)
    except FileExistsError:
        return _read_key(path)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        f.write(secrets.token_hex(32) + "\n")
    log.warning(
        "%s: new id key for convert.names: hash; keep it (ids change with the key) and copy it "
        "to every machine that converts this data set", path
    )  # fmt: skip
    return _read_key(path)


def _check_unique_ids(manifest: pd.DataFrame) -> None:
    """Ids name the output files: ids equal up to letter case collide on macOS and Windows."""
    folded = manifest["case_id"].str.casefold()
    again = folded[folded.duplicated()]
    if len(again):
        first, second = manifest["case_id"][folded == again.iloc[0]].iloc[:2]
        what = (
            f"share the id {first}" if first == second
            else f"have the ids {first} and {second}, equal but for letter case (their files "
            "collide on macOS and Windows)"
        )  # fmt: skip
        raise MedsegError(
            f"two cases {what} (a frame id <id>_f<k> may collide with a file of that name); "
            "rename one of the files"
        )
