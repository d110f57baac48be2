"""The post-processing chosen after training: handcrafted predictions with known answers, and a
real tiny training run whose bundle records what the choice keeps."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch
from conftest import make_store, tiny_params, write_params

from medseg.config import load_params
from medseg.config.sections import TrainConfig
from medseg.inference.bundle import load_bundle
from medseg.inference.predictor import Predictor
from medseg.inference.runners import TorchRunner
from medseg.io.shards import CaseStore, ShardWriter
from medseg.labels import LabelSpace
from medseg.preprocess.dataset import case_arrays
from medseg.preprocess.processed import open_split
from medseg.spec import ModelSpec
from medseg.training.loop import fit
from medseg.training.postchoice import choose_for_bundle, choose_postprocess

KEEP_LARGEST = {"op": "keep_largest"}


class Identity(torch.nn.Module):
    """Logits 2x - 1 of a one-channel image: foreground where the pixel is >= 0.5."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * x - 1


def _resized_store(folder: Path) -> CaseStore:
    """One validation case stored as preprocess stores a resized one: a 24x24 model input with
    an organ (a hole in its middle) and a 2x2 speck, its truth at 48x48 (the organ only)."""
    image = np.zeros((1, 24, 24), np.float32)
    image[0, 4:16, 4:16] = 1.0
    image[0, 9:11, 9:11] = 0.0  # the hole
    image[0, 19:21, 19:21] = 1.0  # the speck: 4 pixels here, 16 at the truth's size
    mask = (image[0] > 0).astype(np.uint8)
    mask[19:21, 19:21] = 0
    truth = mask.repeat(2, axis=0).repeat(2, axis=1)
    arrays = case_arrays(image, mask, np.ones((24, 24), bool), 2)
    arrays["mask_full"] = truth
    arrays["fov_full"] = np.ones((48, 48), np.uint8)
    folder.mkdir(parents=True)
    writer = ShardWriter(folder, "val")
    writer.add("case0", arrays, height=24, width=24, full_height=48, full_width=48)
    writer.close()
    return CaseStore.open(folder, "val")


def test_the_choice_is_made_at_the_truths_resolution(tmp_path: Path, caplog):
    val = _resized_store(tmp_path / "val")
    predictor = Predictor([TorchRunner(Identity())], LabelSpace.of(1), 0.5)
    candidates = [
        {"op": "fill_holes"},  # the truth has the hole: filling it costs Dice
        {"op": "drop_small", "min_size": 10},  # the speck has 16 pixels at the truth's size
        KEEP_LARGEST,  # removes the speck: kept
    ]
    with caplog.at_level(logging.INFO, logger="medseg.training.postchoice"):
        assert choose_postprocess(candidates, predictor, val) == {1: [KEEP_LARGEST]}
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 4 and all(line.startswith("post-processing ") for line in lines)
    assert "of foreground: fill_holes: Dice" in lines[0] and lines[0].endswith(", not kept")
    assert "drop_small (min_size 10)" in lines[1] and lines[1].endswith(", not kept")
    assert "keep_largest" in lines[2] and lines[2].endswith(", kept")
    assert (
        lines[3] == "post-processing kept for the bundle: {'foreground': [{'op': 'keep_largest'}]}"
    )
    # at the model's resolution the speck (4 pixels) would have been dropped by drop_small 10
    small = make_store(tmp_path / "small", [val.get(0, "image")], [val.get(0, "mask")], split="val")
    assert choose_postprocess(candidates, predictor, small) == {
        1: [{"op": "drop_small", "min_size": 10}]
    }


def test_nothing_is_chosen_without_candidates_or_validation_cases(tmp_path: Path):
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], 1, 1)
    val = _resized_store(tmp_path / "val")
    empty = make_store(tmp_path / "empty", [], [], split="val")
    cpu, labels = torch.device("cpu"), LabelSpace.of(1)
    # the weights are not even looked at
    assert choose_for_bundle([], spec, {}, val, cpu, labels, 0.5) == {}
    assert choose_for_bundle([KEEP_LARGEST], spec, {}, empty, cpu, labels, 0.5) == {}


def test_training_records_the_choice_of_its_best_weights(processed: Path, tmp_path: Path, caplog):
    candidates = [{"op": "drop_small", "min_size": 1}, KEEP_LARGEST, {"op": "fill_holes"}]
    params = tiny_params(train={"epochs": 1, "postprocess": candidates})
    cfg = load_params(write_params(tmp_path / "p.yaml", params), TrainConfig)
    with caplog.at_level(logging.INFO, logger="medseg.training.postchoice"):
        fit(cfg, processed, tmp_path / "models", tmp_path / "logs")
    tried = [r.getMessage() for r in caplog.records if r.name == "medseg.training.postchoice"]
    assert len(tried) == 4 and "drop_small (min_size 1)" in tried[0]
    assert tried[0].endswith(", not kept")  # drop_small 1 removes nothing: never kept
    bundle = load_bundle(tmp_path / "models", "cpu")
    # the same choice, made again from the bundle as evaluate loads it: deterministic
    raw = Predictor([TorchRunner(bundle.model)], bundle.labels, bundle.threshold or 0.5)
    again = choose_postprocess(candidates, raw, open_split(processed, "val"))
    assert bundle.postprocess == again
    assert all({"op": "drop_small", "min_size": 1} not in s for s in bundle.postprocess.values())
    assert load_bundle(tmp_path / "models" / "last.safetensors", "cpu").postprocess == {}
