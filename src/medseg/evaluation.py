"""Scoring: the one tally (`ScoreTally`) and threshold grid (`CURVE_POINTS`) that validation,
evaluate and crossval share; the evaluate stage (whole-image inference of the test cases, FOV
metrics, tables, curves, overlays)."""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.bundle import load_bundle
from medseg.config import EvaluateConfig
from medseg.errors import MedsegError
from medseg.inference import LabelSpace, Predictor, WindowSettings, to_uint8
from medseg.io.atomic import atomic_dir, write_json
from medseg.io.images import write_png
from medseg.io.shards import CaseStore, index_path
from medseg.metrics import (
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
from medseg.names import CLASSES
from medseg.processed import open_split, read_case, read_class_names
from medseg.progress import progress
from medseg.shapes import ShapeScoring, ShapeTally
from medseg.transforms import resize_image

log = logging.getLogger(__name__)

PRECISION = 4  # decimals kept in metrics.json: finer changes are noise, not results
# the one threshold grid, 0.000, 0.005, ..., 1.000: the ROC and PR curve files and the
# validation threshold (evaluate.threshold: auto) are read off it
CURVE_POINTS = 201
METRIC_NAMES = (*SCORE_NAMES, *RANKING_NAMES)

# overlay colours (RGB): true positive, false positive, false negative
TP_COLOUR = np.array([0, 220, 0], dtype=np.float32)
FP_COLOUR = np.array([255, 40, 40], dtype=np.float32)
FN_COLOUR = np.array([40, 120, 255], dtype=np.float32)
# correctly found classes, label 1, 2, ... (red and blue are kept for the errors)
CLASS_COLOURS = np.array(
    [[0, 220, 0], [255, 200, 0], [200, 0, 255], [0, 220, 220], [255, 128, 0], [150, 255, 150]],
    dtype=np.float32,
)


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
            `medseg.inference.LabelSpace.of`. Names of the data set's own (``data.classes``)
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
            fov: np.ndarray, spacing: tuple[float, float] | None = None) -> None:  # fmt: skip
        """Score one image.

        Args:
            case_id: the image's id, for the per-image table.
            probs: (K, H, W) float32 class probabilities (K = 1: the foreground's).
            pred: (H, W) integer labels predicted (`medseg.inference.Predictor.predict`).
            truth: (H, W) integer true labels, in ``[0, max(K, 2))``.
            fov: (H, W) bool field of view; the FOV scores count only these pixels.
            spacing: (row, column) pixel spacing in mm, for boundary distances in mm.
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
        and that Dice (`medseg.metrics.best_dice_threshold`); None for several classes."""
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


def evaluate_model(
    cfg: EvaluateConfig, data_dir: str | Path, model_path: str | Path, out: str | Path
) -> dict:
    """Score the model on the ``test`` split in ``data_dir`` and write the results into ``out``.

    Cases are read, predicted (`medseg.inference.Predictor`), scored at the ground truth's
    resolution and written one at a time, so memory stays that of one case. Writes
    ``metrics.json`` (nested, rounded to `PRECISION` decimals), ``per_image.csv``, ``roc.csv``,
    ``pr.csv``, ``confusion.csv``, ``overlays/<case>.png`` and ``probabilities/<case>.png``
    (8-bit, probability x 255; for K > 1 that of any foreground). ``out`` appears whole or not
    at all.

    Args:
        model_path: the model bundle (folder or weights file, see `medseg.bundle.load_bundle`).

    Returns:
        The metrics written to ``metrics.json``.
    """
    bundle = load_bundle(model_path, cfg.device)
    # threshold auto: the one with the best validation Dice, stored in the bundle
    predictor = Predictor.from_bundles([bundle], WindowSettings.from_config(cfg), cfg.threshold)
    test = open_test(data_dir)
    check_classes(bundle.classes, data_dir, model_path)
    space = predictor.labels
    shapes, spacings = shape_scoring(cfg, data_dir, test, space)
    tally = ScoreTally(space.channels, list(space.names), shapes=shapes)
    second = SecondObserver(space.channels)
    with atomic_dir(out) as tmp:
        (tmp / "overlays").mkdir()
        (tmp / "probabilities").mkdir()
        for i in progress(test, desc="evaluate"):
            case = read_case(test, i)
            pred, probs = predictor.predict(case.image, case.fov, out_fov=case.truth_fov)
            tally.add(case.case_id, probs, pred, case.truth, case.truth_fov, spacings[i])
            if case.mask2 is not None:
                second.add(case.truth, case.mask2, case.truth_fov)
            shown = resize_image(case.image, case.truth.shape)
            picture = overlay(shown, pred, case.truth, case.truth_fov)
            write_png(tmp / "overlays" / f"{case.case_id}.png", picture)
            foreground = space.foreground(probs)
            write_png(tmp / "probabilities" / f"{case.case_id}.png", to_uint8(foreground))
            test.release(i)
        metrics = build_metrics(tally, second.summary(), predictor.threshold)
        write_json(tmp / "metrics.json", metrics)
        tally.per_image().round(PRECISION).to_csv(tmp / "per_image.csv", index=False)
        roc, pr = tally.curves()
        roc.round(6).to_csv(tmp / "roc.csv", index=False)
        pr.round(6).to_csv(tmp / "pr.csv", index=False)
        tally.confusion_table().to_csv(tmp / "confusion.csv", index=False)
    fov = metrics["test"]["fov"]
    log.info("test (FOV, pooled): dice %s auc %s", fov["dice"], fov["auc_roc"])
    return metrics


