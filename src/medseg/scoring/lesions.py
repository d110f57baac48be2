"""Lesion-wise detection of one case and one class: connected components matched by overlap.

Definitions:

- **Lesions**: the connected components of the truth and of the prediction, each cut to the
  field of view first, with 8-connectivity (two pixels touching at a corner are one lesion;
  `scipy.ndimage.label` with a 3x3 block of ones).
- **Matching**: one-to-one and greedy by IoU. Every (truth, prediction) pair of components that
  overlaps (IoU > 0) is a candidate; pairs are taken in order of decreasing IoU (ties: lower
  truth label, then lower prediction label, in row-major labelling order), each component at
  most once. A prediction that merges two true lesions therefore detects one of them, and the
  other counts as missed; a true lesion split in two predictions is found once, and the other
  piece counts as invented.
- **Detection** (any overlap): TP = matched pairs, FN = true lesions left unmatched (missed),
  FP = predicted components left unmatched (invented). Lesion-wise precision TP / (TP + FP),
  recall TP / (TP + FN), F1 2TP / (2TP + FP + FN).
- **Panoptic quality** (Kirillov et al. 2019): the matched pairs with IoU > 0.5 (at that
  threshold a component has at most one such partner, so these are exactly the pairs of the
  standard PQ matching, and the greedy order does not change them). RQ = TP' / (TP' + FP'/2 +
  FN'/2), SQ = mean IoU of those pairs, PQ = SQ x RQ, where TP' counts those pairs and FP', FN'
  the components not in one.

Empty cases, the rule of `medseg.scoring.metrics` (a score whose denominator is 0 is 1.0: nothing
was there to get wrong): precision 1.0 when nothing is predicted, recall 1.0 when the truth has no
lesion, F1, RQ and PQ 1.0 when neither has one. SQ is 1.0 when neither has a lesion, and NaN
(no pair to average; left out of means over cases, and counted) when lesions exist but none
matches at IoU > 0.5; PQ is then 0.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.scoring.boundary import masked_inputs
from medseg.scoring.case_summary import summarize

CONNECTIVITY = np.ones((3, 3), bool)  # 8-connectivity in 2D
PQ_IOU = 0.5
LESION_NAMES = ("precision", "recall", "f1", "pq", "sq", "rq")


def _ratio(numerator: float, denominator: float) -> float:
    return 1.0 if denominator == 0 else numerator / denominator


@dataclass(frozen=True)
class LesionCounts:
    """Lesion counts of one case and one class; the scores are derived from them.

    ``n_truth`` and ``n_pred`` are the numbers of components, ``detected`` the matched pairs
    (any overlap), ``pq_matched`` the matched pairs with IoU > 0.5 and ``pq_iou_sum`` the sum of
    their IoUs. Counts add over cases (`__add__`), which gives the pooled lesion scores.
    """

    n_truth: int
    n_pred: int
    detected: int
    pq_matched: int
    pq_iou_sum: float

    def __add__(self, other: LesionCounts) -> LesionCounts:
        return LesionCounts(
            self.n_truth + other.n_truth,
            self.n_pred + other.n_pred,
            self.detected + other.detected,
            self.pq_matched + other.pq_matched,
            self.pq_iou_sum + other.pq_iou_sum,
        )

    @property
    def missed(self) -> int:
        """False negatives: true lesions without a matched prediction."""
        return self.n_truth - self.detected

    @property
    def invented(self) -> int:
        """False positives: predicted components without a matched true lesion."""
        return self.n_pred - self.detected

    @property
    def precision(self) -> float:
        """Lesion-wise TP / (TP + FP); 1.0 when nothing is predicted."""
        return _ratio(self.detected, self.n_pred)

    @property
    def recall(self) -> float:
        """Lesion-wise TP / (TP + FN); 1.0 when the truth has no lesion."""
        return _ratio(self.detected, self.n_truth)

    @property
    def f1(self) -> float:
        """Lesion-wise 2 TP / (2 TP + FP + FN); 1.0 when neither side has a lesion."""
        return _ratio(2 * self.detected, self.n_truth + self.n_pred)

    @property
    def rq(self) -> float:
        """Recognition quality: TP' / (TP' + FP'/2 + FN'/2) = 2 TP' / (n_truth + n_pred)."""
        return _ratio(2 * self.pq_matched, self.n_truth + self.n_pred)

    @property
    def sq(self) -> float:
        """Segmentation quality: mean IoU of the pairs matched at IoU > 0.5; NaN if none while
        lesions exist, 1.0 if neither side has one."""
        if self.pq_matched == 0:
            return 1.0 if self.n_truth + self.n_pred == 0 else float("nan")
        return self.pq_iou_sum / self.pq_matched

    @property
    def pq(self) -> float:
        """Panoptic quality SQ x RQ (0 where SQ is NaN: no pair matched)."""
        return 0.0 if self.pq_matched == 0 and self.n_truth + self.n_pred else self.sq * self.rq

    def row(self) -> dict[str, float | int]:
        """The case's counts and scores as one row of ``per_image.csv`` (``lesion_`` keys)."""
        return {
            "lesion_truth": self.n_truth,
            "lesion_pred": self.n_pred,
            "lesion_tp": self.detected,
            "lesion_fn": self.missed,
            "lesion_fp": self.invented,
            **{f"lesion_{name}": getattr(self, name) for name in LESION_NAMES},
        }


