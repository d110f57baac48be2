from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import tiny_params, write_params
from safetensors.numpy import load_file

from medseg.config import (
    ConvertConfig,
    DataConfig,
    PreprocessConfig,
    SynthesizeConfig,
    TrainConfig,
    load_params,
)
from medseg.convert import convert_dataset
from medseg.preprocess import preprocess_dataset
from medseg.synthetic import write_dataset
from medseg.training import fit


@pytest.fixture(scope="module")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("train")
    params = write_params(tmp / "params.yaml", tiny_params())
    write_dataset(load_params(params, SynthesizeConfig), tmp / "raw")
    convert_dataset(DataConfig(str(tmp / "raw"), "drive"), ConvertConfig(None, None), tmp / "conv")
    preprocess_dataset(load_params(params, PreprocessConfig), tmp / "conv", tmp / "proc")
    return tmp / "proc"


def _cfg(tmp_path: Path, **train: object) -> TrainConfig:
    params = tiny_params(train={"epochs": 2, **train})
    return load_params(write_params(tmp_path / "p.yaml", params), TrainConfig)


def test_fit_writes_weights_and_curves(processed: Path, tmp_path: Path):
    summary = fit(_cfg(tmp_path), processed, tmp_path / "models", tmp_path / "logs")
    assert sorted(p.name for p in (tmp_path / "models").iterdir()) == [
        "last.json", "last.safetensors", "model.json", "model.safetensors",
    ]  # fmt: skip
    assert summary["best_epoch"] in (1, 2) and 0.0 <= summary["best_val_dice"] <= 1.0
    loss = (tmp_path / "logs" / "plots" / "metrics" / "train" / "loss.tsv").read_text().splitlines()
    assert loss[0].split("\t") == ["step", "loss"] and len(loss) == 3


def test_cpu_training_is_deterministic(processed: Path, tmp_path: Path):
    cfg = _cfg(tmp_path, epochs=1)
    fit(cfg, processed, tmp_path / "a", tmp_path / "la")
    fit(cfg, processed, tmp_path / "b", tmp_path / "lb")
    a = load_file(str(tmp_path / "a" / "last.safetensors"))
    b = load_file(str(tmp_path / "b" / "last.safetensors"))
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    c = _cfg(tmp_path, epochs=1, seed=1)
    fit(c, processed, tmp_path / "c", tmp_path / "lc")
    other = load_file(str(tmp_path / "c" / "last.safetensors"))
    assert not all(np.array_equal(a[k], other[k]) for k in a)
