"""Data set layouts: find each case's image, mask, FOV mask (and second-observer mask) under a
data root.

- ``drive``: ``training|test/images``, ``1st_manual``, ``mask`` and, where present,
  ``2nd_manual`` (a second human observer, kept as a reference), paired by the case number;
- ``folders``: ``images/`` + ``masks/`` (+ ``fov/``) paired by file stem, either at the root (a
  seeded split) or under ``train|training/`` and ``test|testing/`` (the split from the folder);
- ``manifest``: a CSV under the root with columns ``image, mask[, fov][, mask2][, split]
  [, case_id][, group or patient]``, paths relative to the CSV and inside the root;
- ``nnunet``: nnU-Net's raw layout (and the Medical Segmentation Decathlon's):
  ``imagesTr/<case>_0000<ending>`` (one file per channel, ``_0000``, ``_0001``, ...; MSD names
  have no channel suffix), ``labelsTr/<case><ending>``, ``imagesTs`` and ``labelsTs`` for test
  cases with labels (without ``labelsTs`` a seeded share of the training cases), and
  ``dataset.json`` (``channel_names``, ``labels`` name -> value, ``file_ending``), whose label
  names become the class names (`nnunet_dataset`). NIfTI volumes and 2D PNG/TIFF alike.

Images may be NIfTI volumes (``.nii``, ``.nii.gz``) in every layout but ``drive``.

Every case belongs to a group (a patient; `medseg.convert.groups` decides it), and the test
split a layout leaves to chance (``data.test_fraction``) keeps each group on one side.

Every file must lie under the root once links are resolved (a link into DVC's cache, as
``cache.type: symlink`` makes, is fine): DVC tracks only the root, and a link out of it could pull
in anyone's files. Case ids that differ only in letter case are refused: their output files
collide on macOS and Windows.

`scan_cases` reports problems with single cases (an image without a mask, a missing file) apart
from the cases it found, so the caller may skip them.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.errors import MedsegError
from medseg.io.case_files import (
    OS_LEFTOVERS,
    CaseFiles,
    MaskOf,
    Problem,
    Scan,
    check_unique,
    given_mask,
    safe_id,
    with_split,
)
from medseg.io.dicom import is_dicom_file
from medseg.io.nifti import NIFTI_SUFFIXES, is_nifti, nifti_stem
from medseg.io.nnunet import scan_nnunet
from medseg.io.reader import IMAGE_SUFFIXES

DRIVE_SPLITS = {"training": "train", "test": "test"}
FOLDER_SPLITS = {"train": "train", "training": "train", "test": "test", "testing": "test"}
MANIFEST_REQUIRED = ("image", "mask")
MANIFEST_OPTIONAL = ("fov", "mask2", "split", "case_id", "group", "patient")
GROUP_COLUMNS = ("group", "patient")  # a manifest's explicit group, either name
SPLIT_VALUES = {"train": "train", "training": "train", "test": "test", "testing": "test"}
# an object of a DVC cache: ``<cache>/files/md5/ab/cdef...`` (DVC 2: ``<cache>/ab/cdef...``)
_DVC_OBJECT = re.compile(r"(^|/)[0-9a-f]{2}/[0-9a-f]{30,}$")
log = logging.getLogger(__name__)


def scan_cases(
    root: str | Path,
    layout: str,
    manifest: str = "manifest.csv",
    test_fraction: float = 0.2,
    seed: int = 0,
    mask_of: MaskOf | None = None,
    group_of: Callable[[CaseFiles], str] | None = None,
) -> Scan:
    """Find the cases under ``root`` in the named layout.

    Args:
        root: the data set folder (``data.root``).
        layout: one of `LAYOUTS` (``drive``, ``folders`` or ``manifest``).
        manifest: the CSV file under ``root`` (layout ``manifest``).
        test_fraction: share of cases sent to ``test`` where the layout gives no split.
        seed: seed of that split.
        mask_of: where each image's mask comes from instead of the layout's mask files (a
            DICOM SEG object that refers to it, ``data.seg``); ``None`` for an image that has
            none. The layout's masks are then neither needed nor read.
        group_of: the group of a case (`medseg.convert.groups.decide_group`); asked once per
            case, after the files outside the root are left out. Default: the layout's group
            (a manifest's column), else the image's path relative to the root.

    Returns:
        The cases, sorted by split (train first) and id, and the problems found.

    Raises:
        MedsegError: the root or the layout as a whole is unusable (not a folder, wrong layout,
            no case at all, duplicate case ids), ``group_of`` refuses a case, or a split to draw
            finds a single group.
    """
    root = Path(root)
    if not root.is_dir():
        raise MedsegError(
            f"data.root: {root} is not a folder; set data.root in params.yaml to your data set "
            "(e.g. dvc exp run -S data.root=/path/to/DRIVE)"
        )
    if layout not in LAYOUTS:
        raise MedsegError(f"data.layout: unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
    scan = LAYOUTS[layout](root, manifest, test_fraction, seed, mask_of)
    if not scan.cases and not scan.problems:
        raise MedsegError(f"{root}: no cases found in the {layout} layout (the data set is empty)")
    scan = _inside_root(root, scan)
    group = group_of or (
        lambda case: case.group or Path(os.path.relpath(case.image, root)).as_posix()
    )
    scan.cases = [dataclasses.replace(case, group=group(case)) for case in scan.cases]
    drawn = [case for case in scan.cases if not case.split]
    given = [case for case in scan.cases if case.split]
    scan.cases = given + _seeded_split(drawn, test_fraction, seed, root)
    _warn_shared_groups(given)
    scan.cases = _qualified(root, scan.cases)
    scan.cases.sort(key=lambda c: (c.split != "train", c.case_id))
    return scan


def _warn_shared_groups(cases: list[CaseFiles]) -> None:
    """A split the data set gives (folders, a split column) that puts a group on both sides is
    kept, as given, but said: its test scores are optimistic."""
    sides: dict[str, set[str]] = {}
    for case in cases:
        sides.setdefault(case.group, set()).add(case.split)
    shared = sum(len(s) > 1 for s in sides.values())
    if shared:
        log.warning(
            "%d of %d groups (patients) have cases in both the train and test split the data "
            "set gives; its test scores are optimistic (a leak). Give a split by patient, or "
            "set data.group if the groups are wrong",
            shared, len(sides),
        )  # fmt: skip


def _inside_root(root: Path, scan: Scan) -> Scan:
    """The scan without the cases that have a file outside ``root`` once links are resolved;
    each becomes a `Problem` naming the file and where it leads."""
    top = Path(os.path.realpath(root))
    kept = Scan(problems=list(scan.problems))
    for case in scan.cases:
        files = [f for f in (case.image, case.mask, case.fov, case.mask2) if f is not None]
        files += list(case.channels)
        outside = [(f, real) for f in files if not _under(real := Path(os.path.realpath(f)), top)]
        if not outside:
            kept.cases.append(case)
            continue
        path, real = outside[0]
        kept.problems.append(
            Problem(
                case.image,
                f"{path}: leads to {real}, outside data.root ({root}) once links are resolved; "
                "DVC tracks only what lies under data.root: copy the file in",
            )
        )
    return kept


def _under(real: Path, top: Path) -> bool:
    """Whether a resolved path lies under ``top``, or is an object of a DVC cache."""
    return top in real.parents or bool(_DVC_OBJECT.search(real.as_posix()))


def _qualified(root: Path, cases: list[CaseFiles]) -> list[CaseFiles]:
    """Ids need only be unique within their split: an id found in both splits (a common export:
    ``training/images/0001.png`` and ``test/images/0001.png``) becomes ``<split>_<id>`` in each.

    Ids are compared ignoring letter case (macOS and Windows do).

    Raises:
        MedsegError: two files of one split give the same id, or a qualified id collides.
    """
    for split in ("train", "test"):
        check_unique(root, [c for c in cases if c.split == split])
    splits: dict[str, set[str]] = {}
    for case in cases:
        splits.setdefault(case.case_id.casefold(), set()).add(case.split)
    out = [
        dataclasses.replace(case, case_id=f"{case.split}_{case.case_id}")
        if len(splits[case.case_id.casefold()]) > 1
        else case
        for case in cases
    ]
    check_unique(root, out)
    return out


def _drive(root: Path, mask_of: MaskOf | None = None) -> Scan:
    """DRIVE: ``training|test/images/NN_*.ext``, ``1st_manual/NN_*``, ``mask/NN_*``."""
    present = [d for d in DRIVE_SPLITS if (root / d / "images").is_dir()]
    if not present:
        raise MedsegError(
            f"{root}: not a DRIVE layout (expected training/images and test/images folders); "
            "check data.root and data.layout"
        )
    scan = Scan()
    for folder in present:
        split = DRIVE_SPLITS[folder]
        base = root / folder
        masks = _by_key(base / "1st_manual", _drive_key)
        fovs = _by_key(base / "mask", _drive_key)
        seconds = _by_key(base / "2nd_manual", _drive_key)
        for image in _images_in(base / "images"):
            key = _drive_key(image)
            mask = masks.get(key) if mask_of is None else given_mask(mask_of, image)
            if isinstance(mask, Problem):
                scan.problems.append(mask)
                continue
            if mask is None:
                reason = f"{image}: no vessel mask {folder}/1st_manual/{key}_* for this image"
                scan.problems.append(Problem(image, reason))
                continue
            scan.cases.append(
                CaseFiles(
                    case_id=safe_id(image.stem),
                    split=split,
                    image=image,
                    mask=mask,
                    fov=fovs.get(key),
                    mask2=seconds.get(key) if mask_of is None else None,
                )
            )
    return scan


def _folders(root: Path, test_fraction: float, seed: int, mask_of: MaskOf | None) -> Scan:
    """``images/``, ``masks/``, ``fov/`` at the root, or under ``train/`` and ``test/``."""
    split_dirs = {
        FOLDER_SPLITS[d.name.lower()]: d
        for d in sorted(root.iterdir())
        if d.is_dir() and d.name.lower() in FOLDER_SPLITS and (d / "images").is_dir()
    }
    if (root / "images").is_dir() and split_dirs:
        raise MedsegError(
            f"{root}: has both images/ and {'/'.join(sorted(split_dirs))}/images; use one or the "
            "other (folders layout)"
        )
    if split_dirs:
        scan = Scan()
        for split, base in sorted(split_dirs.items()):
            part = _folder_pairs(base, mask_of)
            scan.cases += [with_split(c, split) for c in part.cases]
            scan.problems += part.problems
        return scan
    if not (root / "images").is_dir():
        raise MedsegError(
            f"{root}: not a folders layout (expected images/ and masks/, or train/images and "
            "test/images); check data.root and data.layout"
        )
    scan = _folder_pairs(root, mask_of)
    check_unique(root, scan.cases)  # one pool: a split must not part two colliding ids
    return scan  # the split is drawn by `scan_cases`, by group


def _folder_pairs(base: Path, mask_of: MaskOf | None) -> Scan:
    masks = _by_key(base / "masks", _stem)
    fovs = _by_key(base / "fov", _stem)
    scan = Scan()
    folder = base / "images"
    if folder.is_dir():  # a file there that no reader takes is named, never silently dropped
        for other in sorted(p for p in folder.iterdir() if p.is_file() and not _is_image(p)):
            if not other.name.startswith(".") and other.name.lower() not in OS_LEFTOVERS:
                scan.problems.append(Problem(other, _unsupported(other)))
    for image in _images_in(folder):
        key = _stem(image)
        mask = masks.get(key) if mask_of is None else given_mask(mask_of, image)
        if isinstance(mask, Problem):
            scan.problems.append(mask)
            continue
        if mask is None:
            scan.problems.append(
                Problem(image, f"{image}: no mask {base.name}/masks/{key}.* for this image")
            )
            continue
        scan.cases.append(CaseFiles(safe_id(key), "", image, mask, fovs.get(key)))
    return scan


# == nnU-Net raw layout =========================================================================


def _manifest(
    root: Path, name: str, test_fraction: float, seed: int, mask_of: MaskOf | None
) -> Scan:
    """The cases a CSV under the root lists (``image, mask[, fov][, mask2][, split][, case_id]
    [, group or patient]``), each row checked; a bad row is a problem of that case.

    Long because one pass over the rows checks and collects each in turn (its files inside the
    root, its split, id and group); split up, the row's context would travel between helpers.
    """
    csv = root / name
    if not csv.is_file():
        raise MedsegError(
            f"{csv}: manifest not found; put the CSV under data.root and name it in data.manifest"
        )
    if not _under(Path(os.path.realpath(csv)), Path(os.path.realpath(root))):
        raise MedsegError(
            f"data.manifest: {csv} leads to {os.path.realpath(csv)}, outside data.root ({root}) "
            "once links are resolved; put the CSV under data.root"
        )
    try:
        table = pd.read_csv(csv, dtype=str, keep_default_na=False, skipinitialspace=True)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as err:
        raise MedsegError(f"{csv}: not a readable CSV file ({err})") from err
    table.columns = [str(c).strip().lower() for c in table.columns]
    required = MANIFEST_REQUIRED if mask_of is None else ("image",)
    missing = [c for c in required if c not in table.columns]
    unknown = [c for c in table.columns if c not in MANIFEST_REQUIRED + MANIFEST_OPTIONAL]
    if missing or unknown:
        what = f"missing column {missing[0]!r}" if missing else f"unknown column {unknown[0]!r}"
        raise MedsegError(
            f"{csv}: {what}; "
            + f"columns are {', '.join(MANIFEST_REQUIRED)} and optionally "
            + ", ".join(MANIFEST_OPTIONAL)
        )
    scan = Scan()
    has_split = "split" in table.columns
    group_column = next((c for c in GROUP_COLUMNS if c in table.columns), None)
    for line, row in enumerate(table.to_dict("records"), start=2):
        where = f"{csv} line {line}"
        try:
            files = {
                col: _inside(root, csv.parent, row[col], f"{where}, column {col}")
                for col in ("image", "mask", "fov", "mask2")
                if row.get(col, "").strip()
            }
            for col in required:
                if col not in files:
                    raise MedsegError(f"{where}: the {col} column is empty")
            if mask_of is not None:
                mask = given_mask(mask_of, files["image"])
                if isinstance(mask, Problem):
                    scan.problems.append(mask)
                    continue
                files["mask"] = mask
            split = ""
            if has_split:
                split = SPLIT_VALUES.get(row["split"].strip().lower(), "")
                if not split:
                    raise MedsegError(f"{where}: split {row['split']!r} is not one of train, test")
            case_id = row.get("case_id", "").strip()
            if case_id and safe_id(case_id) != case_id:
                raise MedsegError(
                    f"{where}: case_id {case_id!r} may only hold letters, digits, '.', '_', '-'"
                )
        except MedsegError as err:
            scan.problems.append(Problem(csv, str(err)))
            continue
        image = files["image"]
        scan.cases.append(
            CaseFiles(
                case_id or safe_id(image.stem),
                split,
                image,
                files["mask"],
                files.get("fov"),
                files.get("mask2"),
                group=row[group_column].strip() if group_column else "",
            )
        )
    if not has_split:
        check_unique(root, scan.cases)  # one pool: a split must not part two colliding ids
    return scan  # without a split column the split is drawn by `scan_cases`, by group


def _inside(root: Path, base: Path, value: str, where: str) -> Path:
    """``value`` (relative to ``base``) as a path, refused unless it is a file under ``root``."""
    path = Path(os.path.normpath(base / value.strip()))
    top = Path(os.path.normpath(root))
    if path != top and top not in path.parents:
        raise MedsegError(f"{where}: {value.strip()} is outside data.root ({root}); refused")
    if not path.is_file():
        raise MedsegError(f"{where}: {value.strip()} does not exist (looked for {path})")
    return path


def _seeded_split(
    cases: list[CaseFiles], test_fraction: float, seed: int, root: Path | None = None
) -> list[CaseFiles]:
    """Send about ``round(test_fraction * n)`` cases to test, whole groups at a time, seeded:
    at least one group, never all.

    1. Groups are ordered by their first case id (so the split depends neither on the listing
       order nor on the groups' names, which are keyed hashes), then shuffled.
    2. Groups go to test in that order while they fit in ``round(test_fraction * n)`` cases (the
       first always goes), until it is reached or one group is left for training.

    With one case per group this is the per-case split of earlier versions, case for case.

    Raises:
        MedsegError: two or more cases, all of one group.
    """
    if not cases:
        return []
    ordered = sorted(cases, key=lambda c: c.case_id)
    size: dict[str, int] = {}
    for case in ordered:  # insertion order: by first case id
        size[case.group] = size.get(case.group, 0) + 1
    groups = list(size)
    if len(groups) == 1 and len(ordered) > 1:
        raise MedsegError(
            f"{root}: all {len(ordered)} cases belong to one group (patient), so no test split "
            "can keep a patient out of training; set data.group (file: every file its own "
            "group, folder, or a file-name pattern), or give the split (train/ and test/ "
            "folders, a split column)"
        )
    n_test = min(max(round(test_fraction * len(ordered)), 1), max(len(ordered) - 1, 0))
    test: set[str] = set()
    taken = 0
    for i in np.random.default_rng(seed).permutation(len(groups))[: len(groups) - 1]:
        if taken >= n_test:
            break
        if not test or taken + size[groups[i]] <= n_test:
            test.add(groups[i])
            taken += size[groups[i]]
    return [with_split(c, "test" if c.group in test else "train") for c in ordered]


def _is_image(path: Path) -> bool:
    if not path.is_file() or path.name.startswith("."):
        return False
    if is_nifti(path):
        return True
    return path.suffix.lower() in IMAGE_SUFFIXES or (not path.suffix and is_dicom_file(path))


def _unsupported(path: Path) -> str:
    return (
        f"{path}: not an image type medseg reads ({path.suffix or 'no ending'}); supported: "
        f"{', '.join(IMAGE_SUFFIXES + NIFTI_SUFFIXES)} and DICOM files without an ending. "
        "Convert it, move it "
        "out of images/, or set convert.on_error: skip"
    )


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if _is_image(p)) if folder.is_dir() else []


def _drive_key(path: Path) -> str:
    """DRIVE pairs files by the number before the first underscore: ``21_training`` -> ``21``."""
    return path.stem.split("_", 1)[0]


def _stem(path: Path) -> str:
    return nifti_stem(path) if is_nifti(path) else path.stem


def _by_key(folder: Path, key_of: Callable[[Path], str]) -> dict[str, Path]:
    found: dict[str, Path] = {}
    for path in _images_in(folder):
        key = key_of(path)
        if key in found:
            raise MedsegError(
                f"{path}: {folder} holds two files for the key {key} "
                f"({found[key].name} and {path.name}); keep one"
            )
        found[key] = path
    return found


# data.layout: every name of `medseg.names.LAYOUTS` and how its cases are found; each takes
# (root, manifest, test_fraction, seed, mask_of) and uses what its layout needs
LAYOUTS: dict[str, Callable[[Path, str, float, int, MaskOf | None], Scan]] = {
    "drive": lambda root, _manifest_name, _fraction, _seed, mask_of: _drive(root, mask_of),
    "folders": lambda root, _manifest_name, fraction, seed, mask_of: _folders(
        root, fraction, seed, mask_of
    ),
    "manifest": _manifest,
    "nnunet": lambda root, _manifest_name, fraction, seed, mask_of: scan_nnunet(
        root, fraction, seed, mask_of
    ),
}
