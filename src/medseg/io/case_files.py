"""What a data set layout finds: the files of each case (`CaseFiles`), the problems of the
cases it leaves out (`Problem`), both together (`Scan`), and the checks every layout shares
(`medseg.io.layouts` has the registry and the 2D layouts, `medseg.io.nnunet` nnU-Net's)."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from medseg.errors import MedsegError

_SAFE_ID = re.compile(r"[^A-Za-z0-9._-]+")

OS_LEFTOVERS = ("thumbs.db", "ehthumbs.db", "desktop.ini")  # written by file browsers, skipped

MaskOf = Callable[[Path], "Path | None"]


@dataclass(frozen=True)
class CaseFiles:
    """The files of one case, as found in a layout.

    Attributes:
        case_id: unique, filesystem-safe identifier (never taken from DICOM patient fields).
        split: ``train`` or ``test``.
        image: the image file.
        mask: the ground-truth mask file.
        fov: the field-of-view mask file, or ``None`` when the layout has none.
        mask2: a second observer's mask (DRIVE ``2nd_manual``), or ``None``.
        channels: the files of the image's further channels, in order (nnU-Net ``_0001``,
            ``_0002``, ...); empty for a one-file image.
        modality: what the layout says the image is (``CT``, ``MR``, ...); empty where it says
            nothing.
        group: the patient the case belongs to. As a layout finds it: the ``group``/``patient``
            column of a manifest, or empty; once `scan_cases` returns: the case's group (as
            its ``group_of`` decides).
    """

    case_id: str
    split: str
    image: Path
    mask: Path
    fov: Path | None
    mask2: Path | None = None
    channels: tuple[Path, ...] = ()
    modality: str = ""
    group: str = ""


@dataclass(frozen=True)
class Problem:
    """A file that cannot become a case, and why (the message names the file)."""

    path: Path
    reason: str


@dataclass
class Scan:
    """What a layout holds: usable cases, and problems with single files."""

    cases: list[CaseFiles] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)


def safe_id(name: str) -> str:
    """A filesystem-safe case id from a file stem: other characters become ``_``."""
    return _SAFE_ID.sub("_", name).strip("._") or "case"


def check_unique(root: Path, cases: list[CaseFiles]) -> None:
    seen: dict[str, CaseFiles] = {}
    for case in cases:
        key = case.case_id.casefold()
        if key in seen:
            first = seen[key]
            ids = (
                f"the case id {case.case_id}" if first.case_id == case.case_id
                else f"the case ids {first.case_id} and {case.case_id}, equal but for letter "
                "case (their files collide on macOS and Windows)"
            )  # fmt: skip
            raise MedsegError(
                f"{root}: {first.image} and {case.image} both give {ids}; rename one of them"
            )
        seen[key] = case


def given_mask(mask_of: MaskOf, image: Path) -> Path | Problem:
    """The mask ``mask_of`` gives for ``image``, or the problem of its absence."""
    try:
        found = mask_of(image)
    except MedsegError as err:
        return Problem(image, str(err))
    if found is None:
        return Problem(image, f"{image}: no DICOM SEG object in data.seg refers to this image")
    return found


def with_split(case: CaseFiles, split: str) -> CaseFiles:
    return dataclasses.replace(case, split=split)
