"""Post-processing operations with known answers, and their choice on validation cases."""

from __future__ import annotations

import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.inference.postprocess import (
    apply,
    as_labels,
    check_operation,
    choose,
    drop_small,
    fill_holes,
    keep_largest,
    parse_steps,
    steps_record,
)


def canvas(*boxes: tuple[int, int, int, int], shape: tuple[int, int] = (20, 20)) -> np.ndarray:
    """A bool mask with the given (top, left, height, width) rectangles set."""
    m = np.zeros(shape, bool)
    for y, x, h, w in boxes:
        m[y : y + h, x : x + w] = True
    return m


def test_keep_largest() -> None:
    two = canvas((0, 0, 2, 5), (10, 10, 4, 5))  # 10 and 20 pixels
    assert np.array_equal(keep_largest(two), canvas((10, 10, 4, 5)))
    assert not keep_largest(np.zeros((4, 4), bool)).any()
    # diagonal neighbours are one component (8-connectivity)
    diagonal = np.eye(5, dtype=bool) | canvas((0, 4, 1, 1), shape=(5, 5))
    assert keep_largest(diagonal).sum() == 5


def test_fill_holes() -> None:
    ring = canvas((2, 2, 6, 6))
    ring[4:6, 4:6] = False
    assert np.array_equal(fill_holes(ring), canvas((2, 2, 6, 6)))
    # a gap open to the border is not a hole
    cup = canvas((0, 2, 6, 6))
    cup[0:4, 4:6] = False
    assert np.array_equal(fill_holes(cup), cup)


@pytest.mark.parametrize(("min_size", "left"), [(1, 13), (3, 13), (4, 10), (10, 10), (11, 0)])
def test_drop_small(min_size: int, left: int) -> None:
    mask = canvas((0, 0, 1, 3), (5, 5, 2, 5))  # 3 and 10 pixels
    assert drop_small(mask, min_size).sum() == left


def test_apply_per_class_on_a_label_map() -> None:
    labels = np.zeros((20, 20), np.uint8)
    labels[canvas((0, 0, 2, 2))] = 1  # a speck of class 1
    labels[canvas((10, 10, 5, 5))] = 1  # the organ
    labels[canvas((2, 12, 4, 4))] = 2
    labels[3:5, 13:15] = 0  # a hole in class 2
    out = apply(labels, {1: [{"op": "keep_largest"}], 2: [{"op": "fill_holes"}]})
    assert out.dtype == labels.dtype
    assert np.array_equal(out == 1, canvas((10, 10, 5, 5)))
    assert np.array_equal(out == 2, canvas((2, 12, 4, 4)))
    assert np.array_equal(apply(labels, {}), labels)


def test_as_labels() -> None:
    prob = np.array([[0.2, 0.5], [0.7, 0.49]], np.float32)
    assert as_labels(prob).tolist() == [[0, 1], [1, 0]]
    assert as_labels(prob[None], threshold=0.6).tolist() == [[0, 0], [1, 0]]
    three = np.stack([1 - prob, prob * 0.4, prob * 0.6])  # 0.7: 0.3, 0.28, 0.42
    assert as_labels(three).tolist() == [[0, 0], [2, 0]]
    assert as_labels(np.array([[0, 2]], np.uint8)).tolist() == [[0, 2]]


def test_bad_operation_is_one_error() -> None:
    with pytest.raises(MedsegError, match="unknown post-processing 'erode'"):
        check_operation({"op": "erode"})
    with pytest.raises(MedsegError, match="min_size"):
        check_operation({"op": "drop_small", "min_size": 0})


