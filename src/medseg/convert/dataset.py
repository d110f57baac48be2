"""The convert stage: every case of a raw data set (any layout, DICOM/TIFF/PNG/GIF/JPEG) to
lossless PNG + manifest.

Each case is converted on its own (`medseg.convert.case`, in parallel worker processes), written
into a temporary output folder, and the folder is moved into place only when the run is
complete. A bad case either stops the run (``convert.on_error: fail``) or is left out and listed
with its reason in ``skipped.csv`` (``skip``).
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from pathlib import Path

import pandas as pd

from medseg.config.sections import ConvertConfig, DataConfig, label_map
from medseg.convert.case import MANIFEST_COLUMNS, VOLUME_DIRS, Job, Result, convert_case
from medseg.convert.fov import FOV_LABEL_TOLERANCE
from medseg.convert.groups import case_group, group_counts, numbered
from medseg.convert.ids import check_unique_ids
from medseg.convert.pseudonyms import id_key, key_fingerprint, redact, skip_row
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_dir, check_output, write_json
from medseg.io.layouts import scan_cases
from medseg.io.nnunet import nnunet_dataset
from medseg.io.seg import SegIndex, class_names
from medseg.names import CLASSES, CONVERT_RECORD
from medseg.pool import run_jobs

log = logging.getLogger(__name__)

SKIPPED_COLUMNS = ["source", "reason"]


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
        raise type(err)(redact(str(err), [], Path(data.root), key, (Path(out),))) from None


def _convert_dataset(
    data: DataConfig, cfg: ConvertConfig, out: Path, key: bytes | None
) -> pd.DataFrame:
    root = Path(data.root)
    check_output(out, {"data.root": root})  # before anything is read or removed
    segs = _seg_index(root, data.seg) if data.seg is not None else None
    group_key = (lambda: key) if key is not None else functools.cache(id_key)
    scan = scan_cases(
        root, data.layout, data.manifest, data.test_fraction, data.split_seed,
        mask_of=segs.mask_of if segs is not None else None,
        group_of=lambda case: case_group(case, root, data.group, key, group_key),
    )  # fmt: skip
    classes = data.classes
    if classes is None and segs is not None:
        classes = class_names(segs.headers)  # the segments' labels name the classes
        log.info("classes from the DICOM SEG segment labels: %s", classes)
    if classes is None and data.layout == "nnunet":
        classes = nnunet_dataset(root).classes  # dataset.json's labels name the classes
        log.info("classes from dataset.json: %s", classes)
    if scan.problems and cfg.on_error == "fail":
        raise MedsegError(_fail_hint(skip_row(scan.problems[0], root, key)["reason"]))
    with atomic_dir(out, {"data.root": root}) as tmp:
        for sub in ("images", "masks", "fov", "masks2", *VOLUME_DIRS):
            (tmp / sub).mkdir()
        labels = label_map(classes) if classes is not None else None
        jobs = [Job(case, root, tmp, cfg, labels, key) for case in scan.cases]
        results = _run(jobs, cfg)
        rows = [row for r in results for row in r.rows]
        problems = scan.problems + [r.problem for r in results if r.problem is not None]
        skipped = pd.DataFrame([skip_row(p, root, key) for p in problems], columns=SKIPPED_COLUMNS)
        skipped.to_csv(tmp / "skipped.csv", index=False)
        if not rows:
            first = f"; the first: {problems[0].reason}" if problems else ""
            raise MedsegError(f"{root}: no usable case: all {len(problems)} were skipped{first}")
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        check_unique_ids(manifest)
        manifest["group"] = numbered(manifest["group"].astype(str).tolist(), manifest["case_id"])
        for sub in ("masks2", *VOLUME_DIRS):  # only what the data set has
            if not any((tmp / sub).iterdir()):
                (tmp / sub).rmdir()
        manifest.to_csv(tmp / "manifest.csv", index=False)
        # hand back what the next stage will read (an empty mask2 cell reads as NaN)
        manifest = pd.read_csv(tmp / "manifest.csv", dtype={"case_id": str, "group": str})
        report = {
            "cases": len(manifest),
            "source_images": len(jobs) - sum(r.problem is not None for r in results),
            "skipped": len(problems),
            "on_error": cfg.on_error,
            "groups": _group_report(manifest),
        }
        if key is not None:  # which key made the ids: a different key gives different ids
            report["id_key"] = key_fingerprint(key)
        write_json(tmp / "report.json", report)
        write_json(tmp / CONVERT_RECORD, dataclasses.asdict(cfg))
        names = ["background", *classes] if classes else ["background", "foreground"]
        write_json(tmp / CLASSES, {"names": names})
    log.info(
        "converted %d cases of %d groups (patients) (%d skipped%s)",
        len(manifest), manifest["group"].nunique(), len(problems),
        ", listed in skipped.csv" if problems else "",
    )  # fmt: skip
    _report_fov_cuts(manifest)
    return manifest


def _group_report(manifest: pd.DataFrame) -> dict[str, object]:
    """The groups (patients) per split, and where they came from."""
    groups = manifest["group"].astype(str)
    return {
        "train": int(groups[manifest["split"] == "train"].nunique()),
        "test": int(groups[manifest["split"] == "test"].nunique()),
        "from": group_counts(groups.tolist()),
    }


def _report_fov_cuts(manifest: pd.DataFrame) -> None:
    """Name the cases whose thresholded FOV leaves out labels (``convert.fov_fallback: auto``):
    they keep it like every other case; the plan decides for the data set from the training
    cases alone, so a test case's labels never choose its scoring region."""
    cut = pd.to_numeric(manifest["fov_cut"], errors="coerce")
    over = manifest[cut > FOV_LABEL_TOLERANCE]
    for split, rows in over.groupby("split"):
        log.warning(
            "%d %s case(s) whose thresholded FOV leaves out more than %g%% of the labels, kept "
            "as made (the plan decides the FOV for the whole data set): %s",
            len(rows), split, 100 * FOV_LABEL_TOLERANCE, ", ".join(rows["case_id"].astype(str)),
        )  # fmt: skip


def _run(jobs: list[Job], cfg: ConvertConfig) -> list[Result]:
    """Convert every job, in worker processes when more than one is asked for, with a progress
    bar; in ``fail`` mode the first problem stops the run."""
    return run_jobs(
        convert_case, jobs, cfg.workers, check=lambda r: _finish(r, cfg), desc="convert",
        died="convert: a worker process died (out of memory?); lower convert.workers or "
        "convert.max_pixels",
    )  # fmt: skip


def _finish(result: Result, cfg: ConvertConfig) -> Result:
    if result.problem is not None and cfg.on_error == "fail":
        raise MedsegError(_fail_hint(result.problem.reason))
    return result


def _fail_hint(reason: str) -> str:
    return f"{reason} (convert.on_error: skip leaves such cases out and lists them)"


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
