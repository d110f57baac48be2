from __future__ import annotations

import warnings

import numpy as np
import pytest

from medseg.scoring.metrics import (
    Confusion,
    best_dice_threshold,
    confusion,
    curves,
    ranking_scores,
    scores,
    threshold_counts,
)

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
            "mcc": (2 * 3 - 2 * 1) / np.sqrt(4 * 3 * 5 * 4),
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
    assert ranking_scores(np.array([0.1, 0.2, 0.8, 0.9]), truth)["auc_roc"] == 1.0
    assert ranking_scores(np.array([0.9, 0.8, 0.2, 0.1]), truth)["auc_roc"] == 0.0
    # one of four (pos, neg) pairs misordered: 0.4 (pos) < 0.5 (neg)
    assert ranking_scores(np.array([0.1, 0.5, 0.4, 0.9]), truth)["auc_roc"] == 0.75
    assert ranking_scores(np.full(4, 0.5), truth)["auc_roc"] == 0.5  # ties count half
    assert np.isnan(ranking_scores(np.array([0.1, 0.2]), np.array([1, 1], bool))["auc_roc"])


def test_roc_curve_spans_corners_and_matches_auc():
    rng = np.random.default_rng(0)
    truth = rng.random(5000) < 0.2
    prob = np.clip(truth * 0.3 + rng.random(5000) * 0.7, 0, 1)
    roc = curves(*threshold_counts(prob, truth, 201))
    assert len(roc["fpr"]) == 201
    assert roc["fpr"][-1] == 1.0 and roc["tpr"][-1] == 1.0
    assert np.all(np.diff(roc["fpr"]) >= 0) and np.all(np.diff(roc["tpr"]) >= 0)
    trapezoid = np.trapezoid(roc["tpr"], roc["fpr"])
    assert trapezoid == pytest.approx(ranking_scores(prob, truth)["auc_roc"], abs=0.01)


# --- against independent implementations (scikit-learn, torchmetrics) ----------------------

from sklearn import metrics as skm  # noqa: E402
from torchmetrics.functional import classification as tmc  # noqa: E402

from medseg.scoring.metrics import (  # noqa: E402
    class_confusion,
    confusion_matrix,
    mcc,
)


def _random_case(seed: int, n: int = 4000, fg: float = 0.15, levels: int | None = None):
    rng = np.random.default_rng(seed)
    truth = rng.random(n) < fg
    prob = np.clip(0.35 * truth + rng.random(n) * 0.65, 0, 1).astype(np.float32)
    if levels:  # many ties, as saturated network outputs give
        prob = np.round(prob * levels) / levels
    return prob, truth


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("levels", [None, 10])
def test_scores_match_scikit_learn(seed: int, levels: int | None):
    prob, truth = _random_case(seed, levels=levels)
    pred = prob >= 0.5
    s = scores(confusion(pred, truth))
    assert s["dice"] == pytest.approx(skm.f1_score(truth, pred, zero_division=1.0))
    assert s["iou"] == pytest.approx(skm.jaccard_score(truth, pred, zero_division=1.0))
    assert s["accuracy"] == pytest.approx(skm.accuracy_score(truth, pred))
    assert s["sensitivity"] == pytest.approx(skm.recall_score(truth, pred, zero_division=1.0))
    assert s["specificity"] == pytest.approx(
        skm.recall_score(truth, pred, pos_label=0, zero_division=1.0)
    )
    assert s["precision"] == pytest.approx(skm.precision_score(truth, pred, zero_division=1.0))
    assert s["mcc"] == pytest.approx(skm.matthews_corrcoef(truth, pred))
    r = ranking_scores(prob, truth)
    assert r["auc_roc"] == pytest.approx(skm.roc_auc_score(truth, prob), abs=1e-12)
    assert r["auc_pr"] == pytest.approx(skm.average_precision_score(truth, prob), abs=1e-12)


