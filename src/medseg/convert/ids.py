"""Case ids: made from the paths (or their keyed hashes), checked to name no patient's study
and to give every case its own output files."""

from __future__ import annotations

import re
from pathlib import Path

import pandas as pd

from medseg.convert.pseudonyms import digest, hashed_source, relative
from medseg.errors import MedsegError
from medseg.io.case_files import CaseFiles

# A path part made of 4+ dot-separated numbers is a DICOM UID, which identifies a study or image.
_UID = re.compile(r"^\d+(\.\d+){3,}$")


def base_id(case: CaseFiles, root: Path, key: bytes | None) -> str:
    """The case's id: the layout's, or ``h`` and 12 hex digits of its keyed hash."""
    if key is not None:
        return "h" + digest(case.image, root, key)[:12]
    return case.case_id


def source_name(case: CaseFiles, root: Path, key: bytes | None) -> str:
    """The image's path relative to the root, or its keyed hash with ``convert.names: hash``."""
    if key is not None:
        return hashed_source(case.image, root, key)
    rel = relative(case.image, root)
    for part in Path(rel).parts:
        if _UID.match(part.removesuffix(Path(part).suffix) if Path(part).suffix else part):
            raise MedsegError(
                f"{case.image}: the path holds a DICOM UID ({part}), which identifies a patient's "
                "study; set convert.names: hash so that no name from the path reaches the outputs"
            )
    return rel


def check_unique_ids(manifest: pd.DataFrame) -> None:
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
