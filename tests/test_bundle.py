from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_bundle

from medseg.errors import MedsegError
from medseg.inference.bundle import POSTPROCESS, THRESHOLD, load_bundle, read_weights
from medseg.model import build_model
from medseg.spec import ModelSpec

SPEC = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)


def test_round_trip_gives_the_same_outputs(tmp_path: Path):
    folder = make_bundle(tmp_path / "models", SPEC, seed=3)
    torch.manual_seed(3)
    reference = build_model(SPEC).eval()
    for path in (folder, folder / "model.safetensors", folder / "last.safetensors"):
        bundle = load_bundle(path, "cpu")
        assert bundle.spec == SPEC and bundle.classes == ["background", "foreground"]
        assert not bundle.labels.named and bundle.preprocess.channel == "green"
        x = torch.randn(1, 1, 64, 64)
        with torch.no_grad():
            want, got = reference(x), bundle.model(x)
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-3, atol=1e-4)


def test_named_classes_travel(tmp_path: Path):
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=3, classes=3)
    names = ["background", "vessel", "disc"]
    bundle = load_bundle(make_bundle(tmp_path / "m", spec, channel="rgb", names=names), "cpu")
    assert bundle.classes == names and bundle.labels.named


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One bundle for the tests that spoil a copy of it (building one takes a second)."""
    return make_bundle(tmp_path_factory.mktemp("made") / "models", SPEC)


def _copy(made: Path, tmp_path: Path) -> Path:
    """A copy of the bundle's records, with links to its (large, untouched) weights."""
    folder = tmp_path / "models"
    folder.mkdir()
    for path in made.iterdir():
        if path.suffix == ".safetensors":
            (folder / path.name).symlink_to(path)
        else:
            shutil.copyfile(path, folder / path.name)
    return folder


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"classes": 3}, r"3 output class\(es\) but .*classes\.json names 2 labels"),
        ({"in_channels": 3}, r"takes 3 input channel\(s\) but its preprocessing"),
        ({"arch": 7}, r"field arch must be one of unet, .*, got 7$"),
        ({"arch": "x" * 10**6}, r"field arch must be one of .*, got 'xxxxx+\.\.\.$"),
        ({"encoder": "../../etc/passwd"}, r"field encoder must be an encoder name"),
        ({"encoder": ["resnet18"]}, r"field encoder must be an encoder name"),
        ({"extra": 1}, r"unknown field 'extra'; it has exactly arch, encoder"),
        ({"decoder_channels": [True] * 5}, r"field decoder_channels must be a list of 1 to 8"),
        ({"decoder_channels": [10**9] * 5}, r"field decoder_channels must be .* in 1\.\.4096"),
        ({"decoder_channels": [16] * 100}, r"field decoder_channels must be a list of 1 to 8"),
        ({"decoder_channels": "16"}, r"field decoder_channels must be a list"),
        ({"decoder_channels": [-16] * 5}, r"field decoder_channels must be a list"),
        ({"classes": 10**9}, r"field classes must be an integer in 1\.\.256, got 1000000000$"),
        ({"classes": 0}, r"field classes must be an integer in 1\.\.256, got 0$"),
        ({"classes": 2.0}, r"field classes must be an integer in 1\.\.256, got 2\.0$"),
        ({"in_channels": -1}, r"field in_channels must be an integer in 1\.\.3, got -1$"),
        ({"in_channels": None}, r"field in_channels must be an integer in 1\.\.3, got None$"),
    ],
)
def test_a_spec_that_does_not_fit_is_refused_naming_it(made: Path, tmp_path: Path, change, message):
    folder = _copy(made, tmp_path)
    spec_path = folder / "model.json"
    spec_path.write_text(json.dumps({**json.loads(spec_path.read_text()), **change}))
    with pytest.raises(MedsegError, match=message) as info:
        load_bundle(folder, "cpu")
    assert str(info.value).startswith(str(spec_path)) and len(str(info.value)) < 400


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[" * 100_000 + "]" * 100_000, r"model\.json: not a valid model spec \(RecursionError\)"),
        (" " * (1 << 20) + "{}", r"model\.json: larger than 1 MiB; not a model spec"),
        ("[1, 2]", r"model\.json: malformed model spec: not a JSON object with keys arch, encoder"),
        ('{"arch": "unet"}', r"model\.json: malformed model spec: missing field encoder"),
    ],
)
def test_a_spec_file_that_is_not_a_spec_is_refused_naming_it(
    made: Path, tmp_path: Path, text, message
):
    folder = _copy(made, tmp_path)
    (folder / "model.json").write_text(text)
    with pytest.raises(MedsegError, match=message):
        load_bundle(folder, "cpu")


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("classes.json", '{"names": ["background"] + 1}', r"classes\.json: not a valid class list"),
        ("classes.json", json.dumps({"names": [f"c{k}" for k in range(300)]}), "2 to 256"),
        ("preprocess.json", '{"channel": NaN}', r"preprocess\.json: missing key preprocess\."),
        ("convert.json", "x" * (2 << 20), r"convert\.json: larger than 1 MiB"),
    ],
)
def test_records_loaded_with_a_bundle_are_checked_naming_the_file(
    made: Path, tmp_path: Path, name: str, text: str, message: str
):
    folder = _copy(made, tmp_path)
    (folder / name).write_text(text)
    with pytest.raises(MedsegError, match=message):
        load_bundle(folder, "cpu")