@pytest.mark.parametrize("seed", range(4))
def test_scores_match_torchmetrics(seed: int):
    torch = pytest.importorskip("torch")
    # ties, but none at the threshold: torchmetrics calls a pixel positive when > 0.5, we >=
    prob, truth = _random_case(seed, n=3000, levels=49 if seed % 2 else None)
    p, t = torch.from_numpy(prob), torch.from_numpy(truth.astype(np.int64))
    s = scores(confusion(prob >= 0.5, truth))
    assert s["dice"] == pytest.approx(float(tmc.binary_f1_score(p, t)), abs=1e-6)
    assert s["iou"] == pytest.approx(float(tmc.binary_jaccard_index(p, t)), abs=1e-6)
    assert s["mcc"] == pytest.approx(float(tmc.binary_matthews_corrcoef(p, t)), abs=1e-5)
    r = ranking_scores(prob, truth)
    assert r["auc_roc"] == pytest.approx(float(tmc.binary_auroc(p, t)), abs=1e-5)
    assert r["auc_pr"] == pytest.approx(float(tmc.binary_average_precision(p, t)), abs=1e-5)


def test_multiclass_confusion_matches_scikit_learn():
    rng = np.random.default_rng(3)
    truth = rng.integers(0, 4, size=(30, 40))
    pred = np.where(rng.random((30, 40)) < 0.6, truth, rng.integers(0, 4, size=(30, 40)))
    matrix = confusion_matrix(pred, truth, 4)
    expected = skm.confusion_matrix(truth.ravel(), pred.ravel(), labels=range(4))
    assert np.array_equal(matrix, expected)
    f1 = skm.f1_score(truth.ravel(), pred.ravel(), average=None, labels=range(4))
    iou = skm.jaccard_score(truth.ravel(), pred.ravel(), average=None, labels=range(4))
    for k in range(4):
        s = scores(class_confusion(matrix, k))
        assert s["dice"] == pytest.approx(f1[k]) and s["iou"] == pytest.approx(iou[k])
        assert class_confusion(matrix, k) == confusion(pred == k, truth == k)
    valid = rng.random((30, 40)) < 0.5
    assert confusion_matrix(pred, truth, 4, valid).sum() == valid.sum()


def test_empty_rules():
    # neither truth nor prediction has foreground: nothing to get wrong
    both_empty = Confusion(tp=0, fp=0, fn=0, tn=9)
    s = scores(both_empty)
    assert s["dice"] == s["iou"] == s["sensitivity"] == s["precision"] == s["mcc"] == 1.0
    assert s["accuracy"] == s["specificity"] == 1.0
    # scikit-learn agrees for the ratio scores with zero_division=1 ...
    none = np.zeros(9, bool)
    assert skm.f1_score(none, none, zero_division=1.0) == 1.0
    # ... but calls MCC 0 there; our rule: a perfect prediction scores 1
    with warnings.catch_warnings():  # scikit-learn warns that it saw a single label
        warnings.simplefilter("ignore", UserWarning)
        assert skm.matthews_corrcoef(none, none) == 0.0
    # a false alarm on an empty image: Dice, IoU, precision 0; MCC undefined -> 0
    alarm = scores(Confusion(tp=0, fp=2, fn=0, tn=7))
    assert alarm["dice"] == alarm["iou"] == alarm["precision"] == alarm["mcc"] == 0.0
    assert alarm["sensitivity"] == 1.0
    # everything missed: Dice 0, sensitivity 0, precision 1 (nothing claimed)
    missed = scores(Confusion(tp=0, fp=0, fn=3, tn=6))
    assert missed["dice"] == missed["sensitivity"] == missed["mcc"] == 0.0
    assert missed["precision"] == 1.0
    # all foreground and all found
    full = scores(Confusion(tp=5, fp=0, fn=0, tn=0))
    assert full["dice"] == full["mcc"] == full["sensitivity"] == full["specificity"] == 1.0
    assert mcc(Confusion(1, 0, 0, 1)) == 1.0 and mcc(Confusion(0, 1, 1, 0)) == -1.0
    # ranking scores are undefined with one class in the truth
    for truth in (np.zeros(5, bool), np.ones(5, bool)):
        r = ranking_scores(np.linspace(0, 1, 5), truth)
        assert np.isnan(r["auc_roc"]) and np.isnan(r["auc_pr"])
    assert np.isnan(ranking_scores(np.linspace(0, 1, 5), np.zeros(5, bool))["auc_pr"])


