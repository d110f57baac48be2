"""Segmentation metrics, in two steps: confusion counts, then scores (vectorised numpy).

Rule for empty cases: a score whose denominator is 0 is 1.0 when the truth and the prediction
agree that there is nothing to find (e.g. Dice and IoU when neither has foreground, sensitivity
when the truth has no foreground), so an image with no vessels and no false alarm scores
perfectly instead of producing NaN. AUC is NaN when the truth holds only one class.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.stats import rankdata

SCORE_NAMES = ("dice", "iou", "accuracy", "sensitivity", "specificity", "precision")


@dataclass(frozen=True)
class Confusion:
    """Pixel counts of a binary segmentation against its truth."""

    tp: int
    fp: int
    fn: int
    tn: int

    def __add__(self, other: Confusion) -> Confusion:
        return Confusion(
            self.tp + other.tp, self.fp + other.fp, self.fn + other.fn, self.tn + other.tn
        )


def confusion(pred: np.ndarray, truth: np.ndarray, valid: np.ndarray | None = None) -> Confusion:
    """Count TP, FP, FN, TN over pixels where ``valid`` is true (all pixels when None).

    Args:
        pred, truth: bool arrays of one shape.
        valid: bool array of the same shape, e.g. the FOV mask.
    """
    if valid is not None:
        pred, truth = pred[valid], truth[valid]
    pred, truth = pred.astype(bool, copy=False), truth.astype(bool, copy=False)
    tp = int(np.count_nonzero(pred & truth))
    fp = int(np.count_nonzero(pred & ~truth))
    fn = int(np.count_nonzero(~pred & truth))
    return Confusion(tp, fp, fn, int(pred.size) - tp - fp - fn)


def _ratio(num: int, den: int) -> float:
    return num / den if den else 1.0


def scores(c: Confusion) -> dict[str, float]:
    """Dice (= F1), IoU (Jaccard), accuracy, sensitivity (recall), specificity, precision."""
    return {
        "dice": _ratio(2 * c.tp, 2 * c.tp + c.fp + c.fn),
        "iou": _ratio(c.tp, c.tp + c.fp + c.fn),
        "accuracy": _ratio(c.tp + c.tn, c.tp + c.fp + c.fn + c.tn),
        "sensitivity": _ratio(c.tp, c.tp + c.fn),
        "specificity": _ratio(c.tn, c.tn + c.fp),
        "precision": _ratio(c.tp, c.tp + c.fp),
    }


def auc_roc(prob: np.ndarray, truth: np.ndarray) -> float:
    """Area under the ROC curve, exact, by the rank-sum (Mann-Whitney U) identity; ties averaged.

    Args:
        prob: (N,) scores.
        truth: (N,) bool.

    Returns:
        AUC in [0, 1], or NaN when ``truth`` is all one class.
    """
    truth = truth.astype(bool, copy=False).ravel()
    n_pos = int(truth.sum())
    n_neg = truth.size - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(prob.ravel())
    return float((ranks[truth].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


def roc_points(prob: np.ndarray, truth: np.ndarray, n: int = 201) -> dict[str, np.ndarray]:
    """ROC curve sampled at ``n`` evenly spaced thresholds in [0, 1] (for plots, not for AUC).

    Returns:
        ``threshold``, ``fpr``, ``tpr``: (n,) float arrays, thresholds descending.
    """
    truth = truth.astype(bool, copy=False).ravel()
    edges = np.linspace(0.0, 1.0, n)
    idx = np.clip(np.searchsorted(edges, prob.ravel(), side="right") - 1, 0, n - 1)
    pos = np.bincount(idx[truth], minlength=n)[::-1].cumsum()
    neg = np.bincount(idx[~truth], minlength=n)[::-1].cumsum()
    return {
        "threshold": edges[::-1],
        "fpr": neg / max(int((~truth).sum()), 1),
        "tpr": pos / max(int(truth.sum()), 1),
    }
