"""Data set layouts: find each case's image, vessel mask and FOV mask under a data root."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from medseg.errors import MedsegError
from medseg.io.images import IMAGE_SUFFIXES

DRIVE_SPLITS = {"training": "train", "test": "test"}


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, as found in a layout.

    Attributes:
        case_id: unique, filesystem-safe identifier (never taken from DICOM patient fields).
        split: ``train`` or ``test``.
        image: the image file.
        mask: the ground-truth mask file.
        fov: the field-of-view mask file, or ``None`` when the layout has none.
    """

    case_id: str
    split: str
    image: Path
    mask: Path
    fov: Path | None


def find_cases(root: str | Path, layout: str) -> list[CaseFiles]:
    """List the cases of the data set under ``root`` in the named layout, sorted by split and id."""
    root = Path(root)
    if not root.is_dir():
        raise MedsegError(
            f"data.root: {root} is not a folder; set data.root in params.yaml to your data set "
            "(e.g. dvc exp run -S data.root=/path/to/DRIVE)"
        )
    if layout == "drive":
        cases = _drive(root)
    else:
        raise MedsegError(f"data.layout: unknown layout {layout!r}; known: drive")
    if not cases:
        raise MedsegError(f"{root}: no cases found in the {layout} layout")
    return cases


def _drive(root: Path) -> list[CaseFiles]:
    """DRIVE: ``training|test/images/NN_*.ext``, ``1st_manual/NN_*``, ``mask/NN_*``."""
    present = [d for d in DRIVE_SPLITS if (root / d / "images").is_dir()]
    if not present:
        raise MedsegError(
            f"{root}: not a DRIVE layout (expected training/images and test/images folders); "
            "check data.root and data.layout"
        )
    cases: list[CaseFiles] = []
    for folder in present:
        split = DRIVE_SPLITS[folder]
        base = root / folder
        masks = _by_key(base / "1st_manual")
        fovs = _by_key(base / "mask")
        for image in sorted(p for p in (base / "images").iterdir() if _is_image(p)):
            key = _key(image)
            if key not in masks:
                raise MedsegError(
                    f"{image}: no vessel mask {folder}/1st_manual/{key}_* for this image"
                )
            cases.append(
                CaseFiles(
                    case_id=image.stem,
                    split=split,
                    image=image,
                    mask=masks[key],
                    fov=fovs.get(key),
                )
            )
    ids = [c.case_id for c in cases]
    dupes = sorted({i for i in ids if ids.count(i) > 1})
    if dupes:
        raise MedsegError(f"{root}: several images share the case id {dupes[0]}")
    return cases


def _is_image(path: Path) -> bool:
    return (
        path.is_file() and not path.name.startswith(".") and path.suffix.lower() in IMAGE_SUFFIXES
    )


def _key(path: Path) -> str:
    """DRIVE pairs files by the number before the first underscore: ``21_training`` -> ``21``."""
    return path.stem.split("_", 1)[0]


def _by_key(folder: Path) -> dict[str, Path]:
    if not folder.is_dir():
        return {}
    found: dict[str, Path] = {}
    for path in sorted(folder.iterdir()):
        if _is_image(path):
            key = _key(path)
            if key in found:
                raise MedsegError(f"{path}: two files in {folder} share the case key {key}")
            found[key] = path
    return found
