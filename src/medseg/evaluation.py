"""Scoring of the test cases: whole-image inference, FOV metrics, tables, curves, overlays."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.config import EvaluateConfig
from medseg.inference import predict_probs
from medseg.io.atomic import atomic_dir, write_json
from medseg.io.images import write_png
from medseg.metrics import Confusion, auc_roc, confusion, roc_points, scores
from medseg.model import load_model, resolve_device
from medseg.preprocess import load_split

log = logging.getLogger(__name__)

PRECISION = 4  # decimals kept in metrics.json: finer changes are noise, not results

# overlay colours (RGB): true positive, false positive, false negative
TP_COLOUR = np.array([0, 220, 0], dtype=np.float32)
FP_COLOUR = np.array([255, 40, 40], dtype=np.float32)
FN_COLOUR = np.array([40, 120, 255], dtype=np.float32)


def evaluate_model(
    cfg: EvaluateConfig, data_dir: str | Path, model_path: str | Path, out: str | Path
) -> dict:
    """Score the model on ``data_dir/test.npz`` and write the results into ``out``.

    Writes ``metrics.json`` (pooled over all test pixels inside the FOV, the DRIVE convention;
    the per-image mean; and whole-image figures for comparison with papers that count the black
    border), ``per_image.csv``, ``roc.csv`` and ``overlays/<case>.png``.

    Returns:
        The metrics written to ``metrics.json``.
    """
    device = resolve_device(cfg.device)
    model, _ = load_model(model_path, device)
    test = load_split(Path(data_dir) / "test.npz")
    pooled_fov = Confusion(0, 0, 0, 0)
    pooled_all = Confusion(0, 0, 0, 0)
    rows, probs_fov, truth_fov = [], [], []
    with atomic_dir(out) as tmp:
        (tmp / "overlays").mkdir()
        for case_id, image, truth, inside in test.cases():
            prob = predict_probs(
                model, image, cfg.window, cfg.overlap, cfg.batch_size, device=device
            )
            prob[~inside] = 0.0  # the FOV is known at inference: nothing is claimed outside it
            pred = prob >= cfg.threshold
            c = confusion(pred, truth, inside)
            pooled_fov += c
            pooled_all += confusion(pred, truth)
            probs_fov.append(prob[inside])
            truth_fov.append(truth[inside])
            rows.append(
                {
                    "case_id": case_id,
                    **scores(c),
                    "auc_roc": auc_roc(prob[inside], truth[inside]),
                }
            )
            write_png(tmp / "overlays" / f"{case_id}.png", overlay(image[0], pred, truth, inside))
        all_prob, all_truth = np.concatenate(probs_fov), np.concatenate(truth_fov)
        per_image = pd.DataFrame(rows)
        means = per_image.drop(columns="case_id").mean()
        metrics: dict = {
            "test": {
                "fov": {**scores(pooled_fov), "auc_roc": auc_roc(all_prob, all_truth)},
                "fov_per_image_mean": means.to_dict(),
                "whole_image": scores(pooled_all),
            },
            "n_images": len(test),
            "threshold": cfg.threshold,
        }
        metrics = _rounded(metrics)
        write_json(tmp / "metrics.json", metrics)
        per_image.round(PRECISION).to_csv(tmp / "per_image.csv", index=False)
        pd.DataFrame(roc_points(all_prob, all_truth)).round(6).to_csv(tmp / "roc.csv", index=False)
    fov_scores = metrics["test"]["fov"]
    log.info("test (FOV, pooled): dice %.4f auc %.4f", fov_scores["dice"], fov_scores["auc_roc"])
    return metrics


def overlay(image: np.ndarray, pred: np.ndarray, truth: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Colour a normalised grey image by outcome: TP green, FP red, FN blue; black outside the FOV.

    Args:
        image: (H, W) float32, roughly zero-mean unit-variance.
        pred, truth, fov: (H, W) bool.

    Returns:
        (H, W, 3) uint8 RGB.
    """
    grey = np.where(fov, np.clip((image + 2.5) / 5.0, 0.0, 1.0) * 255.0, 0.0)
    rgb = np.repeat(grey[..., None], 3, axis=2)
    for where, colour in (
        (pred & truth, TP_COLOUR),
        (pred & ~truth, FP_COLOUR),
        (~pred & truth, FN_COLOUR),
    ):
        rgb[where] = 0.25 * rgb[where] + 0.75 * colour
    return (rgb + 0.5).astype(np.uint8)


def _rounded(tree: dict) -> dict:
    out: dict = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            out[key] = _rounded(value)
        elif isinstance(value, float):
            out[key] = None if np.isnan(value) else round(value, PRECISION)
        else:
            out[key] = value
    return out
