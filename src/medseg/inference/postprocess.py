"""Post-processing of predicted label maps, and its choice on the validation cases.

Three operations on one class's binary mask, as nnU-Net applies them: keep the largest connected
component, fill holes, drop components below a size. None is applied blindly: `choose` tries
each candidate on the validation predictions, class by class, and keeps it only where it raises
that class's pooled validation Dice (nnU-Net's rule, there on cross-validation). Thin structures
(vessels) get no candidates from the plan: a vessel tree's branches are separate components
wherever the prediction misses a pixel.

numpy and scipy only: the same functions serve the torch and the ONNX predictor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.progress import progress

# 8-connectivity in 2D: a diagonal step joins two pixels, as the eye sees a thin oblique line.
_CONNECTIVITY = ndimage.generate_binary_structure(2, 2)
MIN_GAIN = 1e-4  # a candidate must raise the pooled Dice by more than this to be kept
# ... and raise it in this share of the bootstrap resamples of the validation cases: a gain that
# rests on one or two cases of a handful is noise, not a rule that will hold on the test cases
CONFIDENCE = 0.95
RESAMPLES = 1000


def keep_largest(mask: np.ndarray) -> np.ndarray:
    """The largest 8-connected component of ``mask`` (the first of equal ones in raster order).

    Args:
        mask: (H, W) bool.

    Returns:
        (H, W) bool; all False when ``mask`` is.
    """
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n <= 1:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(sizes.argmax())


def fill_holes(mask: np.ndarray) -> np.ndarray:
    """``mask`` with every background region it encloses (not reaching the border) filled.

    Args:
        mask: (H, W) bool.

    Returns:
        (H, W) bool.
    """
    return np.asarray(ndimage.binary_fill_holes(mask), dtype=bool)


def drop_small(mask: np.ndarray, min_size: int) -> np.ndarray:
    """``mask`` without its 8-connected components of fewer than ``min_size`` pixels.

    Args:
        mask: (H, W) bool.
        min_size: pixels; a component of at least this many stays.

    Returns:
        (H, W) bool.
    """
    labels, n = ndimage.label(mask, structure=_CONNECTIVITY)
    if n == 0:
        return mask.astype(bool, copy=True)
    sizes = np.bincount(labels.ravel())
    keep = sizes >= min_size
    keep[0] = False
    return keep[labels]


# operation name -> how it is applied to one class's mask, given its spec
OPERATIONS: dict[str, Callable[[np.ndarray, Mapping[str, object]], np.ndarray]] = {
    "keep_largest": lambda m, spec: keep_largest(m),
    "fill_holes": lambda m, spec: fill_holes(m),
    "drop_small": lambda m, spec: drop_small(m, int(spec["min_size"])),  # type: ignore[call-overload]
}


def check_operation(spec: Mapping[str, object], source: str = "post-processing") -> None:
    """Refuse an operation spec `apply` would not understand, naming ``source``.

    A spec is ``{"op": name}`` with a name of `OPERATIONS`; ``drop_small`` also needs
    ``"min_size"``, an integer >= 1.

    Raises:
        MedsegError: an unknown name or a bad ``min_size``.
    """
    op = spec.get("op")
    if op not in OPERATIONS:
        raise MedsegError(
            f"{source}: unknown post-processing {op!r}; known: {', '.join(OPERATIONS)}"
        )
    if op == "drop_small":
        size = spec.get("min_size")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise MedsegError(f"{source}: drop_small needs min_size, an integer >= 1")


Steps = dict[int, list[dict[str, object]]]  # class label -> operation specs, in order


def steps_record(
    steps: Mapping[int, Sequence[Mapping[str, object]]],
) -> dict[str, list[dict[str, object]]]:
    """Steps as JSON takes them: ``{"1": [{"op": "keep_largest"}], ...}``, classes without an
    operation left out (`parse_steps` reads it back)."""
    return {str(k): [dict(spec) for spec in steps[k]] for k in sorted(steps) if steps[k]}


def parse_steps(raw: object, labels: Sequence[int], source: str) -> Steps:
    """Steps from their JSON record (`steps_record`), every entry checked.

    Args:
        raw: the decoded JSON value.
        labels: the class labels a step may name (a model's foreground labels).
        source: names the record in errors.

    Raises:
        MedsegError: not an object of class labels -> lists of operation specs, a label not in
            ``labels``, or an operation `check_operation` refuses.
    """
    if not isinstance(raw, dict):
        raise MedsegError(
            f"{source}: post-processing must be an object of class labels -> lists of "
            f"operations, got {type(raw).__name__}"
        )
    steps: Steps = {}
    for key, specs in raw.items():
        if not (isinstance(key, str) and key.isdecimal() and int(key) in labels):
            raise MedsegError(
                f"{source}: post-processing for class {key!r}; the model's classes are "
                f"{', '.join(map(str, labels))}"
            )
        if not isinstance(specs, list) or not all(isinstance(s, dict) for s in specs):
            raise MedsegError(f"{source}: post-processing for class {key} is not a list of objects")
        for spec in specs:
            check_operation(spec, source)
        if specs:
            steps[int(key)] = [dict(spec) for spec in specs]
    return steps


def apply(labels: np.ndarray, steps: Mapping[int, Sequence[Mapping[str, object]]]) -> np.ndarray:
    """Apply chosen post-processing to a label map, class by class.

    Args:
        labels: (H, W) integer labels (0 background; binary masks are 0/1).
        steps: class label -> operation specs (``{"op": "keep_largest"}``, ...) in order, as
            `choose` returns them; a class not named is left as it is.

    Returns:
        (H, W) labels of ``labels``' dtype. A pixel a class gives up becomes background; a
        pixel it gains (a filled hole) is taken from whichever class held it.
    """
    out = labels.copy()
    for k in sorted(steps):
        if not steps[k]:
            continue
        mask = out == k
        for spec in steps[k]:
            check_operation(spec)
            mask = OPERATIONS[str(spec["op"])](mask, spec)
        out[(out == k) & ~mask] = 0
        out[mask] = k
    return out


@dataclass(frozen=True)
class Choice:
    """What `choose` kept, and the validation Dice it measured.

    Attributes:
        steps: class label -> the operation specs kept for it, in order (empty: none helped).
        dice_before: class label -> pooled validation Dice without post-processing.
        dice_after: class label -> pooled validation Dice with the kept operations.
        tried: class label -> one line per candidate: its Dice and whether it was kept.
    """

    steps: dict[int, list[dict[str, object]]]
    dice_before: dict[int, float]
    dice_after: dict[int, float]
    tried: dict[int, list[str]]


def as_labels(prediction: np.ndarray, threshold: float = 0.5) -> np.ndarray:
    """A prediction as (H, W) integer labels.

    Args:
        prediction: (H, W) integer labels; or (H, W) float foreground probability (binary,
            foreground where >= ``threshold``); or (K, H, W) float class probabilities (K = 1:
            binary as before; K >= 2: the most probable class).

    Returns:
        (H, W) int64 labels.
    """
    p = np.asarray(prediction)
    if np.issubdtype(p.dtype, np.integer) or p.dtype == np.bool_:
        if p.ndim != 2:
            raise ValueError(f"integer labels must be (H, W), got shape {p.shape}")
        return p.astype(np.int64)
    if p.ndim == 3 and p.shape[0] == 1:
        p = p[0]
    if p.ndim == 2:
        return (p >= threshold).astype(np.int64)
    if p.ndim == 3:
        return p.argmax(axis=0).astype(np.int64)
    raise ValueError(f"a prediction must be (H, W) or (K, H, W), got shape {p.shape}")


def _dice(tp: int, fp: int, fn: int) -> float:
    den = 2 * tp + fp + fn
    return 2 * tp / den if den else 1.0


def _dice_each(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    """`_dice` of each element (float64), 1 where there is nothing to find and nothing found."""
    den = 2 * tp + fp + fn
    return np.where(den > 0, 2 * tp / np.maximum(den, 1), 1.0)


def _counts(pred: np.ndarray, truth: np.ndarray) -> tuple[int, int, int]:
    tp = int(np.count_nonzero(pred & truth))
    return tp, int(np.count_nonzero(pred)) - tp, int(np.count_nonzero(truth)) - tp


def choose(
    cases: Sequence[tuple[np.ndarray, np.ndarray, np.ndarray | None]],
    candidates: Sequence[Mapping[str, object]],
    classes: Sequence[int] | None = None,
    threshold: float = 0.5,
) -> Choice:
    """Choose post-processing on validation predictions: per class, greedily in the order of
    ``candidates``, keep an operation only when, applied after those already kept, it raises
    that class's Dice pooled over the cases by more than `MIN_GAIN` and lowers it in no more
    than 1 - `CONFIDENCE` of `RESAMPLES` bootstrap resamples of the cases (seeded: the same
    cases give the same choice), so that a net gain of wins and losses that cancel out is not
    taken for a rule.

    Args:
        cases: (prediction, truth, fov) per validation case: prediction as `as_labels` takes it,
            truth (H, W) integer labels, fov (H, W) bool or None (the whole image). Pixels
            outside the FOV are background before any operation and are not scored.
        candidates: operation specs to try (``{"op": "keep_largest"}``,
            ``{"op": "drop_small", "min_size": 50}``...), e.g. the plan's.
        classes: the class labels to decide for; default every label > 0 in the truths.
        threshold: the binary threshold for probability predictions.

    Returns:
        The `Choice`; with no cases or no candidates, nothing is kept.
    """
    for spec in candidates:
        check_operation(spec)
    prepared = []
    for prediction, truth, fov in cases:
        pred = as_labels(prediction, threshold)
        if pred.shape != truth.shape:
            raise ValueError(f"prediction {pred.shape} and truth {truth.shape} differ in shape")
        inside = np.ones(truth.shape, bool) if fov is None else np.asarray(fov, dtype=bool)
        prepared.append((np.where(inside, pred, 0), truth, inside))
    if classes is None:
        found: set[int] = set()
        for _, truth, _ in prepared:
            found.update(int(v) for v in np.unique(truth))
        classes = sorted(v for v in found if v > 0)
    choice = Choice({}, {}, {}, {})
    draws = np.random.default_rng(0).integers(0, max(len(prepared), 1), (RESAMPLES, len(prepared)))
    trials = len(classes) * (1 + len(candidates))
    with progress(total=trials, desc="post-processing: choose", unit="trial") as bar:
        for k in classes:
            masks = [(pred == k, (truth == k) & inside, inside) for pred, truth, inside in prepared]
            kept: list[dict[str, object]] = []
            counts = _case_counts(masks, kept)
            best = _dice(*counts.sum(axis=0))
            bar.update()
            choice.dice_before[k] = best
            choice.tried[k] = []
            for spec in candidates:
                trial = [*kept, dict(spec)]
                trial_counts = _case_counts(masks, trial)
                dice = _dice(*trial_counts.sum(axis=0))
                bar.update()
                # the gain in each resample of the cases (drawn with replacement)
                gains = _dice_each(*trial_counts[draws].sum(axis=1).T) - _dice_each(
                    *counts[draws].sum(axis=1).T
                )
                share = float(np.mean(gains >= 0))
                keep = dice > best + MIN_GAIN and share >= CONFIDENCE
                verdict = "kept" if keep else "not kept"
                choice.tried[k].append(
                    f"{_describe(spec)}: Dice {best:.4f} -> {dice:.4f}, not lower in {share:.1%} "
                    f"of {RESAMPLES} resamples of the {len(prepared)} cases, {verdict}"
                )
                if keep:
                    kept, best, counts = trial, dice, trial_counts
            choice.steps[k] = kept
            choice.dice_after[k] = best
    return choice


def _case_counts(
    masks: list[tuple[np.ndarray, np.ndarray, np.ndarray]], steps: list[dict[str, object]]
) -> np.ndarray:
    """(cases, 3) int64: each case's TP, FP, FN after ``steps``."""
    rows = []
    for pred, truth, inside in masks:
        for spec in steps:
            pred = OPERATIONS[str(spec["op"])](pred, spec)
        rows.append(_counts(pred & inside, truth))
    return np.array(rows, dtype=np.int64).reshape(-1, 3)


def _describe(spec: Mapping[str, object]) -> str:
    extra = ", ".join(f"{k} {v}" for k, v in spec.items() if k != "op")
    return f"{spec['op']}" + (f" ({extra})" if extra else "")
