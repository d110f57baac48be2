from __future__ import annotations

import numpy as np

from medseg.evaluation import FN_COLOUR, FP_COLOUR, TP_COLOUR, overlay


def test_overlay_colours_each_outcome():
    image = np.zeros((1, 5), np.float32)
    pred = np.array([[1, 1, 0, 0, 0]], bool)
    truth = np.array([[1, 0, 1, 0, 0]], bool)
    fov = np.array([[1, 1, 1, 1, 0]], bool)
    rgb = overlay(image, pred, truth, fov)
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    for col, colour in ((0, TP_COLOUR), (1, FP_COLOUR), (2, FN_COLOUR)):
        # the outcome's colour dominates the pixel
        assert np.argmax(rgb[0, col]) == np.argmax(colour)
    assert len({tuple(rgb[0, c]) for c in range(3)}) == 3
    assert rgb[0, 3].tolist() == [128, 128, 128]  # true negative: the grey image (0 -> mid-grey)
    assert rgb[0, 4].tolist() == [0, 0, 0]  # outside the FOV


import json  # noqa: E402
from pathlib import Path  # noqa: E402

import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from medseg.config import EvaluateConfig  # noqa: E402
from medseg.errors import MedsegError  # noqa: E402
from medseg.evaluation import (  # noqa: E402
    CURVE_POINTS,
    ScoreTally,
    evaluate_model,
    second_observer_scores,
)
from medseg.model import ModelSpec, build_model, save_model  # noqa: E402
from medseg.preprocess import SplitArrays  # noqa: E402

CFG = EvaluateConfig(
    threshold=0.5, window=64, overlap=0.25, blending="gaussian", tta=False, batch_size=2,
    device="cpu",
)  # fmt: skip


def _images(seed: int, n: int = 3, h: int = 30, w: int = 40):
    rng = np.random.default_rng(seed)
    truth = (rng.random((n, h, w)) < 0.2).astype(np.uint8)
    probs = np.clip(0.4 * truth + 0.6 * rng.random((n, h, w)), 0, 1).astype(np.float32)
    fov = np.zeros((n, h, w), bool)
    fov[:, 3:-3, 4:-4] = True
    return probs, truth, fov


def test_test_scores_pool_and_average_like_scikit_learn():
    probs, truth, fov = _images(0)
    tally = ScoreTally(1)
    for i in range(3):
        pred = (probs[i] >= 0.5).astype(np.uint8)
        tally.add(f"c{i}", probs[i][None], pred, truth[i], fov[i])
    s = tally.summary()
    t, p = truth[fov] > 0, probs[fov]
    assert s["fov"]["dice"] == pytest.approx(skm.f1_score(t, p >= 0.5))
    assert s["fov"]["auc_roc"] == pytest.approx(skm.roc_auc_score(t, p))
    assert s["fov"]["auc_pr"] == pytest.approx(skm.average_precision_score(t, p))
    per = [skm.f1_score(truth[i][fov[i]] > 0, probs[i][fov[i]] >= 0.5) for i in range(3)]
    assert s["fov_per_image_mean"]["dice"] == pytest.approx(np.mean(per))
    assert s["fov_per_image_std"]["dice"] == pytest.approx(np.std(per, ddof=1))
    assert s["whole_image"]["accuracy"] == pytest.approx(
        skm.accuracy_score(truth.ravel() > 0, probs.ravel() >= 0.5)
    )
    assert list(s["fov"])[:3] == ["dice", "iou", "accuracy"]
    table = tally.per_image()
    assert list(table["case_id"]) == ["c0", "c1", "c2"] and "class" not in table
    assert table["dice"].tolist() == pytest.approx(per)
    roc, pr = tally.curves()
    assert len(roc) == len(pr) == CURVE_POINTS
    conf = tally.confusion_table()
    assert conf["pixels"].sum() == fov.sum()


def test_image_without_vessels_is_left_out_of_the_auc_mean():
    probs, truth, fov = _images(1, n=2)
    truth[1] = 0
    tally = ScoreTally(1)
    for i in range(2):
        tally.add(f"c{i}", probs[i][None], (probs[i] >= 0.5).astype(np.uint8), truth[i], fov[i])
    rows = tally.per_image()
    assert np.isnan(rows["auc_roc"][1]) and rows["sensitivity"][1] == 1.0
    assert tally.summary()["fov_per_image_mean"]["auc_roc"] == pytest.approx(rows["auc_roc"][0])


