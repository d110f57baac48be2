from __future__ import annotations

import numpy as np
import pytest

from medseg.metrics import Confusion, auc_roc, confusion, roc_points, scores

PRED = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], dtype=bool)
TRUTH = np.array([[1, 0, 0, 0], [1, 1, 0, 0]], dtype=bool)


def test_confusion_counts_by_hand():
    # TP: (0,0),(1,0); FP: (0,1),(1,3); FN: (1,1); TN: 3
    assert confusion(PRED, TRUTH) == Confusion(tp=2, fp=2, fn=1, tn=3)


def test_valid_mask_excludes_pixels():
    valid = np.ones_like(PRED)
    valid[:, 3] = False  # drops the FP at (1,3) and a TN at (0,3)
    assert confusion(PRED, TRUTH, valid) == Confusion(tp=2, fp=1, fn=1, tn=2)


def test_scores_by_hand():
    s = scores(Confusion(tp=2, fp=2, fn=1, tn=3))
    assert s == pytest.approx(
        {
            "dice": 4 / 7,
            "iou": 2 / 5,
            "accuracy": 5 / 8,
            "sensitivity": 2 / 3,
            "specificity": 3 / 5,
            "precision": 2 / 4,
        }
    )


def test_empty_truth_and_prediction_score_perfectly():
    s = scores(Confusion(tp=0, fp=0, fn=0, tn=10))
    assert s["dice"] == s["iou"] == s["sensitivity"] == s["precision"] == 1.0
    missed = scores(Confusion(tp=0, fp=3, fn=0, tn=7))
    assert missed["dice"] == 0.0 and missed["precision"] == 0.0 and missed["sensitivity"] == 1.0


def test_confusion_adds():
    assert Confusion(1, 2, 3, 4) + Confusion(1, 1, 1, 1) == Confusion(2, 3, 4, 5)


def test_auc_known_values():
    truth = np.array([0, 0, 1, 1], bool)
    assert auc_roc(np.array([0.1, 0.2, 0.8, 0.9]), truth) == 1.0
    assert auc_roc(np.array([0.9, 0.8, 0.2, 0.1]), truth) == 0.0
    # one of four (pos, neg) pairs misordered: 0.4 (pos) < 0.5 (neg)
    assert auc_roc(np.array([0.1, 0.5, 0.4, 0.9]), truth) == 0.75
    assert auc_roc(np.full(4, 0.5), truth) == 0.5  # ties count half
    assert np.isnan(auc_roc(np.array([0.1, 0.2]), np.array([1, 1], bool)))


def test_roc_points_span_corners_and_match_auc():
    rng = np.random.default_rng(0)
    truth = rng.random(5000) < 0.2
    prob = np.clip(truth * 0.3 + rng.random(5000) * 0.7, 0, 1)
    roc = roc_points(prob, truth, n=201)
    assert len(roc["fpr"]) == 201
    assert roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    trapezoid = np.trapezoid(roc["tpr"], roc["fpr"])
    assert trapezoid == pytest.approx(auc_roc(prob, truth), abs=0.01)
