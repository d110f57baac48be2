"""Boundary distances and lesion counts in the scoring tally and the evaluate stage."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import make_bundle

from medseg.config.sections import EvaluateConfig
from medseg.errors import MedsegError
from medseg.evaluation.evaluate import evaluate_model
from medseg.io.shards import ShardWriter
from medseg.preprocess.dataset import case_arrays
from medseg.scoring.boundary import boundary_scores
from medseg.scoring.lesions import lesion_counts
from medseg.scoring.shapes import ShapeScoring
from medseg.scoring.tally import ScoreTally
from medseg.spec import ModelSpec

CFG = EvaluateConfig(
    threshold=0.5, window=64, overlap=0.25, blending="gaussian", tta=False, batch_size=2,
    device="cpu",
)  # fmt: skip


@pytest.mark.parametrize(
    ("changes", "spacings", "unit", "lesions"),
    [
        ({}, [(0.5, 0.5), (0.7, 0.7)], "mm", {2}),  # auto: mm where every case has a spacing
        ({}, [(0.5, 0.5), None], "px", {2}),  # one case without: pixels for all
        ({"boundary_unit": "px"}, [(0.5, 0.5)], "px", {2}),
        ({"lesions": True}, [None], "px", {1, 2}),  # thin classes too, when asked
        ({"lesions": False}, [None], "px", set()),
    ],
)
def test_scoring_follows_the_params_and_the_data(changes, spacings, unit, lesions):
    cfg = dataclasses.replace(CFG, **changes)
    scoring = ShapeScoring.from_config(cfg, spacings, [1, 2], thin={1})
    assert scoring.unit == unit and scoring.lesion_labels == lesions and scoring.boundary


def test_mm_without_a_spacing_is_one_error_naming_the_key():
    cfg = dataclasses.replace(CFG, boundary_unit="mm")
    with pytest.raises(MedsegError, match=r"evaluate\.boundary_unit is mm .* set it to px or auto"):
        ShapeScoring.from_config(cfg, [(0.5, 0.5), None], [1])
    with pytest.raises(MedsegError, match=r"evaluate\.boundary_tolerance must be >= 0"):
        dataclasses.replace(CFG, boundary_tolerance=-1.0)
    with pytest.raises(MedsegError, match=r"evaluate\.lesions must be one of auto"):
        dataclasses.replace(CFG, lesions="some")


def _two_classes() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    truth = np.zeros((40, 50), np.uint8)
    truth[5:15, 5:15] = 1
    truth[20:30, 30:45] = 2
    pred = np.zeros_like(truth)
    pred[5:15, 8:18] = 1  # class 1 shifted by 3 columns
    pred[20:30, 30:36] = 2  # class 2 split in two pieces
    pred[20:30, 38:45] = 2
    fov = np.ones(truth.shape, bool)
    return pred, truth, fov


def test_the_tally_scores_each_class_as_the_metric_functions_do():
    pred, truth, fov = _two_classes()
    probs = np.stack([(pred == k).astype(np.float32) for k in range(3)])
    scoring = ShapeScoring(boundary=True, unit="mm", tolerance=2.0, lesion_labels=frozenset({2}))
    tally = ScoreTally(3, ["background", "liver", "tumour"], shapes=scoring)
    tally.add("a", probs, pred, truth, fov, (0.5, 2.0))
    rows = tally.per_image().set_index("class")
    for k, name in ((1, "liver"), (2, "tumour")):
        want = boundary_scores(pred == k, truth == k, fov, spacing=(0.5, 2.0), tolerance=2.0)
        assert rows.loc[name, "hd95"] == pytest.approx(want.hd95)
        assert rows.loc[name, "nsd"] == pytest.approx(want.nsd)
    assert rows.loc["liver", "hd95"] == pytest.approx(6.0)  # 3 columns of 2 mm
    counts = lesion_counts(pred == 2, truth == 2, fov)
    assert (counts.detected, counts.invented, counts.missed) == (1, 1, 0)  # one piece invented
    assert rows.loc["tumour", "lesion_fp"] == 1 and pd.isna(rows.loc["liver", "lesion_fp"])
    summary = tally.summary()
    assert summary["classes"]["liver"]["boundary"]["hd95"]["mean"] == pytest.approx(6.0)
    assert "lesions" not in summary["classes"]["liver"]
    assert summary["classes"]["tumour"]["lesions"]["pooled"]["fp"] == 1
    mean = np.mean([summary["classes"][n]["boundary"]["assd"]["mean"] for n in ("liver", "tumour")])
    assert summary["boundary"]["assd"]["mean"] == pytest.approx(mean)  # the mean over classes
    assert summary["lesions"] == summary["classes"]["tumour"]["lesions"]


def _resized_store(folder: Path, spacing: list[float] | None) -> np.ndarray:
    """One test case preprocessed at half size (as ``preprocess.max_side`` makes one), its
    ground truth and FOV kept at full size; returns the full-size FOV."""
    rng = np.random.default_rng(0)
    full_truth = np.zeros((64, 96), np.uint8)
    full_truth[10:40, 20:60] = 1
    full_fov = np.zeros((64, 96), bool)
    full_fov[2:62, 4:90] = True
    image = rng.normal(size=(1, 32, 48)).astype(np.float32)
    arrays = case_arrays(image, full_truth[::2, ::2], full_fov[::2, ::2], 2)
    arrays["mask_full"] = full_truth
    arrays["fov_full"] = full_fov.astype(np.uint8)
    meta = {"height": 32, "width": 48, "full_height": 64, "full_width": 96}
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, "test")
    writer.add("big", arrays, **meta, **({"spacing": spacing} if spacing else {}))
    writer.close()
    return full_fov


def test_scores_at_the_ground_truths_resolution_in_mm_where_the_spacing_is_known(tmp_path: Path):
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)
    model = make_bundle(tmp_path / "models", spec)
    fov = _resized_store(tmp_path / "mm", [0.5, 0.5])
    _resized_store(tmp_path / "px", None)
    cfg = dataclasses.replace(CFG, lesions=True, boundary_tolerance=1.0)
    in_mm = evaluate_model(cfg, tmp_path / "mm", model, tmp_path / "out_mm")
    px_cfg = dataclasses.replace(cfg, boundary_tolerance=2.0)  # the same 1 mm, in pixels
    in_px = evaluate_model(px_cfg, tmp_path / "px", model, tmp_path / "out_px")
    # every pixel of the full-size FOV is counted once: the case was scored at full size
    confusion = pd.read_csv(tmp_path / "out_mm" / "confusion.csv")
    assert confusion["pixels"].sum() == fov.sum() == 60 * 86
    assert (in_mm["boundary_unit"], in_px["boundary_unit"]) == ("mm", "px")
    mm = pd.read_csv(tmp_path / "out_mm" / "per_image.csv").iloc[0]
    px = pd.read_csv(tmp_path / "out_px" / "per_image.csv").iloc[0]
    assert mm["boundary_status"] == px["boundary_status"]
    if mm["boundary_status"] == "both":  # the random model predicted some foreground
        assert mm["hd95"] == pytest.approx(0.5 * px["hd95"], rel=1e-4)
        assert mm["assd"] == pytest.approx(0.5 * px["assd"], rel=1e-4)
        assert mm["nsd"] == pytest.approx(px["nsd"])
    else:  # one side empty: the FOV box's diagonal, in each unit
        assert mm["hd95"] == pytest.approx(0.5 * px["hd95"], rel=1e-4)
    assert mm["lesion_truth"] == 1
    saved = json.loads((tmp_path / "out_mm" / "metrics.json").read_text())
    assert set(saved["test"]) >= {"boundary", "lesions"}
    assert saved["test"]["boundary"]["hd95"]["n"] == 1


def test_no_lesion_counts_under_auto_without_training_cases_to_judge_from(tmp_path: Path):
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)
    model = make_bundle(tmp_path / "models", spec)
    _resized_store(tmp_path / "data", None)
    metrics = evaluate_model(CFG, tmp_path / "data", model, tmp_path / "out")
    assert "boundary" in metrics["test"] and "lesions" not in metrics["test"]
    off = evaluate_model(
        dataclasses.replace(CFG, boundary=False), tmp_path / "data", model, tmp_path / "off"
    )
    assert "boundary" not in off["test"] and "boundary_unit" not in off
