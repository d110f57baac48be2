"""Scoring of the test cases: whole-image inference, FOV metrics, tables, curves, overlays."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.config import EvaluateConfig
from medseg.errors import MedsegError
from medseg.inference import predict_probabilities, prepare_model, segment
from medseg.io.atomic import atomic_dir, write_json
from medseg.io.images import write_png
from medseg.metrics import (
    RANKING_NAMES,
    SCORE_NAMES,
    Confusion,
    confusion,
    confusion_matrix,
    curves,
    ranking_scores,
    scores,
    threshold_counts,
)
from medseg.model import load_model, resolve_device
from medseg.preprocess import SplitArrays, crop_to, load_split

log = logging.getLogger(__name__)

PRECISION = 4  # decimals kept in metrics.json: finer changes are noise, not results
CURVE_POINTS = 201  # thresholds 0.000, 0.005, ..., 1.000 for the ROC and PR curve files
METRIC_NAMES = (*SCORE_NAMES, *RANKING_NAMES)

# overlay colours (RGB): true positive, false positive, false negative
TP_COLOUR = np.array([0, 220, 0], dtype=np.float32)
FP_COLOUR = np.array([255, 40, 40], dtype=np.float32)
FN_COLOUR = np.array([40, 120, 255], dtype=np.float32)


@dataclass
class _ClassTally:
    """Running totals of one foreground class over the test images."""

    fov: Confusion = field(default_factory=lambda: Confusion(0, 0, 0, 0))
    whole: Confusion = field(default_factory=lambda: Confusion(0, 0, 0, 0))
    fov_probs: list[np.ndarray] = field(default_factory=list)
    fov_truth: list[np.ndarray] = field(default_factory=list)
    all_probs: list[np.ndarray] = field(default_factory=list)
    all_truth: list[np.ndarray] = field(default_factory=list)
    pos: np.ndarray = field(default_factory=lambda: np.zeros(CURVE_POINTS, np.int64))
    neg: np.ndarray = field(default_factory=lambda: np.zeros(CURVE_POINTS, np.int64))


class ScoreTally:
    """Collects the scores of test images one at a time, then summarises them.

    Binary models (one output channel) are scored on their foreground. Models with ``K > 1``
    classes (class 0 the background) are scored per foreground class, one class against the
    rest, and the summary's top level holds the unweighted mean over those classes.

    Args:
        n_classes: output channels of the model: 1 (binary) or K > 1.
    """

    def __init__(self, n_classes: int) -> None:
        self.n_classes = n_classes
        self.labels = [1] if n_classes == 1 else list(range(1, n_classes))
        self.tallies = {k: _ClassTally() for k in self.labels}
        self.rows: list[dict] = []
        self.matrix = np.zeros((max(n_classes, 2),) * 2, dtype=np.int64)

    def add(self, case_id: str, probs: np.ndarray, pred: np.ndarray, truth: np.ndarray,
            fov: np.ndarray) -> None:  # fmt: skip
        """Score one image.

        Args:
            case_id: the image's id, for the per-image table.
            probs: (K, H, W) float32 class probabilities (K = 1: the foreground's).
            pred: (H, W) integer labels predicted (`medseg.inference.segment`).
            truth: (H, W) integer true labels, in ``[0, max(K, 2))``.
            fov: (H, W) bool field of view; the FOV scores count only these pixels.
        """
        self.matrix += confusion_matrix(pred, truth, len(self.matrix), fov)
        for k in self.labels:
            prob_k = probs[0] if self.n_classes == 1 else probs[k]
            truth_k, pred_k = truth == k, pred == k
            tally = self.tallies[k]
            c_fov, c_all = confusion(pred_k, truth_k, fov), confusion(pred_k, truth_k)
            tally.fov += c_fov
            tally.whole += c_all
            p_in, t_in = prob_k[fov], truth_k[fov]
            tally.fov_probs.append(p_in)
            tally.fov_truth.append(t_in)
            tally.all_probs.append(prob_k.ravel())
            tally.all_truth.append(truth_k.ravel())
            pos, neg = threshold_counts(p_in, t_in, CURVE_POINTS)
            tally.pos += pos
            tally.neg += neg
            self.rows.append(
                {
                    "case_id": case_id,
                    "class": k,
                    **scores(c_fov),
                    **ranking_scores(p_in, t_in),
                    **{f"whole_image_{n}": v for n, v in scores(c_all).items()},
                }
            )

    def per_image(self) -> pd.DataFrame:
        """One row per image (and class, for K > 1): FOV scores, then whole-image scores."""
        table = pd.DataFrame(self.rows)
        return table.drop(columns="class") if self.n_classes == 1 else table

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
        if self.n_classes > 1:
            out["classes"] = {f"class_{k}": s for k, s in per_class.items()}
        return out

    def _class_summary(self, k: int) -> dict:
        tally = self.tallies[k]
        table = pd.DataFrame(self.rows)
        rows = table[table["class"] == k][list(METRIC_NAMES)]
        return {
            "fov": {
                **scores(tally.fov),
                **ranking_scores(np.concatenate(tally.fov_probs), np.concatenate(tally.fov_truth)),
            },
            "fov_per_image_mean": rows.mean().to_dict(),
            "fov_per_image_std": rows.std(ddof=1).to_dict(),
            "whole_image": {
                **scores(tally.whole),
                **ranking_scores(np.concatenate(tally.all_probs), np.concatenate(tally.all_truth)),
            },
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
            if self.n_classes > 1:
                roc.insert(0, "class", f"class_{k}")
                pr.insert(0, "class", f"class_{k}")
            rocs.append(roc)
            prs.append(pr)
        return pd.concat(rocs, ignore_index=True), pd.concat(prs, ignore_index=True)

    def confusion_table(self) -> pd.DataFrame:
        """The pooled FOV confusion matrix, one row per (truth, prediction) pair: ``pixels``
        and ``share_of_truth`` (the row-normalised share, i.e. recall on the diagonal)."""
        names = class_names(self.n_classes)
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


def class_names(n_classes: int) -> list[str]:
    """Label names for tables: ``background``, ``foreground`` (binary) or ``class_<k>``."""
    if n_classes == 1:
        return ["background", "foreground"]
    return ["background", *(f"class_{k}" for k in range(1, n_classes))]


def _mean_blocks(blocks: list[dict[str, float]]) -> dict[str, float]:
    if len(blocks) == 1:
        return dict(blocks[0])
    return {name: float(np.nanmean([b[name] for b in blocks])) for name in blocks[0]}


def second_observer_scores(test: SplitArrays, n_classes: int) -> dict | None:
    """The second observer scored against the first inside the FOV, pooled over the cases
    that have one: the human reference a model is compared with. None when no case has one.

    Returns:
        Threshold scores (no AUC: the second observer gives labels, not probabilities), the
        mean over foreground classes for K > 1, and ``n_images``.
    """
    labels = [1] if n_classes == 1 else list(range(1, n_classes))
    totals = {k: Confusion(0, 0, 0, 0) for k in labels}
    n = 0
    for _, first, second, fov in test.second_observer():
        n += 1
        for k in labels:
            totals[k] += confusion(second == k, first == k, fov)
    if n == 0:
        return None
    return {**_mean_blocks([scores(c) for c in totals.values()]), "n_images": n}


def labelled_cases(test: SplitArrays) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
    """Each test case cropped back to its size, the mask kept as integer labels.

    Yields:
        case id; image (C, h, w) float32; labels (h, w) uint8; FOV (h, w) bool.
    """
    for case_id, image, mask, fov, (h, w) in zip(
        test.case_ids, test.images, test.masks, test.fov, test.shapes, strict=True
    ):
        yield str(case_id), crop_to(image, h, w), crop_to(mask, h, w), crop_to(fov, h, w) > 0


def evaluate_model(
    cfg: EvaluateConfig, data_dir: str | Path, model_path: str | Path, out: str | Path
) -> dict:
    """Score the model on ``data_dir/test.npz`` and write the results into ``out``.

    Writes ``metrics.json`` (nested, rounded to `PRECISION` decimals), ``per_image.csv``,
    ``roc.csv``, ``pr.csv``, ``confusion.csv``, ``overlays/<case>.png`` and
    ``probabilities/<case>.png`` (8-bit, probability x 255; for K > 1 that of any foreground).
    ``out`` appears whole or not at all.

    Returns:
        The metrics written to ``metrics.json``.
    """
    device = resolve_device(cfg.device)
    model, spec = load_model(model_path, device)
    model = prepare_model(model, spec.in_channels)
    test_path = Path(data_dir) / "test.npz"
    test = load_split(test_path)
    if len(test) == 0:
        raise MedsegError(f"{test_path}: no test cases to evaluate")
    _check_labels(test, spec.classes, test_path)
    tally = ScoreTally(spec.classes)
    with atomic_dir(out) as tmp:
        (tmp / "overlays").mkdir()
        (tmp / "probabilities").mkdir()
        for case_id, image, truth, inside in labelled_cases(test):
            probs = predict_probabilities(
                model, image, cfg.window, cfg.overlap, cfg.batch_size, device,
                blending=cfg.blending, tta=cfg.tta,
            )  # fmt: skip
            # the FOV is known at inference: nothing is claimed outside it
            probs[:, ~inside] = 0.0
            if spec.classes > 1:
                probs[0, ~inside] = 1.0
            pred = segment(probs, cfg.threshold)
            pred[~inside] = 0  # also at threshold 0
            tally.add(case_id, probs, pred, truth, inside)
            write_png(tmp / "overlays" / f"{case_id}.png", overlay(image[0], pred, truth, inside))
            foreground = probs[0] if spec.classes == 1 else 1.0 - probs[0]
            write_png(tmp / "probabilities" / f"{case_id}.png", to_uint8(foreground))
        metrics = build_metrics(tally, second_observer_scores(test, spec.classes), cfg.threshold)
        write_json(tmp / "metrics.json", metrics)
        tally.per_image().round(PRECISION).to_csv(tmp / "per_image.csv", index=False)
        roc, pr = tally.curves()
        roc.round(6).to_csv(tmp / "roc.csv", index=False)
        pr.round(6).to_csv(tmp / "pr.csv", index=False)
        tally.confusion_table().to_csv(tmp / "confusion.csv", index=False)
    fov = metrics["test"]["fov"]
    log.info("test (FOV, pooled): dice %s auc %s", fov["dice"], fov["auc_roc"])
    return metrics


def build_metrics(tally: ScoreTally, second: dict | None, threshold: float) -> dict:
    """The content of ``metrics.json``: ``test.fov`` first (Dice, IoU and accuracy lead each
    block), rounded to `PRECISION` decimals, NaN as null."""
    test = tally.summary()
    if second is not None:
        test["second_observer"] = second
    return _rounded({"test": test, "n_images": len({r["case_id"] for r in tally.rows}),
                     "threshold": threshold})  # fmt: skip


def _check_labels(test: SplitArrays, n_classes: int, path: Path) -> None:
    top = int(test.masks.max()) if test.masks.size else 0
    allowed = max(n_classes, 2) - 1
    if top > allowed:
        raise MedsegError(
            f"{path}: masks hold label {top} but the model has {n_classes} output "
            f"channel(s) (labels up to {allowed}); train with train.classes matching the masks"
        )


def to_uint8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] to an 8-bit grey image (rounded)."""
    return (np.clip(prob, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Colour a normalised grey image by outcome: TP green, FP red, FN blue; black outside the FOV.

    Args:
        image: (H, W) float32, roughly zero-mean unit-variance.
        pred, truth: (H, W) bool, or integer labels (0 = background): a foreground pixel given
            the wrong class counts as a false positive.
        fov: (H, W) bool.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    grey = np.where(fov, np.clip((image + 2.5) / 5.0, 0.0, 1.0) * 255.0, 0.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    found, present = pred > 0, truth > 0
    hit = found & (pred == truth)
    for where, colour in (
        (hit, TP_COLOUR),
        (found & ~hit, FP_COLOUR),
        (~found & present, FN_COLOUR),
    ):
        rgb[where] = 0.25 * rgb[where] + 0.75 * colour
    return (rgb + 0.5).astype(np.uint8)


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
