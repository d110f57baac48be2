from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import ndimage

from medseg.scoring.lesions import (
    LesionCounts,
    LesionTally,
    components,
    lesion_counts,
    match_components,
)

SHAPE = (40, 40)


def canvas() -> np.ndarray:
    return np.zeros(SHAPE, bool)


def box(mask: np.ndarray, top: int, left: int, height: int, width: int) -> np.ndarray:
    mask = mask.copy()
    mask[top : top + height, left : left + width] = True
    return mask


def test_components_are_8_connected():
    mask = canvas()
    mask[5, 5] = mask[6, 6] = True  # touch at a corner: one lesion
    mask[20, 20] = mask[20, 22] = True  # a gap: two
    labels, n = components(mask)
    assert n == 3 and labels[5, 5] == labels[6, 6]


def test_found_missed_and_invented_by_hand():
    truth = box(box(canvas(), 2, 2, 4, 4), 20, 20, 5, 5)  # two lesions
    pred = box(box(canvas(), 3, 3, 4, 4), 30, 2, 3, 3)  # finds the first, invents one
    counts = lesion_counts(pred, truth)
    assert (counts.detected, counts.missed, counts.invented) == (1, 1, 1)
    assert (counts.precision, counts.recall, counts.f1) == (0.5, 0.5, 0.5)
    iou = 9 / (16 + 16 - 9)  # 3x3 overlap of two 4x4 squares: below 0.5, so no PQ match
    assert iou < 0.5 and counts.pq_matched == 0
    assert math.isnan(counts.sq) and counts.pq == 0.0 and counts.rq == 0.0
    row = counts.row()
    assert (row["lesion_tp"], row["lesion_fn"], row["lesion_fp"]) == (1, 1, 1)


def test_panoptic_quality_by_hand():
    truth = box(box(canvas(), 2, 2, 4, 4), 20, 20, 4, 4)
    pred = box(box(canvas(), 2, 2, 4, 3), 20, 20, 4, 4)  # IoU 12/16 and 1
    counts = lesion_counts(pred, truth)
    assert counts.pq_matched == 2
    assert counts.sq == pytest.approx((0.75 + 1.0) / 2)
    assert counts.rq == 1.0 and counts.pq == pytest.approx(0.875)
    # an IoU of exactly 0.5 is a detection, not a PQ match (the rule is IoU > 0.5)
    half = lesion_counts(box(canvas(), 2, 2, 4, 2), box(canvas(), 2, 2, 4, 4))
    assert half.detected == 1 and half.pq_matched == 0 and half.f1 == 1.0 and half.pq == 0.0


def test_merge_and_split_are_one_to_one():
    two = box(box(canvas(), 5, 5, 4, 4), 5, 11, 4, 10)
    merged = box(canvas(), 5, 5, 4, 16)  # covers both true lesions
    counts = lesion_counts(merged, two)
    # the larger lesion (IoU 40/64) is matched; the other is missed
    assert (counts.detected, counts.missed, counts.invented) == (1, 1, 0)
    assert counts.pq_matched == 1 and counts.pq_iou_sum == pytest.approx(40 / 64)
    split = lesion_counts(two, merged)  # the same the other way: one found, one piece invented
    assert (split.detected, split.missed, split.invented) == (1, 0, 1)


def test_greedy_takes_the_best_iou_first():
    truth_labels = np.array([[1, 1, 1, 0, 2, 2]])
    pred_labels = np.array([[0, 1, 1, 1, 1, 0]])
    # pred 1 overlaps truth 1 (IoU 2/5) and truth 2 (IoU 1/5): truth 1 takes it
    assert match_components(truth_labels, 2, pred_labels, 1) == [(1, 1, pytest.approx(0.4))]
    # equal IoU: the lower truth label wins
    assert match_components(np.array([[1, 0, 2]]), 2, np.array([[1, 1, 1]]), 1)[0][:2] == (1, 1)


def test_empty_cases():
    both = lesion_counts(canvas(), canvas())
    assert (both.precision, both.recall, both.f1, both.sq, both.rq, both.pq) == (1.0,) * 6
    missed = lesion_counts(canvas(), box(canvas(), 2, 2, 3, 3))
    assert (missed.precision, missed.recall, missed.f1, missed.pq) == (1.0, 0.0, 0.0, 0.0)
    assert math.isnan(missed.sq)
    invented = lesion_counts(box(canvas(), 2, 2, 3, 3), canvas())
    assert (invented.precision, invented.recall, invented.f1, invented.pq) == (0.0, 1.0, 0.0, 0.0)


def test_fov_cuts_both_masks():
    fov = canvas()
    fov[:, :20] = True
    truth = box(canvas(), 2, 2, 3, 3)
    pred = box(box(canvas(), 2, 2, 3, 3), 10, 25, 3, 3)  # the second lies outside the FOV
    assert lesion_counts(pred, truth, fov) == LesionCounts(1, 1, 1, 1, 1.0)
    with pytest.raises(ValueError, match="one shape"):
        lesion_counts(pred, truth[:5])


