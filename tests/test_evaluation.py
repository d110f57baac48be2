from __future__ import annotations

import numpy as np

from medseg.evaluation.evaluate import FN_COLOUR, FP_COLOUR, TP_COLOUR, overlay


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
from conftest import DRIVE, make_bundle, make_store  # noqa: E402
from sklearn import metrics as skm  # noqa: E402

from medseg.config.sections import EvaluateConfig  # noqa: E402
from medseg.errors import MedsegError  # noqa: E402
from medseg.evaluation.evaluate import evaluate_model  # noqa: E402
from medseg.scoring.tally import CURVE_POINTS, ScoreTally, SecondObserver  # noqa: E402
from medseg.spec import ModelSpec  # noqa: E402

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
    # pooled AUCs come from a score histogram (bounded memory): within 1e-4 of the exact value
    assert s["fov"]["auc_roc"] == pytest.approx(skm.roc_auc_score(t, p), abs=1e-4)
    assert s["fov"]["auc_pr"] == pytest.approx(skm.average_precision_score(t, p), abs=1e-4)
    assert s["fov"]["auc_roc"] != skm.roc_auc_score(t, p)  # (it is not the exact computation)
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
    tally = ScoreTally(3, ["background", "liver", "kidney"])
    for i in range(2):
        tally.add(f"c{i}", probs[i], probs[i].argmax(0).astype(np.uint8), truth[i], fov[i])
    s = tally.summary()
    pred = probs.argmax(1).ravel()
    f1 = skm.f1_score(truth.ravel(), pred, average=None, labels=[0, 1, 2])
    assert s["classes"]["liver"]["fov"]["dice"] == pytest.approx(f1[1])
    assert s["classes"]["kidney"]["fov"]["dice"] == pytest.approx(f1[2])
    assert s["fov"]["dice"] == pytest.approx((f1[1] + f1[2]) / 2)  # background left out
    auc2 = skm.roc_auc_score(truth.ravel() == 2, probs[:, 2].ravel())
    assert s["classes"]["kidney"]["fov"]["auc_roc"] == pytest.approx(auc2, abs=1e-4)
    assert set(tally.per_image()["class"]) == {"liver", "kidney"}
    conf = tally.confusion_table()
    assert len(conf) == 9 and set(conf["truth"]) == {"background", "liver", "kidney"}
    roc, _ = tally.curves()
    assert set(roc["class"]) == {"liver", "kidney"}


def test_pooled_auc_in_bounded_memory_matches_scikit_learn():
    """Many images of well-separated scores (crowded near 0 and 1): the histogram AUCs stay
    within 1e-4 of the exact values."""
    rng = np.random.default_rng(5)
    tally = ScoreTally(1)
    truths, scores = [], []
    for i in range(6):
        truth = (rng.random((200, 300)) < 0.12).astype(np.uint8)
        logit = np.where(truth > 0, rng.normal(5, 3, truth.shape), rng.normal(-7, 3, truth.shape))
        prob = (1 / (1 + np.exp(-logit))).astype(np.float32)
        fov = np.ones(truth.shape, bool)
        tally.add(f"c{i}", prob[None], (prob >= 0.5).astype(np.uint8), truth, fov)
        truths.append(truth.ravel() > 0)
        scores.append(prob.ravel())
    t, p = np.concatenate(truths), np.concatenate(scores)
    s = tally.summary()["fov"]
    assert s["auc_roc"] == pytest.approx(skm.roc_auc_score(t, p), abs=1e-4)
    assert s["auc_pr"] == pytest.approx(skm.average_precision_score(t, p), abs=1e-4)


def test_a_binary_model_with_a_named_class_reports_it_by_name():
    probs, truth, fov = _images(3)
    tally = ScoreTally(1, ["background", "liver"])
    for i in range(3):
        tally.add(f"c{i}", probs[i][None], (probs[i] >= 0.5).astype(np.uint8), truth[i], fov[i])
    s = tally.summary()
    assert s["classes"]["liver"]["fov"]["dice"] == s["fov"]["dice"]
    assert set(tally.per_image()["class"]) == {"liver"}


