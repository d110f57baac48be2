"""The cases of a preprocessed split predicted one scored unit at a time: a 2D case as it is,
a volume's slices (store entries with ``volume``, ``z`` and ``depth``, written in slice order by
preprocess) together, stacked into the volume (`medseg.inference.predictor.Predictor.
predict_volume`). Validation, the post-processing choice and evaluate all go through here, so a
volume is scored, and post-processed, as one 3D case everywhere."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.predictor import Predictor
from medseg.io.shards import CaseStore
from medseg.preprocess.processed import read_case
from medseg.progress import progress


@dataclass(frozen=True)
class Predicted:
    """One scored unit: a 2D case, or a volume.

    Attributes:
        case_id: the case's id, or the volume's.
        pred: (H, W) uint8 labels; a volume's (Z, H, W).
        probs: (K, H, W) float32 probabilities; a volume's (K, Z, H, W).
        truth: labels of ``pred``'s shape, at the ground truth's resolution.
        fov: bool of ``pred``'s shape.
        spacing: (row, column) mm, a volume's (slice, row, column); None where unknown.
        images: the model inputs, (C, h, w) each: one for a 2D case, one per slice.
        mask2: a 2D case's second observer's labels, or None.
    """

    case_id: str
    pred: np.ndarray
    probs: np.ndarray
    truth: np.ndarray
    fov: np.ndarray
    spacing: tuple[float, ...] | None
    images: list[np.ndarray]
    mask2: np.ndarray | None = None

    @property
    def volume(self) -> bool:
        return self.pred.ndim == 3

    def worst_slice(self) -> int:
        """A volume's slice with the most wrong voxels inside the FOV (the middle one where
        none is wrong): the one its overlay shows."""
        errors = ((self.pred != self.truth) & self.fov).sum(axis=(1, 2))
        return int(np.argmax(errors)) if errors.any() else len(errors) // 2


def predict_store(
    predictor: Predictor, store: CaseStore, desc: str = "predict", leave: bool = True
) -> Iterator[Predicted]:
    """Every case of ``store`` predicted, volumes whole; memory holds one unit at a time. A
    progress bar (``desc``, counting the store's cases) shows on a terminal.

    Raises:
        MedsegError: a volume whose slices are missing or out of order in the store.
    """
    bar = progress(total=len(store), desc=desc, leave=leave)
    try:
        yield from _predicted(predictor, store, bar)
    finally:
        bar.close()


def _predicted(predictor: Predictor, store: CaseStore, bar: Any) -> Iterator[Predicted]:
    i = 0
    while i < len(store):
        meta = store.meta(i)
        if "volume" not in meta:
            case = read_case(store, i)
            pred, probs = predictor.predict(case.image, case.fov, out_fov=case.truth_fov)
            yield Predicted(
                case.case_id, pred, probs, case.truth, case.truth_fov, case_spacing(meta),
                [case.image], case.mask2,
            )  # fmt: skip
            store.release(i)
            i += 1
            bar.update(1)
            continue
        volume, depth = str(meta["volume"]), int(meta["depth"])
        for z, j in enumerate(range(i, i + depth)):
            other = store.meta(j) if j < len(store) else {}
            if other.get("volume") != volume or other.get("z") != z:
                raise MedsegError(
                    f"{store.folder}: volume {volume} has {depth} slices but its slice {z} is "
                    "missing or out of order in the case store; rerun preprocess"
                )
        cases = [read_case(store, j) for j in range(i, i + depth)]
        truth_fov = [c.truth_fov for c in cases]
        pred, probs = predictor.predict_volume(
            [c.image for c in cases], [c.fov for c in cases], truth_fov
        )
        yield Predicted(
            volume, pred, probs, np.stack([c.truth for c in cases]), np.stack(truth_fov),
            volume_spacing(meta), [c.image for c in cases],
        )  # fmt: skip
        for j in range(i, i + depth):
            store.release(j)
        i += depth
        bar.update(depth)


def case_spacing(meta: dict) -> tuple[float, float] | None:
    """A case's pixel spacing (row, column; mm, at the ground truth's size) from its store
    entry."""
    value = meta.get("spacing")
    return (float(value[0]), float(value[1])) if value else None


def volume_spacing(meta: dict) -> tuple[float, float, float] | None:
    """A slice's volume spacing (slice, row, column) in mm from its store entry; None where a
    part is unknown."""
    row_col = case_spacing(meta)
    z = float(meta.get("slice_spacing") or "nan")
    if row_col is None or not (math.isfinite(z) and z > 0):
        return None
    return (z, *row_col)