def test_tally_per_case_and_pooled():
    tally = LesionTally()
    tally.add("tumour", LesionCounts(n_truth=2, n_pred=1, detected=1, pq_matched=1, pq_iou_sum=0.8))
    tally.add("tumour", LesionCounts(n_truth=1, n_pred=1, detected=0, pq_matched=0, pq_iou_sum=0.0))
    tally.add("tumour", LesionCounts(n_truth=0, n_pred=0, detected=0, pq_matched=0, pq_iou_sum=0.0))
    summary = tally.summary()["tumour"]
    f1 = summary["per_case"]["f1"]
    assert f1["mean"] == pytest.approx((2 / 3 + 0.0 + 1.0) / 3)
    assert f1["median"] == pytest.approx(2 / 3) and f1["n"] == 3
    assert "p05" in f1 and "p95" not in f1
    sq = summary["per_case"]["sq"]  # the second case has no PQ match: NaN, excluded and counted
    assert (sq["n"], sq["n_excluded"]) == (2, 1) and sq["mean"] == pytest.approx(0.9)
    pooled = summary["pooled"]
    assert (pooled["truth"], pooled["pred"], pooled["tp"], pooled["fn"], pooled["fp"]) == (
        3,
        2,
        1,
        2,
        1,
    )
    assert pooled["precision"] == 0.5 and pooled["recall"] == pytest.approx(1 / 3)
    assert pooled["f1"] == pytest.approx(2 / 5) and pooled["sq"] == pytest.approx(0.8)


def test_tally_pooled_sq_is_null_without_matches():
    tally = LesionTally()
    tally.add("x", LesionCounts(n_truth=1, n_pred=0, detected=0, pq_matched=0, pq_iou_sum=0.0))
    assert tally.summary()["x"]["pooled"]["sq"] is None


# --- agreement with MONAI's panoptic quality on random lesions ---------------------------


@pytest.mark.parametrize("seed", range(10))
def test_panoptic_counts_agree_with_monai(seed):
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    rng = np.random.default_rng(seed)

    def lesions() -> np.ndarray:
        field = ndimage.gaussian_filter(rng.standard_normal((64, 64)), float(rng.uniform(1.0, 3.0)))
        return field > np.quantile(field, float(rng.uniform(0.8, 0.97)))

    truth = lesions()
    pred = (
        ndimage.binary_dilation(np.roll(truth, int(rng.integers(0, 3)), axis=1))
        if seed % 2
        else lesions()
    )
    counts = lesion_counts(pred, truth)
    truth_labels, _ = components(truth)
    pred_labels, _ = components(pred)
    tp, fp, fn, iou_sum = metrics.compute_panoptic_quality(
        torch.as_tensor(pred_labels), torch.as_tensor(truth_labels), output_confusion_matrix=True
    ).tolist()
    assert (
        counts.pq_matched,
        counts.n_pred - counts.pq_matched,
        counts.n_truth - counts.pq_matched,
    ) == (
        tp,
        fp,
        fn,
    )
    assert counts.pq_iou_sum == pytest.approx(iou_sum, rel=1e-6, abs=1e-6)


def test_the_bounding_box_crop_changes_nothing():
    truth = box(box(canvas(), 0, 0, 3, 3), 37, 36, 3, 4)  # lesions in opposite corners
    pred = box(box(canvas(), 1, 1, 3, 3), 36, 37, 4, 3)
    truth_labels, n_truth = components(truth)
    pred_labels, n_pred = components(pred)
    matches = match_components(truth_labels, n_truth, pred_labels, n_pred)
    pq = [iou for _, _, iou in matches if iou > 0.5]
    expected = LesionCounts(n_truth, n_pred, len(matches), len(pq), sum(pq))
    assert lesion_counts(pred, truth) == expected and expected.detected == 2


def test_row_has_the_documented_per_image_columns():
    row = LesionCounts(n_truth=3, n_pred=2, detected=2, pq_matched=1, pq_iou_sum=0.6).row()
    assert list(row) == [
        "lesion_truth", "lesion_pred", "lesion_tp", "lesion_fn", "lesion_fp", "lesion_precision",
        "lesion_recall", "lesion_f1", "lesion_pq", "lesion_sq", "lesion_rq",
    ]  # fmt: skip
    assert (row["lesion_fn"], row["lesion_fp"], row["lesion_f1"]) == (1, 0, 0.8)
    assert row["lesion_rq"] == pytest.approx(0.4) and row["lesion_pq"] == pytest.approx(0.24)


def test_lesions_of_a_volume_are_3d_components():
    """Two blobs on neighbouring slices touching at a corner are one lesion in 3D (26-connected);
    a blob found on one slice of its two is found, not half missed."""
    truth = np.zeros((3, 8, 8), bool)
    truth[0, 1:3, 1:3] = True
    truth[1, 3:5, 3:5] = True  # touches the first across a corner of the slices
    truth[2, 6, 6] = True  # a second lesion
    pred = np.zeros_like(truth)
    pred[1, 3:5, 3:5] = True
    counts = lesion_counts(pred, truth)
    assert (counts.n_truth, counts.n_pred, counts.detected, counts.missed, counts.invented) == (
        2, 1, 1, 1, 0,
    )  # fmt: skip