def components(mask: np.ndarray) -> tuple[np.ndarray, int]:
    """8-connected components of a mask (26-connected of a volume).

    Args:
        mask: (H, W) or (Z, H, W) bool.

    Returns:
        int32 labels of the mask's shape (0 background, 1..n in row-major order of first
        pixel) and n.
    """
    structure = CONNECTIVITY if mask.ndim == 2 else np.ones((3,) * mask.ndim, bool)
    labels, n = ndimage.label(mask, structure=structure)
    return labels.astype(np.int32, copy=False), int(n)


def match_components(
    truth_labels: np.ndarray, n_truth: int, pred_labels: np.ndarray, n_pred: int
) -> list[tuple[int, int, float]]:
    """The module's one-to-one greedy matching by IoU of two labellings.

    Args:
        truth_labels, pred_labels: (H, W) integer labels, 0 background, components 1..n.
        n_truth, n_pred: the numbers of components.

    Returns:
        ``(truth label, prediction label, IoU)`` of each matched pair, in decreasing IoU.
    """
    both = (truth_labels > 0) & (pred_labels > 0)
    if not both.any():
        return []
    pair_codes = truth_labels[both].astype(np.int64) * (n_pred + 1) + pred_labels[both]
    codes, overlap = np.unique(pair_codes, return_counts=True)
    t, p = codes // (n_pred + 1), codes % (n_pred + 1)
    area_t = np.bincount(truth_labels.ravel(), minlength=n_truth + 1)
    area_p = np.bincount(pred_labels.ravel(), minlength=n_pred + 1)
    iou = overlap / (area_t[t] + area_p[p] - overlap)
    order = np.lexsort((p, t, -iou))
    used_t, used_p = np.zeros(n_truth + 1, bool), np.zeros(n_pred + 1, bool)
    matches = []
    for i in order:
        if not used_t[t[i]] and not used_p[p[i]]:
            used_t[t[i]] = used_p[p[i]] = True
            matches.append((int(t[i]), int(p[i]), float(iou[i])))
    return matches


def lesion_counts(
    pred: np.ndarray, truth: np.ndarray, fov: np.ndarray | None = None
) -> LesionCounts:
    """Lesion-wise detection counts of one case and one class.

    Args:
        pred, truth: (H, W) bool (or 0/1) masks of one class, or (Z, H, W) volumes.
        fov: (H, W) bool field of view; None for the whole image. Both masks are cut to it.
    """
    pred, truth, _ = masked_inputs(pred, truth, fov)
    # components and overlaps on the bounding box of both masks: the labels outside are 0
    union = pred | truth
    if not union.any():
        return LesionCounts(0, 0, 0, 0, 0.0)
    box = []
    for axis in range(union.ndim):
        where = np.flatnonzero(union.any(axis=tuple(a for a in range(union.ndim) if a != axis)))
        box.append(slice(where[0], where[-1] + 1))
    pred, truth = pred[tuple(box)], truth[tuple(box)]
    truth_labels, n_truth = components(truth)
    pred_labels, n_pred = components(pred)
    matches = match_components(truth_labels, n_truth, pred_labels, n_pred)
    pq_ious = [iou for _, _, iou in matches if iou > PQ_IOU]
    return LesionCounts(n_truth, n_pred, len(matches), len(pq_ious), float(sum(pq_ious)))


class LesionTally:
    """Lesion counts of many cases, per class by name: per-case statistics and pooled counts."""

    def __init__(self) -> None:
        self._cases: dict[str, list[LesionCounts]] = {}

    def add(self, class_name: str, counts: LesionCounts) -> None:
        """Add one case's counts of one class."""
        self._cases.setdefault(class_name, []).append(counts)

    def summary(self) -> dict[str, dict]:
        """Per class: ``{"per_case": {precision, recall, f1, pq, sq, rq: {mean, median, p05, n,
        n_excluded}}, "pooled": {truth, pred, tp, fn, fp, precision, recall, f1, pq, sq, rq}}``.

        ``pooled`` adds the counts of all cases first (a lesion weighs the same wherever it is),
        ``per_case`` gives every case the same weight.
        """
        out: dict[str, dict] = {}
        for name, cases in self._cases.items():
            total = sum(cases[1:], cases[0])
            out[name] = {
                "per_case": {
                    metric: summarize([getattr(c, metric) for c in cases], higher_is_better=True)
                    for metric in LESION_NAMES
                },
                "pooled": {
                    key.removeprefix("lesion_"): None if value != value else value  # NaN: null
                    for key, value in total.row().items()
                },
            }
        return out