def test_multiclass_per_class_and_mean():
    rng = np.random.default_rng(2)
    truth = rng.integers(0, 3, size=(2, 20, 20)).astype(np.uint8)
    logits = rng.normal(size=(2, 3, 20, 20)) + 2.0 * np.eye(3)[truth].transpose(0, 3, 1, 2)
    probs = (np.exp(logits) / np.exp(logits).sum(1, keepdims=True)).astype(np.float32)
    fov = np.ones((2, 20, 20), bool)
    tally = ScoreTally(3)
    for i in range(2):
        tally.add(f"c{i}", probs[i], probs[i].argmax(0).astype(np.uint8), truth[i], fov[i])
    s = tally.summary()
    pred = probs.argmax(1).ravel()
    f1 = skm.f1_score(truth.ravel(), pred, average=None, labels=[0, 1, 2])
    assert s["classes"]["class_1"]["fov"]["dice"] == pytest.approx(f1[1])
    assert s["classes"]["class_2"]["fov"]["dice"] == pytest.approx(f1[2])
    assert s["fov"]["dice"] == pytest.approx((f1[1] + f1[2]) / 2)  # background left out
    auc2 = skm.roc_auc_score(truth.ravel() == 2, probs[:, 2].ravel())
    assert s["classes"]["class_2"]["fov"]["auc_roc"] == pytest.approx(auc2)
    assert set(tally.per_image()["class"]) == {1, 2}
    assert len(tally.confusion_table()) == 9


def _split(n: int = 2, h: int = 40, w: int = 50, second: bool = True) -> SplitArrays:
    rng = np.random.default_rng(4)
    ph, pw = 64, 64
    images = np.zeros((n, 1, ph, pw), np.float32)
    images[:, :, :h, :w] = rng.normal(size=(n, 1, h, w))
    masks = np.zeros((n, ph, pw), np.uint8)
    masks[:, :h, :w] = images[:, 0, :h, :w] < -0.5
    fov = np.zeros((n, ph, pw), np.uint8)
    fov[:, 2 : h - 2, 2 : w - 2] = 1
    shapes = np.array([[h, w]] * n)
    ids = np.array([f"{i:02d}_test" for i in range(n)])
    if not second:
        return SplitArrays(images, masks, fov, shapes, ids)
    masks2 = masks.copy()
    masks2[0, 5:8, :] ^= 1  # the second observer disagrees on three rows of case 0
    return SplitArrays(images, masks, fov, shapes, ids, masks2, np.array([True, False]))


def test_second_observer_scored_against_the_first():
    split = _split()
    s = second_observer_scores(split, 1)
    assert s is not None and s["n_images"] == 1
    first = split.masks[0, :40, :50] > 0
    second = split.masks2[0, :40, :50] > 0  # type: ignore[index]
    inside = split.fov[0, :40, :50] > 0
    assert s["dice"] == pytest.approx(skm.f1_score(first[inside], second[inside]))
    assert second_observer_scores(_split(second=False), 1) is None


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)
    torch_model = build_model(spec)
    path = tmp_path / "models" / "model.safetensors"
    path.parent.mkdir()
    save_model(torch_model, spec, path)
    return path


def test_evaluate_model_writes_every_output(tmp_path: Path, model_file: Path):
    data = tmp_path / "processed"
    data.mkdir()
    split = _split()
    np.savez(data / "test.npz", **{k: v for k, v in split.__dict__.items() if v is not None})
    out = tmp_path / "results"
    metrics = evaluate_model(CFG, data, model_file, out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and saved["n_images"] == 2
    assert list(saved["test"]) == [
        "fov", "fov_per_image_mean", "fov_per_image_std", "whole_image", "second_observer",
    ]  # fmt: skip
    assert list(saved["test"]["fov"]) == [
        "dice", "iou", "accuracy", "sensitivity", "specificity", "precision", "mcc",
        "auc_roc", "auc_pr",
    ]  # fmt: skip
    for value in saved["test"]["fov"].values():
        assert value is None or round(value, 4) == value
    table = pd.read_csv(out / "per_image.csv")
    assert list(table["case_id"]) == ["00_test", "01_test"] and "whole_image_dice" in table
    assert len(pd.read_csv(out / "roc.csv")) == len(pd.read_csv(out / "pr.csv")) == 201
    conf = pd.read_csv(out / "confusion.csv")
    assert conf["pixels"].sum() == split.fov.sum()
    for sub in ("overlays", "probabilities"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["00_test.png", "01_test.png"]


def test_evaluate_refuses_labels_the_model_cannot_predict(tmp_path: Path, model_file: Path):
    data = tmp_path / "processed"
    data.mkdir()
    split = _split(second=False)
    split.masks[0, 0, 0] = 3
    np.savez(data / "test.npz", **{k: v for k, v in split.__dict__.items() if v is not None})
    with pytest.raises(MedsegError, match="label 3"):
        evaluate_model(CFG, data, model_file, tmp_path / "results")
    assert not (tmp_path / "results").exists()