def _cases(n: int = 2, h: int = 40, w: int = 50):
    rng = np.random.default_rng(4)
    images = rng.normal(size=(n, 1, h, w)).astype(np.float32)
    masks = (images[:, 0] < -0.5).astype(np.uint8)
    fov = np.zeros((n, h, w), np.uint8)
    fov[:, 2 : h - 2, 2 : w - 2] = 1
    masks2 = masks[0].copy()
    masks2[5:8, :] ^= 1  # the second observer disagrees on three rows of case 0
    return images, masks, fov, [masks2, None]


def _test_store(folder: Path, second: bool = True, **kw):
    images, masks, fov, masks2 = _cases()
    ids = ["00_test", "01_test"]
    return make_store(folder, images, masks, fov, "test", masks2=masks2 if second else None,
                      ids=ids, **kw)  # fmt: skip


def test_second_observer_scored_against_the_first():
    _, masks, fov, masks2 = _cases()
    second = SecondObserver(1)
    assert second.summary() is None
    second.add(masks[0], masks2[0], fov[0] > 0)
    s = second.summary()
    assert s is not None and s["n_images"] == 1
    inside = fov[0] > 0
    assert s["dice"] == pytest.approx(skm.f1_score(masks[0][inside], masks2[0][inside]))


@pytest.fixture
def model_file(tmp_path: Path) -> Path:
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)
    return make_bundle(tmp_path / "models", spec) / "model.safetensors"


def test_evaluate_model_writes_every_output(tmp_path: Path, model_file: Path):
    data = tmp_path / "processed"
    _test_store(data)
    out = tmp_path / "results"
    metrics = evaluate_model(CFG, data, model_file, out)
    saved = json.loads((out / "metrics.json").read_text())
    assert saved == metrics and saved["n_images"] == 2
    assert list(saved["test"]) == [
        "fov", "fov_per_image_mean", "fov_per_image_std", "whole_image", "boundary",
        "second_observer",
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
    assert conf["pixels"].sum() == _cases()[2].sum()
    for sub in ("overlays", "probabilities"):
        assert sorted(p.name for p in (out / sub).iterdir()) == ["00_test.png", "01_test.png"]
    # the model folder alone is a bundle too
    assert evaluate_model(CFG, data, model_file.parent, tmp_path / "again") == metrics


def test_evaluate_refuses_a_model_trained_on_other_classes(tmp_path: Path, model_file: Path):
    data = tmp_path / "processed"
    _test_store(data, second=False)
    (data / "classes.json").write_text('{"names": ["background", "liver"]}')
    with pytest.raises(MedsegError, match="trained on the classes background, foreground"):
        evaluate_model(CFG, data, model_file, tmp_path / "results")
    assert not (tmp_path / "results").exists()


@pytest.mark.slow  # 30 s on real DRIVE images; the streaming tally: small cases above
@pytest.mark.skipif(not DRIVE.is_dir(), reason=f"DRIVE not found at {DRIVE}")
def test_streaming_evaluation_equals_the_in_memory_result_on_drive(tmp_path: Path):
    """evaluate streams case by case (histogram AUCs); the same model's probabilities held in
    memory for all 20 DRIVE test images and scored exactly give the same figures to 1e-4."""
    from medseg.config.sections import PreprocessConfig
    from medseg.inference.predictor import Predictor
    from medseg.inference.window import WindowSettings
    from medseg.io.images import binarize, read_raster
    from medseg.preprocess.transforms import prepare_image
    from medseg.scoring.metrics import confusion, ranking_scores, scores

    pre = PreprocessConfig("green", 0.2, 0)
    images, masks, fovs, ids = [], [], [], []
    for path in sorted((DRIVE / "test" / "images").glob("*.tif")):
        key = path.stem.split("_")[0]
        fov = binarize(read_raster(next((DRIVE / "test" / "mask").glob(f"{key}_*"))))
        truth = binarize(read_raster(next((DRIVE / "test" / "1st_manual").glob(f"{key}_*"))))
        images.append(prepare_image(read_raster(path), fov, pre)[0])
        masks.append(truth.astype(np.uint8))
        fovs.append(fov)
        ids.append(path.stem)
    assert len(ids) == 20
    make_store(tmp_path / "data", images, masks, fovs, "test", ids=ids)
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)
    models = make_bundle(tmp_path / "models", spec, seed=1)
    cfg = EvaluateConfig(threshold=0.5, window=1024, overlap=0.25, blending="gaussian",
                         tta=False, batch_size=1, device="cpu")  # fmt: skip
    streamed = evaluate_model(cfg, tmp_path / "data", models, tmp_path / "out")["test"]["fov"]

    from medseg.inference.bundle import load_bundle

    bundle = load_bundle(models, "cpu")
    predictor = Predictor.from_bundles([bundle], WindowSettings.from_config(cfg), cfg.threshold)
    probs, truths, total = [], [], None
    for image, mask, fov in zip(images, masks, fovs, strict=True):
        pred, p = predictor.predict(image, fov)
        c = confusion(pred > 0, mask > 0, fov)
        total = c if total is None else total + c
        probs.append(p[0][fov])
        truths.append(mask[fov] > 0)
    assert total is not None
    exact = {**scores(total), **ranking_scores(np.concatenate(probs), np.concatenate(truths))}
    assert 0.3 < exact["auc_roc"] < 0.95  # a model that ranks, neither trivially nor perfectly
    for name, value in exact.items():
        assert streamed[name] == pytest.approx(value, abs=1e-4), name


