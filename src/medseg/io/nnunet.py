"""The ``nnunet`` layout: nnU-Net's raw data set (and the Medical Segmentation Decathlon's),
``imagesTr``/``labelsTr`` (+ ``imagesTs``/``labelsTs``) and ``dataset.json``, for NIfTI volumes
and 2D images alike; the label names of ``dataset.json`` become the class names."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

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
from medseg.io.nifti import NIFTI_SUFFIXES
from medseg.io.records import read_json

NNUNET_JSON = "dataset.json"
NNUNET_SPLITS = (("imagesTr", "labelsTr", "train"), ("imagesTs", "labelsTs", "test"))
_CHANNEL_SUFFIX = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class NnunetDataset:
    """What ``dataset.json`` of an nnU-Net raw data set says.

    Attributes:
        classes: foreground class name -> label value (or values), in label order: what
            ``data.classes`` would say.
        channels: the channel names, in channel order (``channel_names``).
        file_ending: the images' and labels' file ending (``.nii.gz``, ``.png``, ...).
    """

    classes: dict[str, int | list[int]]
    channels: list[str]
    file_ending: str

    @property
    def modality(self) -> str:
        """The first channel's modality in DICOM's words: ``CT``, ``MR``, else its name."""
        name = self.channels[0].strip() if self.channels else ""
        upper = name.upper()
        if upper == "CT" or upper.startswith("CT"):
            return "CT"
        if upper in ("MR", "MRI") or upper.startswith(("T1", "T2", "FLAIR", "ADC", "DWI")):
            return "MR"
        return name


def nnunet_dataset(root: str | Path) -> NnunetDataset:
    """Read and check ``dataset.json`` of an nnU-Net raw data set under ``root``.

    Raises:
        MedsegError: the file is missing, not JSON, or lacks ``labels``, ``channel_names`` or
            ``file_ending`` in the shape nnU-Net gives them.
    """
    path = Path(root) / NNUNET_JSON
    if not path.is_file():
        raise MedsegError(
            f"{path}: not found; the nnunet layout needs nnU-Net's dataset.json (channel_names, "
            "labels, file_ending) beside imagesTr/ and labelsTr/"
        )
    raw = read_json(path, "nnU-Net dataset description")
    if not isinstance(raw, dict):
        raise MedsegError(f"{path}: not a JSON object; see nnU-Net's dataset.json format")
    labels, channels = raw.get("labels"), raw.get("channel_names", raw.get("modality"))
    ending = raw.get("file_ending", ".nii.gz")
    if not isinstance(labels, dict) or not labels:
        raise MedsegError(f"{path}: 'labels' must map label names to values, background 0")
    if not isinstance(channels, dict) or not channels:
        raise MedsegError(f"{path}: 'channel_names' must map channel numbers to names")
    if not isinstance(ending, str) or not ending.startswith("."):
        raise MedsegError(f"{path}: 'file_ending' must be a file ending such as .nii.gz or .png")
    classes: dict[str, int | list[int]] = {}
    items = [(str(k), v) for k, v in labels.items()]
    if all(isinstance(k, str) and k.isdigit() for k, _ in items) and all(
        isinstance(v, str) for _, v in items
    ):  # the MSD's (v1) form: value -> name
        items = [(str(v), int(k)) for k, v in items]
    for name, value in items:
        ok = isinstance(value, int) or (
            isinstance(value, list) and value and all(isinstance(v, int) for v in value)
        )
        if not ok:
            raise MedsegError(f"{path}: labels.{name} must be an integer label value")
        if value != 0:  # a class name as data.classes takes it: "left atrium" -> left_atrium
            safe = re.sub(r"[^A-Za-z0-9_-]+", "_", name).strip("_") or f"class_{value}"
            classes[safe if safe[0].isalpha() else f"class_{safe}"] = value
    if not classes:
        raise MedsegError(f"{path}: 'labels' names no foreground label (a value other than 0)")
    try:
        order = sorted(channels, key=int)
    except ValueError as err:
        raise MedsegError(f"{path}: channel_names keys must be channel numbers 0, 1, ...") from err
    return NnunetDataset(classes, [str(channels[k]) for k in order], ending)


def scan_nnunet(root: Path, test_fraction: float, seed: int, mask_of: MaskOf | None) -> Scan:
    """nnU-Net raw: ``imagesTr``/``labelsTr`` (+ ``imagesTs``/``labelsTs``), ``dataset.json``."""
    desc = nnunet_dataset(root)
    if not (root / "imagesTr").is_dir():
        raise MedsegError(
            f"{root}: not an nnunet layout (expected imagesTr/ and labelsTr/ beside dataset.json);"
            " check data.root and data.layout"
        )
    _check_listed_files(root)
    scan = Scan()
    labelled_test = (root / "labelsTs").is_dir()
    for images, labels, split in NNUNET_SPLITS:
        if split == "test" and not labelled_test:
            continue  # test images without labels cannot be scored: a share of training instead
        part = _nnunet_pairs(root / images, root / labels, desc, mask_of)
        # without labelled test cases the split is drawn from the training ones, by group
        scan.cases += [with_split(c, split if labelled_test else "") for c in part.cases]
        scan.problems += part.problems
    if not labelled_test:  # one pool: the test split is drawn by `scan_cases`, by group
        check_unique(root, scan.cases)
    return scan


def _nnunet_pairs(folder: Path, labels: Path, desc: NnunetDataset, mask_of: MaskOf | None) -> Scan:
    """The cases of one images folder: channel files grouped by case, each with its label."""
    ending, n_channels = desc.file_ending.lower(), len(desc.channels)
    by_case: dict[str, dict[int, Path]] = {}
    scan = Scan()
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        if not path.name.lower().endswith(ending):
            if path.name.lower() not in OS_LEFTOVERS:
                reason = f"{path}: not a {desc.file_ending} file (dataset.json's file_ending)"
                scan.problems.append(Problem(path, reason))
            continue
        stem = path.name[: -len(ending)]
        found = _CHANNEL_SUFFIX.match(stem)
        case, channel = (found["case"], int(found["channel"])) if found else (stem, 0)
        by_case.setdefault(case, {})[channel] = path
    for case, files in sorted(by_case.items()):
        want = list(range(n_channels))
        if sorted(files) != want:
            missing = [f"{case}_{c:04d}{desc.file_ending}" for c in want if c not in files]
            extra = [files[c].name for c in files if c not in want]
            what = f"missing {', '.join(missing)}" if missing else f"extra {', '.join(extra)}"
            scan.problems.append(
                Problem(
                    files[min(files)],
                    f"{folder / case}: {what}; dataset.json names {n_channels} channel(s) "
                    f"({', '.join(desc.channels)}), one file each",
                )
            )
            continue
        image = files[0]
        mask: Path | Problem | None
        if mask_of is not None:
            mask = given_mask(mask_of, image)
        else:
            label = labels / f"{case}{desc.file_ending}"
            mask = label if label.is_file() else None
        if isinstance(mask, Problem):
            scan.problems.append(mask)
            continue
        if mask is None:
            reason = f"{image}: no label {labels.name}/{case}{desc.file_ending} for this image"
            scan.problems.append(Problem(image, reason))
            continue
        channels = tuple(files[c] for c in want[1:])
        scan.cases.append(
            CaseFiles(safe_id(case), "", image, mask, None, None, channels, desc.modality)
        )
    return scan


def _check_listed_files(root: Path) -> None:
    """Refuse a ``dataset.json`` whose ``training`` (or ``test``) list names missing files.

    Raises:
        MedsegError: naming dataset.json, the first missing file and how many are missing.
    """
    raw = read_json(root / NNUNET_JSON, "nnU-Net dataset description")
    listed: list[str] = []
    for key in ("training", "test"):
        for entry in raw.get(key) or []:
            values = entry.values() if isinstance(entry, dict) else [entry]
            listed += [v for v in values if isinstance(v, str)]
    missing = [v for v in listed if not _listed_exists(root, v)]
    if missing:
        raise MedsegError(
            f"{root / NNUNET_JSON}: names {len(missing)} file(s) that are missing, the first "
            f"{missing[0]}; restore them or remove them from dataset.json"
        )


def _listed_exists(root: Path, value: str) -> bool:
    """Whether a file named in dataset.json exists (MSD lists images without their ``_0000``)."""
    path = root / value
    if path.is_file():
        return True
    for ending in (*NIFTI_SUFFIXES, ".png", ".tif", ".tiff"):
        if path.name.endswith(ending):
            stem = path.name[: -len(ending)]
            return (path.parent / f"{stem}_0000{ending}").is_file()
    return False
