"""Boundary distances and lesion counts of each test case, for the scoring tally.

The pixel metrics (`medseg.scoring.metrics`) say how many pixels are right; organ and lesion users
are also judged by where the edges lie (HD95, ASSD, NSD: `medseg.scoring.boundary`) and by how many
lesions were found, missed or invented (`medseg.scoring.lesions`). `ShapeTally` computes both per
case and class at the ground truth's resolution inside the FOV and summarises them over cases for
``metrics.json``; `ShapeScoring.from_config` decides what is computed, and in which unit.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from medseg.config import EvaluateConfig
from medseg.errors import MedsegError
from medseg.scoring.boundary import BoundaryTally, boundary_scores
from medseg.scoring.case_summary import mean_over_classes
from medseg.scoring.lesions import LesionTally, lesion_counts

MM, PX = "mm", "px"


@dataclass(frozen=True)
class ShapeScoring:
    """What the tally computes beyond pixel counts.

    Attributes:
        boundary: HD95, ASSD and NSD per case and class.
        unit: ``mm`` (each case's pixel spacing) or ``px``.
        tolerance: the NSD tolerance, in ``unit``.
        lesion_labels: the labels that get lesion-wise counts (none: no lesion block).
    """

    boundary: bool
    unit: str
    tolerance: float
    lesion_labels: frozenset[int]

    @classmethod
    def from_config(
        cls,
        cfg: EvaluateConfig,
        spacings: Sequence[tuple[float, float] | None],
        labels: Sequence[int],
        thin: Iterable[int] = (),
    ) -> ShapeScoring:
        """The scoring the ``evaluate`` section asks for, given the test cases.

        Args:
            cfg: ``evaluate.boundary``, ``boundary_tolerance``, ``boundary_unit`` (``auto``: mm
                where every test case has a pixel spacing, else px), ``lesions`` (``auto``:
                every foreground label but the thin ones).
            spacings: each test case's (row, column) spacing in mm, None where unknown.
            labels: the foreground labels scored.
            thin: the labels whose training masks are thin (tubular) structures, where a
                broken vessel would count as many lesions.

        Raises:
            MedsegError: ``boundary_unit: mm`` with a test case of unknown spacing.
        """
        known = all(s is not None for s in spacings)
        unit = cfg.boundary_unit if cfg.boundary_unit != "auto" else (MM if known else PX)
        if cfg.boundary and unit == MM and not known:
            raise MedsegError(
                "params: evaluate.boundary_unit is mm but some test cases have no pixel "
                "spacing (only DICOM files give one); set it to px or auto"
            )
        if cfg.lesions == "auto":
            lesion_labels = frozenset(labels) - frozenset(thin)
        else:
            lesion_labels = frozenset(labels) if cfg.lesions else frozenset()
        return cls(cfg.boundary, unit, cfg.boundary_tolerance, lesion_labels)


class ShapeTally:
    """Boundary and lesion scores of the test cases, per class by name."""

    def __init__(self, scoring: ShapeScoring, names: Sequence[str]) -> None:
        self.scoring = scoring
        self.names = list(names)
        self.boundary = BoundaryTally()
        self.lesions = LesionTally()

    def add(
        self,
        label: int,
        pred: np.ndarray,
        truth: np.ndarray,
        fov: np.ndarray,
        spacing: tuple[float, float] | None,
    ) -> dict[str, Any]:
        """Score one case's class ``label``: (H, W) bool masks at the truth's resolution and
        its spacing in mm (used when the unit is mm); the columns it adds to ``per_image.csv``."""
        row: dict[str, Any] = {}
        name = self.names[label]
        if self.scoring.boundary:
            scale = spacing if self.scoring.unit == MM else None
            scores = boundary_scores(
                pred, truth, fov, spacing=scale, tolerance=self.scoring.tolerance
            )
            self.boundary.add(name, scores)
            row.update(scores.row())
        if label in self.scoring.lesion_labels:
            counts = lesion_counts(pred, truth, fov)
            self.lesions.add(name, counts)
            row.update(counts.row())
        return row

    def summary(self) -> tuple[dict[str, dict], dict[str, dict]]:
        """The headline blocks (``boundary``, ``lesions``: the unweighted mean over classes,
        counts summed) and the same blocks per class name."""
        per_class: dict[str, dict] = {}
        for what, tally in (("boundary", self.boundary), ("lesions", self.lesions)):
            for name, block in tally.summary().items():
                per_class.setdefault(name, {})[what] = block
        head: dict[str, dict] = {}
        for what in ("boundary", "lesions"):
            blocks = {n: b[what] for n, b in per_class.items() if what in b}
            if blocks:
                head[what] = mean_over_classes(blocks)
        return head, per_class