def shape_scoring(
    cfg: EvaluateConfig, data_dir: str | Path, test: CaseStore, space: LabelSpace
) -> tuple[ShapeScoring, list[tuple[float, float] | None]]:
    """The boundary and lesion scoring of the test cases (`ShapeScoring.from_config`), and each
    test case's pixel spacing (mm; None where unknown), in store order."""
    spacings = [_spacing(test.meta(i)) for i in test]
    thin = _thin_labels(cfg, data_dir, space)
    return ShapeScoring.from_config(cfg, spacings, space.foreground_labels, thin), spacings


def _spacing(meta: dict) -> tuple[float, float] | None:
    """A case's pixel spacing (mm, at the ground truth's size) from its store entry."""
    value = meta.get("spacing")
    return (float(value[0]), float(value[1])) if value else None


def _thin_labels(cfg: EvaluateConfig, data_dir: str | Path, space: LabelSpace) -> set[int]:
    """Under ``evaluate.lesions: auto``, the labels that are thin structures in the training
    cases' masks (never the test cases'): they get no lesion counts. Without training cases
    beside the test cases nothing can be judged, and no label gets them."""
    if cfg.lesions != "auto":
        return set()
    from medseg.fingerprint import thin_labels  # scikit-image: only where it is asked for

    if not index_path(Path(data_dir), "train").is_file():
        log.info("no training cases in %s: no lesion counts under evaluate.lesions: auto", data_dir)
        return set(space.foreground_labels)
    train = open_split(data_dir, "train")
    masks = (read_case(train, i).truth for i in progress(train, desc="thin labels"))
    return thin_labels(masks, space.foreground_labels)


def open_test(data_dir: str | Path) -> CaseStore:
    """The ``test`` split of ``data_dir``, refused when it holds no case."""
    test = open_split(data_dir, "test")
    if len(test) == 0:
        raise MedsegError(f"{Path(data_dir) / 'test.json'}: no test cases to evaluate")
    return test


def check_classes(model_classes: list[str], data_dir: str | Path, model_path: str | Path) -> None:
    """Refuse a model trained on other classes than the test data in ``data_dir`` has."""
    data_names = read_class_names(data_dir)
    if data_names != model_classes:
        raise MedsegError(
            f"{model_path}: the model was trained on the classes {', '.join(model_classes)}, "
            f"the test data ({Path(data_dir) / CLASSES}) has {', '.join(data_names)}; train it "
            "on this data (dvc repro)"
        )


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


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Colour the input by outcome; black outside the FOV.

    Binary: true positives green, false positives red, false negatives blue. Several classes:
    each correctly found class in its own colour (`CLASS_COLOURS`), a pixel given a wrong
    foreground class or foreground where there is none red, missed foreground blue.

    Args:
        image: (C, H, W) or (H, W) float32, roughly zero-mean unit-variance; 3 channels are
            shown in colour.
        pred, truth: (H, W) bool, or integer labels (0 = background).
        fov: (H, W) bool.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    x = image[None] if image.ndim == 2 else image
    shade = np.clip((x + 2.5) / 5.0, 0.0, 1.0) * 255.0
    rgb = shade.transpose(1, 2, 0) if len(x) == 3 else np.repeat(shade[0][..., None], 3, axis=2)
    rgb = np.where(fov[..., None], rgb, 0.0)
    found, present = pred > 0, truth > 0
    hit = found & (pred == truth)
    multiclass = int(max(pred.max(initial=0), truth.max(initial=0))) > 1
    if multiclass:
        for k in np.unique(pred[hit]):
            where = hit & (pred == k)
            rgb[where] = 0.25 * rgb[where] + 0.75 * CLASS_COLOURS[(int(k) - 1) % len(CLASS_COLOURS)]
    else:
        rgb[hit] = 0.25 * rgb[hit] + 0.75 * TP_COLOUR
    for where, colour in ((found & ~hit, FP_COLOUR), (~found & present, FN_COLOUR)):
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
