"""Groups: the patient each case belongs to, so that every split keeps a patient on one side.

`decide_group` decides a case's group once, in the convert stage, from what is known of it, in
this order:

1. an explicit group: a ``group`` or ``patient`` column of the ``manifest`` layout (or of a
   volume data set's own table);
2. the ``data.group`` rule when it is not ``auto``: ``file`` (every file its own group),
   ``folder`` (the folder that holds the image) or a pattern whose one capture group finds the
   patient in the file name (``^(.+)_\\d+`` for ``<patient>_<slice>.png``);
3. the DICOM ``PatientID``;
4. else the DICOM ``StudyInstanceUID``;
5. else the file itself (its ``source``, as the manifest names it: the frames of a multi-frame
   file stay together).

Every group but the last is written as a keyed hash (``patient:``, ``study:`` or ``group:`` and
16 hex digits of an HMAC-SHA256 with the id key of `medseg.convert.pseudonyms`): no patient
identifier reaches the manifest, a log or the plan, and without the key nobody can test a
guessed identifier against it.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.errors import InvalidDicomError

from medseg.convert.pseudonyms import hashed_source, relative
from medseg.errors import MedsegError
from medseg.io.case_files import CaseFiles
from medseg.io.reader import source_format
from medseg.names import AUTO

FILE, FOLDER = "file", "folder"
KeySource = Callable[[], bytes]  # the id key, asked for only when a group needs hashing
_KINDS = ("patient", "study", "group")
_TOKEN = re.compile(r"[0-9a-f]{16}")  # what `token` writes after the kind


@dataclass(frozen=True)
class GroupFacts:
    """What is known of a case that may name its group.

    Attributes:
        image: the image file (a volume's file, or one file of a DICOM series).
        source: the file's name in the outputs (the manifest's ``source``).
        explicit: a group given by the data set (a ``group``/``patient`` column); empty if none.
        patient_id: the DICOM ``PatientID``; empty if none.
        study_uid: the DICOM ``StudyInstanceUID``; empty if none.
    """

    image: Path
    source: str
    explicit: str = ""
    patient_id: str = ""
    study_uid: str = ""


def decide_group(facts: GroupFacts, rule: str, root: Path, key: KeySource) -> str:
    """The group of a case: the first of explicit column, ``data.group`` rule, DICOM
    ``PatientID``, ``StudyInstanceUID``, the file itself (see the module's docstring).

    Args:
        facts: what is known of the case.
        rule: ``data.group``: ``auto``, ``file``, ``folder`` or a pattern with one capture group.
        root: ``data.root`` (``folder`` names the image's folder relative to it).
        key: returns the id key; called only when the group is a hash.

    Returns:
        The group: a keyed-hash token, or ``facts.source``.

    Raises:
        MedsegError: the pattern does not match the file's name (or captures nothing).
    """
    if facts.explicit.strip():
        return token("group", "column:" + facts.explicit.strip(), key())
    if rule == FILE:
        return facts.source
    if rule == FOLDER:
        return token("group", "folder:" + relative(facts.image.parent, root), key())
    if rule != AUTO:
        found = re.search(rule, facts.image.name)
        if found is None or not found.group(1):
            raise MedsegError(
                f"{facts.image}: data.group {rule!r} does not find a patient in the file name "
                f"{facts.image.name!r}; fix the pattern (its one capture group is the patient) "
                "or set data.group: file or folder"
            )
        return token("group", "name:" + found.group(1), key())
    if facts.patient_id.strip():
        return token("patient", facts.patient_id.strip(), key())
    if facts.study_uid.strip():
        return token("study", facts.study_uid.strip(), key())
    return facts.source


def token(kind: str, value: str, key: bytes) -> str:
    """``<kind>:`` and 16 hex digits of the HMAC-SHA256 of ``value`` under ``key``."""
    assert kind in _KINDS
    mac = hmac.new(key, f"{kind}:{value}".encode(), hashlib.sha256).hexdigest()
    return f"{kind}:{mac[:16]}"


def numbered(groups: Sequence[str], case_ids: Sequence[str]) -> list[str]:
    """The keyed-hash groups (`token`) renamed ``<kind>:<n>``: ``n`` counts the groups of that
    kind, from 1, in the order of each group's first case id; other groups are kept.

    The manifest then holds the same bytes whatever the id key (a clone, another machine, a
    new key), so DVC sees the same data set everywhere, and it says no more than which cases
    share a patient. The splits never read the names (`medseg.io.layouts`: by first case id).
    """
    names: dict[str, str] = {}
    count: dict[str, int] = {}
    for group, _ in sorted(zip(groups, case_ids, strict=True), key=lambda gc: gc[1]):
        kind, _, rest = group.partition(":")
        if group in names or kind not in _KINDS or not _TOKEN.fullmatch(rest):
            continue
        count[kind] = count.get(kind, 0) + 1
        names[group] = f"{kind}:{count[kind]}"
    return [names.get(group, group) for group in groups]


def dicom_ids(path: Path) -> tuple[str, str]:
    """The ``PatientID`` and ``StudyInstanceUID`` of a DICOM file (empty where absent or the
    file cannot be read: its reader reports that, with the case). Reads the header only."""
    try:
        ds = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["PatientID", "StudyInstanceUID"]
        )
    except (InvalidDicomError, OSError, ValueError, EOFError, TypeError, AttributeError):
        return "", ""
    return str(ds.get("PatientID", "") or ""), str(ds.get("StudyInstanceUID", "") or "")


def group_counts(groups: list[str]) -> dict[str, int]:
    """How many distinct groups there are, by where they came from (``patient``, ``study``,
    ``group``; ``file`` for the files that are their own group)."""
    counts: dict[str, int] = {}
    for group in sorted(set(groups)):
        kind = group.split(":", 1)[0] if group.split(":", 1)[0] in _KINDS else FILE
        counts[kind] = counts.get(kind, 0) + 1
    return counts


def case_group(
    case: CaseFiles, root: Path, rule: str, names_key: bytes | None, key: KeySource
) -> str:
    """The group of a case a layout found (`medseg.io.layouts.scan_cases`'s ``group_of``).

    Args:
        case: the case; its ``group`` is the layout's explicit group (a manifest column).
        root: ``data.root``.
        rule: ``data.group``.
        names_key: the key of ``convert.names: hash`` (the source is then a hash), else None.
        key: returns the id key, for the groups that are hashes.
    """
    source = (
        hashed_source(case.image, root, names_key) if names_key is not None
        else relative(case.image, root)
    )  # fmt: skip
    patient_id = study_uid = ""
    if rule == AUTO and not case.group.strip() and _is_dicom(case.image):
        patient_id, study_uid = dicom_ids(case.image)
    facts = GroupFacts(case.image, source, case.group, patient_id, study_uid)
    return decide_group(facts, rule, root, key)


def _is_dicom(path: Path) -> bool:
    try:
        return source_format(path) == "dicom"
    except MedsegError:  # a file no reader takes: its case reports it
        return False
