from __future__ import annotations

import math

import numpy as np
import pytest

from medseg.scoring.case_summary import mean_over_classes, summarize, tail_key


def test_summary_known_values():
    values = [4.0, 1.0, 3.0, 2.0, 10.0]
    out = summarize(values, higher_is_better=False)
    assert out == {
        "mean": 4.0,
        "median": 3.0,
        "p95": pytest.approx(4.0 + 0.8 * 6.0),  # linear: 80% of the way from 4 to 10
        "n": 5,
        "n_excluded": 0,
    }
    assert out["p95"] == pytest.approx(np.percentile(values, 95))
    scores = summarize([0.9, 0.5, 1.0], higher_is_better=True)
    assert set(scores) == {"mean", "median", "p05", "n", "n_excluded"}
    assert scores["p05"] == pytest.approx(0.5 + 0.1 * 0.4)


def test_nan_is_excluded_and_counted():
    out = summarize([1.0, math.nan, 3.0, math.nan], higher_is_better=False)
    assert (out["mean"], out["median"], out["n"], out["n_excluded"]) == (2.0, 2.0, 2, 2)


def test_no_value_gives_nulls():
    out = summarize([math.nan], higher_is_better=True)
    assert out == {"mean": None, "median": None, "p05": None, "n": 0, "n_excluded": 1}
    assert summarize([], higher_is_better=False)["n"] == 0


def test_tail_key():
    assert (tail_key(True), tail_key(False)) == ("p05", "p95")


def test_mean_over_classes():
    liver = {"hd95": {"mean": 2.0, "p95": 6.0, "n": 3, "n_excluded": 0}, "n_pred_empty": 1}
    tumour = {"hd95": {"mean": 4.0, "p95": None, "n": 0, "n_excluded": 3}, "n_pred_empty": 2}
    out = mean_over_classes({"liver": liver, "tumour": tumour})
    assert out == {"hd95": {"mean": 3.0, "p95": 6.0, "n": 3, "n_excluded": 3}, "n_pred_empty": 3}
    assert mean_over_classes({}) == {}