def organ_case(speck: bool, hole: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth = canvas((5, 5, 10, 10), shape=(30, 30)).astype(np.uint8)
    pred = truth.astype(np.float32) * 0.9
    if speck:
        pred[25:27, 25:27] = 0.8  # a false positive far from the organ
    if hole:
        pred[9:11, 9:11] = 0.1  # a miss inside it
    return pred, truth, np.ones(truth.shape, bool)


CANDIDATES = [{"op": "keep_largest"}, {"op": "fill_holes"}, {"op": "drop_small", "min_size": 3}]


def test_choose_keeps_what_raises_dice() -> None:
    cases = [organ_case(True, False), organ_case(False, True), organ_case(False, False)]
    choice = choose(cases, CANDIDATES)
    # keep_largest removes the speck and fills nothing; fill_holes then closes the hole;
    # drop_small finds nothing left to drop, so it does not raise Dice and is not kept
    assert choice.steps == {1: [{"op": "keep_largest"}, {"op": "fill_holes"}]}
    tp, fp, fn = 300 - 4, 4, 4
    assert choice.dice_before[1] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    assert choice.dice_after[1] == 1.0
    assert [line.endswith("not kept") for line in choice.tried[1]] == [False, False, True]


def test_choose_refuses_what_lowers_dice() -> None:
    # two true objects per case: keeping the largest would drop a real one
    truth = canvas((2, 2, 6, 6), (12, 12, 5, 5), shape=(20, 20)).astype(np.uint8)
    choice = choose([(truth.copy(), truth, None)], [{"op": "keep_largest"}])
    assert choice.steps == {1: []}
    assert choice.dice_after[1] == choice.dice_before[1] == 1.0


def test_choose_scores_inside_the_fov_only() -> None:
    pred, truth, _ = organ_case(True, False)
    fov = np.ones(truth.shape, bool)
    fov[20:, 20:] = False  # the speck lies outside the FOV: nothing to gain
    choice = choose([(pred, truth, fov)], [{"op": "keep_largest"}])
    assert choice.dice_before[1] == 1.0 and choice.steps == {1: []}


def test_choose_decides_per_class() -> None:
    truth = np.zeros((30, 30), np.uint8)
    truth[2:10, 2:10] = 1
    truth[15:20, 15:20] = 2
    truth[24:28, 24:28] = 2  # class 2 has two objects
    pred = truth.copy()
    pred[0, 29] = 1  # a speck of class 1
    choice = choose([(pred, truth, None)], [{"op": "keep_largest"}])
    assert choice.steps == {1: [{"op": "keep_largest"}], 2: []}


def test_steps_record_round_trips_and_is_checked() -> None:
    steps = {2: [{"op": "fill_holes"}], 1: [{"op": "drop_small", "min_size": 9}], 3: []}
    record = steps_record(steps)
    assert record == {"1": [{"op": "drop_small", "min_size": 9}], "2": [{"op": "fill_holes"}]}
    assert parse_steps(record, [1, 2, 3], "m") == {k: v for k, v in steps.items() if v}
    assert parse_steps({}, [1], "m") == {} and parse_steps({"1": []}, [1], "m") == {}
    for raw, message in (
        ([], "must be an object of class labels"),
        ({"4": []}, r"m: post-processing for class '4'; the model's classes are 1, 2, 3"),
        ({"-1": []}, r"class '-1'"),
        ({"1": {"op": "fill_holes"}}, "class 1 is not a list of objects"),
        ({"1": ["fill_holes"]}, "class 1 is not a list of objects"),
        ({"1": [{"op": "erode"}]}, r"m: unknown post-processing 'erode'"),
        ({"1": [{"op": "drop_small", "min_size": 0}]}, "drop_small needs min_size"),
    ):
        with pytest.raises(MedsegError, match=message):
            parse_steps(raw, [1, 2, 3], "m")


def test_choose_takes_no_gain_made_of_wins_and_losses_for_a_rule() -> None:
    """keep_largest removes a false speck on two cases and a true second object on two
    others: the pooled Dice rises (the specks are larger), but the gain is wins and losses
    that a bootstrap over the cases shows as noise, so it is not kept, and the log says so.
    Alone, the two helped cases keep it (nothing else is touched)."""

    def case(speck: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        truth = canvas((5, 5, 10, 10), shape=(30, 30)).astype(np.uint8)
        pred = truth.astype(np.float32) * 0.9
        if speck:
            pred[22:26, 22:26] = 0.8  # a 16-pixel false positive
        else:
            truth[24:27, 24:27] = 1  # a true 9-pixel object that keep_largest drops
            pred[24:27, 24:27] = 0.8
        return pred, truth, np.ones(truth.shape, bool)

    mixed = [case(True), case(True), case(False), case(False)]
    choice = choose(mixed, [{"op": "keep_largest"}])
    assert choice.dice_after[1] == choice.dice_before[1] and choice.steps == {1: []}
    assert (
        choice.tried[1][0].endswith("not kept") and "resamples of the 4 cases" in choice.tried[1][0]
    )
    helped = choose([case(True), case(True)], [{"op": "keep_largest"}])
    assert helped.steps == {1: [{"op": "keep_largest"}]}
