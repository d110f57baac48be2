from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_bundle

from medseg.bundle import load_bundle
from medseg.errors import MedsegError
from medseg.model import ModelSpec, build_model

SPEC = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)


def test_round_trip_gives_the_same_outputs(tmp_path: Path):
    folder = make_bundle(tmp_path / "models", SPEC, seed=3)
    torch.manual_seed(3)
    reference = build_model(SPEC).eval()
    for path in (folder, folder / "model.safetensors", folder / "last.safetensors"):
        bundle = load_bundle(path, "cpu")
        assert bundle.spec == SPEC and bundle.classes == ["background", "foreground"]
        assert not bundle.named_classes and bundle.preprocess.channel == "green"
        x = torch.randn(1, 1, 64, 64)
        with torch.no_grad():
            want, got = reference(x), bundle.model(x)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3, atol=1e-4)


def test_named_classes_travel(tmp_path: Path):
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=3, classes=3)
    names = ["background", "vessel", "disc"]
    bundle = load_bundle(make_bundle(tmp_path / "m", spec, channel="rgb", names=names), "cpu")
    assert bundle.classes == names and bundle.named_classes


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": 3}, r"3 output class\(es\) but .*classes\.json names 2 labels"),
        ({"in_channels": 3}, r"takes 3 input channel\(s\) but its preprocessing"),
        ({"arch": 7}, "malformed model spec"),
        ({"extra": 1}, "a model spec has exactly the keys"),
        ({"decoder_channels": [True] * 5}, "malformed model spec"),
    ],
)
def test_a_spec_that_does_not_fit_is_refused_naming_it(tmp_path: Path, change, message):
    folder = make_bundle(tmp_path / "models", SPEC)
    spec_path = folder / "model.json"
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), **change}))
    with pytest.raises(MedsegError, match=message) as info:
        load_bundle(folder, "cpu")
    assert "model.json" in str(info.value)
