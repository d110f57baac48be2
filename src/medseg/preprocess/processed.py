"""The processed data as the preprocess stage wrote it: the cases of a split, the class names
and the preprocess record. Training, evaluation and prediction read through here, without the
stage's own imports (pandas, scikit-image)."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

from medseg.config.keys import parse
from medseg.config.sections import PreprocessConfig
from medseg.errors import MedsegError
from medseg.io.atomic import write_json
from medseg.io.records import read_json
from medseg.io.shards import CaseStore
from medseg.names import CLASSES, MAX_CLASSES, PREPROCESS_RECORD

SPLITS = ("train", "val", "test")
RECORD = PREPROCESS_RECORD
T = TypeVar("T")


BINARY = ("background", "foreground")


@dataclass(frozen=True)
class Case:
    """One preprocessed case, as `read_case` gives it.

    Attributes:
        case_id: its id.
        image: (C, h, w) float32 model input (zero mean, unit variance inside the FOV).
        mask: (h, w) uint8 labels at the model's resolution (0/1 binary, else 0..K-1).
        fov: (h, w) bool field of view at the model's resolution.
        truth: (H, W) uint8 labels at the ground truth's resolution, where scores are counted
            (the same array as ``mask`` unless ``preprocess.max_side`` resized the case).
        truth_fov: (H, W) bool, the FOV at that resolution.
        mask2: (H, W) uint8 second observer's labels, or None.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    fov: np.ndarray
    truth: np.ndarray
    truth_fov: np.ndarray
    mask2: np.ndarray | None = None


def read_case(store: CaseStore, i: int) -> Case:
    """Case ``i`` of a split written by `preprocess_dataset` (views into its shards)."""
    fov = store.get(i, "fov") > 0
    mask = store.get(i, "mask")
    resized = store.has(i, "mask_full")
    return Case(
        store.ids[i],
        store.get(i, "image"),
        mask,
        fov,
        store.get(i, "mask_full") if resized else mask,
        store.get(i, "fov_full") > 0 if resized else fov,
        store.get(i, "mask2") if store.has(i, "mask2") else None,
    )


def open_split(data_dir: str | Path, split: str, ram: bool = False) -> CaseStore:
    """The cases of one split written by `preprocess_dataset`."""
    return CaseStore.open(data_dir, split, ram=ram)


def read_class_names(folder: str | Path) -> list[str]:
    """The class names in label order (background first) from ``folder/classes.json``; the
    binary pair when the file is absent."""
    path = Path(folder) / CLASSES
    if not path.is_file():
        return list(BINARY)
    raw = read_json(path, "class list")
    names = raw.get("names") if isinstance(raw, dict) else None
    return check_class_names(names, str(path))


def check_class_names(names: Any, source: str) -> list[str]:
    """``names`` as a list of 2 to `MAX_CLASSES` distinct class names; ``source`` names it in
    errors."""
    if (
        not isinstance(names, list)
        or not 2 <= len(names) <= MAX_CLASSES
        or not all(isinstance(n, str) and len(n) <= 100 for n in names)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise MedsegError(
            f"{source}: names must be a list of 2 to {MAX_CLASSES} distinct class names"
        )
    return names


def save_record(cfg: PreprocessConfig, path: str | Path) -> None:
    """Write the preprocess params as JSON, for `load_record` (e.g. beside a model)."""
    write_json(path, dataclasses.asdict(cfg))


def load_record(path: str | Path) -> PreprocessConfig:
    """Read the preprocess params written by the preprocess stage (``preprocess.json``).

    Raises:
        MedsegError: the file is missing, not JSON, or does not hold valid preprocess params.
    """
    path = Path(path)
    raw = read_json(path, "preprocess record")
    return parse_record(PreprocessConfig, raw, "preprocess.", str(path))


def parse_record(cls: type[T], raw: Any, prefix: str, source: str) -> T:
    """A record (``preprocess.json``, ``convert.json``: a params section as a stage used it)
    parsed as strictly as the params, except that a key absent from it takes its default: the
    record was written before the key existed (`medseg.names.BUNDLE_FORMAT`).

    Raises:
        MedsegError: naming ``source`` and the first unknown, mistyped or out-of-range key, or
            an absent key that has no default.
    """
    return parse(cls, raw, prefix=prefix, source=source, defaults=True)
