"""The evaluate stage: whole-image inference of the test cases, scored with the tally of
`medseg.scoring.tally`; metrics, tables, curves, overlays."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from medseg.config.sections import EvaluateConfig
from medseg.errors import MedsegError
from medseg.inference.bundle import load_bundle
from medseg.inference.predictor import Predictor
from medseg.inference.window import WindowSettings
from medseg.io.atomic import atomic_dir, write_json
from medseg.io.images import write_png
from medseg.io.shards import CaseStore, index_path
from medseg.labels import LabelSpace, to_uint8
from medseg.names import CLASSES
from medseg.preprocess.processed import open_split, read_case, read_class_names
from medseg.preprocess.transforms import resize_image
from medseg.progress import progress
from medseg.scoring.shapes import ShapeScoring
from medseg.scoring.tally import PRECISION, ScoreTally, SecondObserver, build_metrics

log = logging.getLogger(__name__)

# overlay colours (RGB): true positive, false positive, false negative
TP_COLOUR = np.array([0, 220, 0], dtype=np.float32)
FP_COLOUR = np.array([255, 40, 40], dtype=np.float32)
FN_COLOUR = np.array([40, 120, 255], dtype=np.float32)
# correctly found classes, label 1, 2, ... (red and blue are kept for the errors)
CLASS_COLOURS = np.array(
    [[0, 220, 0], [255, 200, 0], [200, 0, 255], [0, 220, 220], [255, 128, 0], [150, 255, 150]],
    dtype=np.float32,
)


def evaluate_model(
    cfg: EvaluateConfig, data_dir: str | Path, model_path: str | Path, out: str | Path
) -> dict:
    """Score the model on the ``test`` split in ``data_dir`` and write the results into ``out``.

    Cases are read, predicted (`medseg.inference.predictor.Predictor`), scored at the ground truth's
    resolution and written one at a time, so memory stays that of one case. Writes
    ``metrics.json`` (nested, rounded to `PRECISION` decimals), ``per_image.csv``, ``roc.csv``,
    ``pr.csv``, ``confusion.csv``, ``overlays/<case>.png`` and ``probabilities/<case>.png``
    (8-bit, probability x 255; for K > 1 that of any foreground). ``out`` appears whole or not
    at all.

    Args:
        model_path: the model bundle (folder or weights file, see
        `medseg.inference.bundle.load_bundle`).

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
    from medseg.planning.fingerprint import thin_labels  # scikit-image: only where it is asked for

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
