"""The one scoring tally (`ScoreTally`) and threshold grid (`CURVE_POINTS`) that validation,
evaluate and crossval share, the second observer, and the content of ``metrics.json``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from medseg.errors import MedsegError
from medseg.labels import LabelSpace
from medseg.scoring.metrics import (
    RANKING_NAMES,
    SCORE_NAMES,
    Confusion,
    ScoreHistogram,
    best_dice_threshold,
    confusion,
    confusion_matrix,
    curves,
    ranking_scores,
    scores,
    threshold_counts,
)
from medseg.scoring.shapes import ShapeScoring, ShapeTally

log = logging.getLogger(__name__)

PRECISION = 4  # decimals kept in metrics.json: finer changes are noise, not results
# the one threshold grid, 0.000, 0.005, ..., 1.000: the ROC and PR curve files and the
# validation threshold (evaluate.threshold: auto) are read off it
CURVE_POINTS = 201
METRIC_NAMES = (*SCORE_NAMES, *RANKING_NAMES)


@dataclass
class _ClassTally:
    """Running totals of one foreground class over the test images."""

    fov: Confusion = field(default_factory=lambda: Confusion(0, 0, 0, 0))
    whole: Confusion = field(default_factory=lambda: Confusion(0, 0, 0, 0))
    fov_hist: ScoreHistogram = field(default_factory=ScoreHistogram)
    all_hist: ScoreHistogram = field(default_factory=ScoreHistogram)
    pos: np.ndarray = field(default_factory=lambda: np.zeros(CURVE_POINTS, np.int64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(CURVE_POINTS, np.int64))


class ScoreTally:
    """Collects the scores of images one at a time (validation, test, each crossval fold), then
    summarises them, in memory that does not grow with the pixels (pooled AUCs from
    `ScoreHistogram`).

    Binary models (one output channel) are scored on their foreground. Models with ``K > 1``
    classes (class 0 the background) are scored per foreground class, one class against the
    rest, and the summary's top level holds the unweighted mean over those classes.

    Args:
        n_classes: output channels of the model: 1 (binary) or K > 1.
        names: the class names in label order, background first; default those of
            `medseg.labels.LabelSpace.of`. Names of the data set's own (``data.classes``)
            add per-class blocks to the summary even for a binary model.
        light: collect only what validation needs (`pooled_dice`, `best_threshold`): the pooled
            FOV counts and the threshold grid's, no ranking scores, per-image rows or
            whole-image counts; non-finite probabilities are counted below every threshold,
            as a training run whose weights overflow is stopped by its loss, not here.
    """

    def __init__(
        self, n_classes: int, names: list[str] | None = None, light: bool = False,
        shapes: ShapeScoring | None = None,
    ) -> None:  # fmt: skip
        self.light = light
        self.space = LabelSpace.of(n_classes, names or None)
        self.names = list(self.space.names)
        self.named = self.space.named
        self.labels = self.space.foreground_labels
        self.tallies = {k: _ClassTally() for k in self.labels}
        self.rows: list[dict] = []
        self.matrix = np.zeros((len(self.names),) * 2, dtype=np.int64)
        self.shapes = ShapeTally(shapes, self.names) if shapes is not None else None

    def add(self, case_id: str, probs: np.ndarray, pred: np.ndarray, truth: np.ndarray,
            fov: np.ndarray, spacing: Sequence[float] | None = None) -> None:  # fmt: skip
        """Score one image, or one volume as a whole (its slices stacked: every array gains a
        slice axis Z before H, and boundaries and lesions are measured in 3D).

        Args:
            case_id: the image's id, for the per-image table.
            probs: (K, H, W) float32 class probabilities (K = 1: the foreground's); (K, Z, H, W).
            pred: (H, W) integer labels predicted (`medseg.inference.predictor.Predictor.predict`).
            truth: (H, W) integer true labels, in ``[0, max(K, 2))``.
            fov: (H, W) bool field of view; the FOV scores count only these pixels.
            spacing: (row, column) pixel spacing in mm ((slice, row, column) for a volume), for
                boundary distances in mm.
        """
        if not self.light and not np.isfinite(probs).all():
            raise MedsegError(
                f"case {case_id}: the model gave NaN or infinite probabilities; the weights "
                "are broken (retrain, or check train.lr and the training log)"
            )
        if not self.light:
            self.matrix += confusion_matrix(pred, truth, len(self.matrix), fov)
        for k in self.labels:
            prob_k = self.space.class_probability(probs, k)
            truth_k, pred_k = truth == k, pred == k
            tally = self.tallies[k]
            c_fov = confusion(pred_k, truth_k, fov)
            tally.fov += c_fov
            p_in, t_in = prob_k[fov], truth_k[fov]
            pos, neg = threshold_counts(p_in, t_in, CURVE_POINTS)
            tally.pos += pos
            tally.neg += neg
            if self.light:
                continue
            c_all = confusion(pred_k, truth_k)
            tally.whole += c_all
            tally.fov_hist.add(p_in, t_in)
            tally.all_hist.add(prob_k, truth_k)
            shape_row = (
                {} if self.shapes is None else self.shapes.add(k, pred_k, truth_k, fov, spacing)
            )
            self.rows.append(
                {
                    "case_id": case_id,
                    "class": self.names[k],
                    **scores(c_fov),
                    **ranking_scores(p_in, t_in),
                    **{f"whole_image_{n}": v for n, v in scores(c_all).items()},
                    **shape_row,
                }
            )

    def pooled_dice(self) -> float:
        """The pooled FOV Dice so far; for K > 1 the mean over the foreground classes (what
        validation picks the best epoch by)."""
        return float(np.mean([scores(self.tallies[k].fov)["dice"] for k in self.labels]))

    def best_threshold(self) -> tuple[float, float] | None:
        """A binary model's threshold on the `CURVE_POINTS` grid with the best pooled FOV Dice,
        and that Dice (`medseg.scoring.metrics.best_dice_threshold`); None for several classes."""
        if not self.space.binary:
            return None
        return best_dice_threshold(self.tallies[1].pos, self.tallies[1].neg)

    def per_image(self) -> pd.DataFrame:
        """One row per image (and class, for K > 1): FOV scores, then whole-image scores."""
        table = pd.DataFrame(self.rows)
        return table if self.named else table.drop(columns="class")

    def summary(self) -> dict:
        """The nested metrics: ``fov`` (pooled), ``fov_per_image_mean``, ``fov_per_image_std``
        (sample standard deviation over images, ddof 1), ``whole_image`` (pooled); for K > 1
        also ``classes.class_<k>`` with the same blocks per class."""
        per_class = {k: self._class_summary(k) for k in self.labels}
        # the per-image blocks average each image's classes first, then the images
        table = pd.DataFrame(self.rows)
        fov_cols = list(METRIC_NAMES)
        by_image = table.groupby("case_id", sort=False)[fov_cols].mean()
        out: dict = {
            "fov": _mean_blocks([s["fov"] for s in per_class.values()]),
            "fov_per_image_mean": by_image.mean().to_dict(),
            "fov_per_image_std": by_image.std(ddof=1).to_dict(),
            "whole_image": _mean_blocks([s["whole_image"] for s in per_class.values()]),
        }
        if self.named:
            out["classes"] = {self.names[k]: s for k, s in per_class.items()}
        if self.shapes is not None:
            head, by_name = self.shapes.summary()
            out.update(head)
            for name, blocks in by_name.items() if self.named else ():
                out["classes"][name].update(blocks)
        return out

    def _class_summary(self, k: int) -> dict:
        tally = self.tallies[k]
        table = pd.DataFrame(self.rows)
        rows = table[table["class"] == self.names[k]][list(METRIC_NAMES)]
        return {
            "fov": {**scores(tally.fov), **tally.fov_hist.scores()},
            "fov_per_image_mean": rows.mean().to_dict(),
            "fov_per_image_std": rows.std(ddof=1).to_dict(),
            "whole_image": {**scores(tally.whole), **tally.all_hist.scores()},
        }

    def curves(self) -> tuple[pd.DataFrame, pd.DataFrame]:
        """ROC (``threshold, fpr, tpr``) and precision-recall (``threshold, recall,
        precision``) curves pooled inside the FOV, `CURVE_POINTS` thresholds each; with a
        ``class`` column for K > 1."""
        rocs, prs = [], []
        for k in self.labels:
            c = curves(self.tallies[k].pos, self.tallies[k].neg)
            roc = pd.DataFrame({"threshold": c["threshold"], "fpr": c["fpr"], "tpr": c["tpr"]})
            pr = pd.DataFrame(
                {"threshold": c["threshold"], "recall": c["tpr"], "precision": c["precision"]}
            )
            if self.named:
                roc.insert(0, "class", self.names[k])
                pr.insert(0, "class", self.names[k])
            rocs.append(roc)
            prs.append(pr)
        return pd.concat(rocs, ignore_index=True), pd.concat(prs, ignore_index=True)

    def confusion_table(self) -> pd.DataFrame:
        """The pooled FOV confusion matrix, one row per (truth, prediction) pair: ``pixels``
        and ``share_of_truth`` (the row-normalised share, i.e. recall on the diagonal)."""
        names = list(self.names)
        row_totals = self.matrix.sum(axis=1, keepdims=True)
        shares = self.matrix / np.maximum(row_totals, 1)
        return pd.DataFrame(
            [
                {
                    "truth": names[t],
                    "prediction": names[p],
                    "pixels": int(self.matrix[t, p]),
                    "share_of_truth": round(float(shares[t, p]), PRECISION),
                }
                for t in range(len(names))
                for p in range(len(names))
            ]
        )


def _mean_blocks(blocks: list[dict[str, float]]) -> dict[str, float]:
    if len(blocks) == 1:
        return dict(blocks[0])
    return {name: float(np.nanmean([b[name] for b in blocks])) for name in blocks[0]}


class SecondObserver:
    """The second observer scored against the first inside the FOV, pooled over the cases that
    have one: the human reference a model is compared with.

    Args:
        n_classes: the model's output channels (1: binary).
    """

    def __init__(self, n_classes: int) -> None:
        self.labels = LabelSpace.of(n_classes).foreground_labels
        self.totals = {k: Confusion(0, 0, 0, 0) for k in self.labels}
        self.n = 0

    def add(self, first: np.ndarray, second: np.ndarray, fov: np.ndarray) -> None:
        """One case: (H, W) integer labels of both observers, (H, W) bool FOV."""
        self.n += 1
        for k in self.labels:
            self.totals[k] += confusion(second == k, first == k, fov)

    def summary(self) -> dict | None:
        """Threshold scores (no AUC: the second observer gives labels, not probabilities), the
        mean over foreground classes for K > 1, and ``n_images``; None when no case had one."""
        if self.n == 0:
            return None
        return {**_mean_blocks([scores(c) for c in self.totals.values()]), "n_images": self.n}


def build_metrics(tally: ScoreTally, second: dict | None, threshold: float) -> dict:
    """The content of ``metrics.json``: ``test.fov`` first (Dice, IoU and accuracy lead each
    block), rounded to `PRECISION` decimals, NaN as null."""
    test = tally.summary()
    if second is not None:
        test["second_observer"] = second
    out = {"test": test, "n_images": len({r["case_id"] for r in tally.rows}),
           "threshold": threshold}  # fmt: skip
    if tally.shapes is not None and tally.shapes.scoring.boundary:
        out["boundary_unit"] = tally.shapes.scoring.unit
    return _rounded(out)


def _rounded(tree: dict) -> dict:
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _rounded(value)
        elif isinstance(value, float | np.floating):
            out[key] = None if np.isnan(value) else round(float(value), PRECISION)
        else:
            out[key] = value
    return out