def test_post_processing_travels_in_the_best_weights_metadata(tmp_path: Path):
    steps = {1: [{"op": "keep_largest"}, {"op": "drop_small", "min_size": 9}]}
    folder = make_bundle(tmp_path / "m", SPEC, threshold=0.4, postprocess=steps)
    bundle = load_bundle(folder, "cpu")
    assert bundle.postprocess == steps and bundle.threshold == 0.4
    assert load_bundle(folder / "last.safetensors", "cpu").postprocess == {}  # the best epoch's
    assert load_bundle(make_bundle(tmp_path / "n", SPEC), "cpu").postprocess == {}
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=3)
    per_class = {2: [{"op": "fill_holes"}], 1: []}  # a class where nothing helped: not recorded
    names = ["background", "disc", "cup"]
    three = make_bundle(tmp_path / "3", spec, names=names, postprocess=per_class)
    assert load_bundle(three, "cpu").postprocess == {2: [{"op": "fill_holes"}]}


def _rewrite_metadata(made: Path, tmp_path: Path, meta: dict[str, str] | None) -> Path:
    """A copy of the bundle whose best weights hold ``meta`` as their metadata."""
    from safetensors.torch import save_file

    folder = _copy(made, tmp_path)
    weights = folder / "model.safetensors"
    tensors = read_weights(weights)
    weights.unlink()
    save_file(tensors, str(weights), metadata=meta)
    return weights


def test_a_bundle_older_than_post_processing_has_none(made: Path, tmp_path: Path):
    weights = _rewrite_metadata(made, tmp_path, {THRESHOLD: "0.3"})
    bundle = load_bundle(weights, "cpu")
    assert bundle.postprocess == {} and bundle.threshold == 0.3


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("keep_largest", r"medseg\.postprocess in its metadata is not JSON"),
        ("[]", "must be an object of class labels -> lists of operations, got list"),
        ('{"2": [{"op": "keep_largest"}]}', r"for class '2'; the model's classes are 1$"),
        ('{"1": [{"op": "erode"}]}', r"unknown post-processing 'erode'; known: keep_largest"),
        ('{"1": [{"op": "drop_small"}]}', r"drop_small needs min_size, an integer >= 1"),
    ],
)
def test_malformed_post_processing_metadata_is_refused_naming_the_file(
    made: Path, tmp_path: Path, text: str, message: str
):
    weights = _rewrite_metadata(made, tmp_path, {POSTPROCESS: text})
    with pytest.raises(MedsegError, match=message) as info:
        load_bundle(weights.parent, "cpu")
    assert str(info.value).startswith(f"{weights}: {POSTPROCESS} in its metadata")


def test_weights_files_are_the_same_bytes_in_every_process():
    """safetensors orders its metadata by a per-process hash map; the bundle's weights must not
    change bytes (and so their DVC hash) from one training process to the next."""
    import subprocess
    import sys

    code = (
        "import hashlib, torch; from medseg.inference.bundle import safetensors_bytes; "
        "m = {'medseg.threshold': '0.5', 'medseg.postprocess': '{}', 'other': 'x'}; "
        "print(hashlib.sha256(safetensors_bytes({'w': torch.ones(2)}, m)).hexdigest())"
    )
    digests = {
        subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, check=True
        ).stdout
        for _ in range(6)
    }
    assert len(digests) == 1
