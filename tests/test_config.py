from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest
from conftest import REPO, tiny_params, write_params

from medseg.config import (
    DataConfig,
    EvaluateConfig,
    Params,
    TrainConfig,
    load_all_params,
    load_params,
)
from medseg.errors import MedsegError


def test_repository_params_load_with_every_section():
    params = load_all_params(REPO / "params.yaml")
    assert isinstance(params.train, TrainConfig)
    assert params.train.encoder_weights is None  # offline by default
    assert [f.name for f in dataclasses.fields(Params)] == [
        "data", "synthesize", "convert", "preprocess", "train", "evaluate", "crossval",
    ]  # fmt: skip


def test_load_params_returns_the_section(params_file: Path):
    data = load_params(params_file, DataConfig)
    assert data.layout == "drive"
    assert load_params(params_file, EvaluateConfig).window == 64


def test_sections_are_frozen(params_file: Path):
    cfg = load_params(params_file, TrainConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_int_is_accepted_for_float(tmp_path: Path):
    path = write_params(tmp_path / "p.yaml", tiny_params(train={"lr": 1}))
    assert load_params(path, TrainConfig).lr == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": {"lrr": 0.1}}, "unknown key train.lrr"),
        ({"train": {"epochs": "ten"}}, "train.epochs must be of type int"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be of type int"),
        ({"train": {"amp": 1}}, "train.amp must be of type bool"),
        ({"train": {"lr": "1e-3"}}, "floats are written with a dot"),
        ({"train": {"decoder_channels": 16}}, "train.decoder_channels must be a list"),
        ({"train": {"patch_size": 50}}, "train.patch_size must be a positive multiple of 32"),
        ({"train": {"epochs": 0}}, "train.epochs must be > 0"),
        ({"preprocess": {"channel": "red"}}, "preprocess.channel must be one of"),
        ({"data": {"layout": "nnunet"}}, "data.layout must be one of"),
        ({"evaluate": {"threshold": 1.5}}, "evaluate.threshold must be in [0, 1]"),
        ({"evaluate": {"blending": "mean"}}, "evaluate.blending must be one of gaussian"),
        ({"evaluate": {"tta": "yes"}}, "evaluate.tta must be of type bool"),
        ({"convert": {"window_center": 40.0}}, "must be set together"),
        ({"crossval": {"folds": [0]}}, "crossval.folds must be [0, 1, ..., k-1] with k >= 2"),
        ({"crossval": {"folds": [1, 2]}}, "crossval.folds must be [0, 1, ..., k-1]"),
        ({"crossval": {"folds": 5}}, "crossval.folds must be a list"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, changes: dict, message: str):
    path = write_params(tmp_path / "p.yaml", tiny_params(**changes))
    with pytest.raises(MedsegError) as err:
        load_params(path, DataConfig)  # any section: the whole file is checked
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_key_and_unknown_section(tmp_path: Path):
    params = tiny_params()
    del params["train"]["lr"]
    with pytest.raises(MedsegError, match=re.escape("missing key train.lr")):
        load_params(write_params(tmp_path / "a.yaml", params), TrainConfig)
    params = tiny_params()
    params["trian"] = {}
    with pytest.raises(MedsegError, match="unknown key trian"):
        load_params(write_params(tmp_path / "b.yaml", params), TrainConfig)


def test_unreadable_files(tmp_path: Path):
    with pytest.raises(MedsegError, match="cannot read params file"):
        load_params(tmp_path / "absent.yaml", TrainConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(MedsegError, match="not valid YAML"):
        load_params(bad, TrainConfig)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(MedsegError, match="must be a mapping"):
        load_params(empty, TrainConfig)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"loss": "focal"}, "train.loss must be one of bce, dice, bce_dice, cldice"),
        ({"cldice_weight": 1.5}, "train.cldice_weight must be in [0, 1]"),
        ({"optimizer": "sgd"}, "train.optimizer must be one of adam, adamw"),
        ({"schedule": "step"}, "train.schedule must be one of constant, cosine, poly"),
        ({"min_lr": 1.0}, "train.min_lr must be <= train.lr"),
        ({"warmup_epochs": -1.0}, "train.warmup_epochs must be >= 0.0"),
        ({"grad_clip": -1.0}, "train.grad_clip must be >= 0.0"),
        ({"val_every": 0}, "train.val_every must be > 0"),
        ({"aug_rotate": 200.0}, "train.aug_rotate must be in [0, 180] degrees"),
        ({"aug_scale": 0.9}, "train.aug_scale must be in [0, 0.5]"),
        ({"aug_gamma": 1.0}, "train.aug_gamma must be in [0, 1)"),
        ({"aug_prob": 2.0}, "train.aug_prob must be in [0, 1]"),
        ({"workers": -1}, "train.workers must be >= 0"),
        ({"classes": 0}, "train.classes must be >= 1"),
        ({"compile": "yes"}, "train.compile must be of type bool"),
    ],
)
def test_bad_training_values_name_the_key(tmp_path: Path, train: dict, message: str):
    path = write_params(tmp_path / "p.yaml", tiny_params(train=train))
    with pytest.raises(MedsegError) as err:
        load_params(path, TrainConfig)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ({}, "at least one class"),
        ({"background": 1}, "is not a class name"),
        ({"9lives": 1}, "is not a class name"),
        ({"liver": 0}, r"data\.classes\.liver must be a mask value"),
        ({"liver": "1"}, r"data\.classes\.liver must be a mask value"),
        ({"liver": 1, "kidney": [2, 1]}, "mask value 1 is given twice"),
    ],
)
def test_bad_data_classes_are_refused_naming_the_key(classes: dict, message: str):
    with pytest.raises(MedsegError, match=message):
        DataConfig("d", "folders", classes=classes)


def test_data_classes_map_values_to_labels_in_order():
    from medseg.config import label_map

    assert label_map({"liver": 63, "kidney": [126, 189]}) == {63: 1, 126: 2, 189: 2}


def test_more_classes_than_8_bit_labels_hold_are_refused():
    classes = {f"c{k}": k for k in range(1, 257)}
    with pytest.raises(MedsegError, match=r"data\.classes names 256 classes; at most 255"):
        DataConfig("data", "folders", classes=classes)