def test_fov_mask_changes_scores_exactly_as_expected():
    """Outside the FOV: background that a model rightly calls 0. Counting it (whole image)
    adds true negatives only: accuracy and specificity rise, Dice does not move, AUC rises
    because every vessel outranks those easy negatives."""
    prob = np.array([[0.9, 0.4, 0.6, 0.2], [0.0, 0.0, 0.0, 0.0]], np.float32)
    truth = np.array([[1, 1, 0, 0], [0, 0, 0, 0]], bool)
    fov = np.array([[1, 1, 1, 1], [0, 0, 0, 0]], bool)
    pred = prob >= 0.5
    inside, whole = confusion(pred, truth, fov), confusion(pred, truth)
    assert inside == Confusion(tp=1, fp=1, fn=1, tn=1)
    assert whole == Confusion(tp=1, fp=1, fn=1, tn=5)
    assert scores(inside)["dice"] == scores(whole)["dice"] == 0.5
    assert scores(inside)["accuracy"] == 0.5 and scores(whole)["accuracy"] == 6 / 8
    assert scores(whole)["specificity"] == 5 / 6
    # AUC inside: pairs (0.9|0.4) vs (0.6, 0.2): 0.9 wins both, 0.4 wins one -> 3/4
    assert ranking_scores(prob[fov], truth[fov])["auc_roc"] == 0.75
    # whole image adds 4 negatives at 0.0 that both vessels outrank: (3 + 8) / 12
    assert ranking_scores(prob, truth)["auc_roc"] == 11 / 12


def test_curves_agree_with_direct_counts():
    prob, truth = _random_case(7, n=5000)
    pos, neg = threshold_counts(prob, truth, 201)
    assert pos.sum() == truth.sum() and neg.sum() == (~truth).sum()
    c = curves(pos, neg)
    assert len(c["threshold"]) == 201 and c["threshold"][0] == 1.0 and c["threshold"][-1] == 0.0
    for i in (20, 100, 150):  # thresholds 0.9, 0.5, 0.25
        t = c["threshold"][i]
        direct = confusion(prob >= np.float32(t) - 1e-7, truth)
        assert c["tpr"][i] == pytest.approx(scores(direct)["sensitivity"])
        assert c["precision"][i] == pytest.approx(scores(direct)["precision"])
    # the areas under the sampled curves come close to the exact ones
    assert np.trapezoid(c["tpr"], c["fpr"]) == pytest.approx(
        ranking_scores(prob, truth)["auc_roc"], abs=0.01
    )
    assert np.trapezoid(c["precision"], c["tpr"]) == pytest.approx(
        ranking_scores(prob, truth)["auc_pr"], abs=0.02
    )


@pytest.mark.parametrize(
    ("prob", "truth", "expected"),
    [
        # 0.3..0.6 all give TP 2, FP 1 (Dice 0.8); the tie goes to the one nearest 0.5
        ([0.1, 0.2, 0.6, 0.7, 0.8], [0, 0, 1, 1, 0], (0.5, 0.8)),
        # a model too shy for 0.5: every positive scores 0.3, every negative 0.1
        ([0.1, 0.1, 0.3, 0.3], [0, 0, 1, 1], (0.3, 1.0)),
        # no positives: a threshold above every score predicts nothing, Dice 1
        ([0.1, 0.2], [0, 0], (0.5, 1.0)),
    ],
)
def test_best_dice_threshold_by_hand(prob, truth, expected):
    pos, neg = threshold_counts(np.array(prob), np.array(truth, bool), 11)
    t, dice = best_dice_threshold(pos, neg)
    assert t == pytest.approx(expected[0]) and dice == pytest.approx(expected[1])