def test_histogram_counts_do_not_depend_on_how_the_pixels_come():
    """Small images are held back and counted together: the same counts as one big image."""
    from medseg.scoring.metrics import ScoreHistogram

    rng = np.random.default_rng(5)
    probs, truth = rng.random(50_000).astype(np.float32), rng.random(50_000) < 0.3
    whole, pieces = ScoreHistogram(), ScoreHistogram()
    whole.add(probs, truth)
    pieces.FLUSH = 7_000  # flushes part way, leaves the rest for scores()
    for start in range(0, 50_000, 1_000):
        pieces.add(probs[start : start + 1_000], truth[start : start + 1_000])
    assert np.array_equal(whole.pos, pieces.pos) and np.array_equal(whole.neg, pieces.neg)
    assert whole.pos.sum() == truth.sum() and whole.scores() == pieces.scores()


def test_nan_probabilities_name_the_case():
    tally = ScoreTally(1)
    probs = np.full((1, 4, 4), 0.5, np.float32)
    probs[0, 1, 1] = np.nan
    truth, fov = np.zeros((4, 4), np.uint8), np.ones((4, 4), bool)
    with pytest.raises(MedsegError, match=r"case c7: the model gave NaN or infinite"):
        tally.add("c7", probs, (probs[0] > 0.5).astype(np.uint8), truth, fov)


def test_pooled_dice_and_the_best_threshold_on_the_shared_grid():
    """What validation picks the best epoch and the threshold by, from the same tally."""
    from medseg.scoring.metrics import confusion, scores

    rng = np.random.default_rng(8)
    truths = [rng.random((20, 30)) < 0.3 for _ in range(2)]
    probs = [np.clip(t * 0.5 + rng.random((20, 30)) * 0.6, 0, 1).astype(np.float32) for t in truths]
    fov = np.ones((20, 30), bool)
    fov[:, :3] = False
    tally, light = ScoreTally(1), ScoreTally(1, light=True)
    total = None
    for i, (p, t) in enumerate(zip(probs, truths, strict=True)):
        pred = (p >= 0.5).astype(np.uint8)
        tally.add(f"c{i}", p[None], pred, t.astype(np.uint8), fov)
        light.add(f"c{i}", p[None], pred, t.astype(np.uint8), fov)
        c = confusion(pred > 0, t, fov)
        total = c if total is None else total + c
    assert total is not None and tally.pooled_dice() == scores(total)["dice"]
    best = tally.best_threshold()
    assert best is not None
    grid = np.linspace(0.0, 1.0, CURVE_POINTS)
    dices = []
    for th in grid:  # every grid point by brute force: none beats the one chosen
        c = confusion(probs[0] >= th, truths[0], fov) + confusion(probs[1] >= th, truths[1], fov)
        dices.append(scores(c)["dice"])
    assert best[0] in grid and best[1] == pytest.approx(max(dices))
    assert ScoreTally(3).best_threshold() is None
    # validation's light tally: the same two answers, and NaN scored, not refused
    assert (light.pooled_dice(), light.best_threshold()) == (tally.pooled_dice(), best)
    assert light.rows == []
    broken = np.full((1, 20, 30), np.nan, np.float32)
    with np.errstate(invalid="ignore"):  # NaN cast to a bin index
        light.add("nan", broken, np.zeros((20, 30), np.uint8), truths[0].astype(np.uint8), fov)
    assert light.pooled_dice() < tally.pooled_dice()
