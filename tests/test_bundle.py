from __future__ import annotations

import json
import re
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import make_bundle

from medseg.config.sections import ConvertConfig, PreprocessConfig
from medseg.errors import MedsegError
from medseg.inference.bundle import (
    POSTPROCESS,
    THRESHOLD,
    _weights_metadata,
    load_bundle,
    read_weights,
)
from medseg.inference.predictor import Predictor
from medseg.inference.window import WindowSettings
from medseg.model import build_model
from medseg.names import BUNDLE_FORMAT, BUNDLE_FORMAT_KEY
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


# --- the format version: a model from last month still loads --------------------------------

FIXTURE = Path(__file__).parent / "fixtures" / "bundle_1_0"
CURRENT = ".".join(map(str, BUNDLE_FORMAT))  # "1.1"


@pytest.fixture
def old_bundle(tmp_path: Path) -> Path:
    """The bundle medseg wrote at 5d880d7, before the format version (fixtures/bundle_1_0)."""
    with tarfile.open(FIXTURE / "old_bundle.tar.xz") as tar:
        tar.extractall(tmp_path, filter="data")
    return tmp_path / "old_bundle"


def test_a_bundle_of_format_1_0_loads_and_predicts_as_when_it_was_written(old_bundle: Path):
    assert BUNDLE_FORMAT_KEY not in _weights_metadata(old_bundle / "model.safetensors")
    bundle = load_bundle(old_bundle, "cpu")
    assert bundle.classes == ["background", "vessel"] and bundle.threshold == 0.4
    assert bundle.postprocess == {1: [{"op": "drop_small", "min_size": 4}]}
    assert bundle.preprocess.contrast == "clahe" and bundle.convert is not None
    settings = WindowSettings(window=32, overlap=0.25, batch_size=2)
    predictor = Predictor.from_bundles([bundle], settings, "auto")
    image, fov = np.load(FIXTURE / "image.npy"), np.load(FIXTURE / "fov.npy")
    labels, probs = predictor.predict(image, fov)
    np.testing.assert_allclose(probs, np.load(FIXTURE / "probabilities.npy"), rtol=0, atol=1e-6)
    assert np.array_equal(labels, np.load(FIXTURE / "labels.npy"))


def test_keys_added_to_a_record_later_take_their_default_where_absent(old_bundle: Path):
    for name, keys in (
        ("preprocess.json", ["contrast", "clahe_clip", "clahe_tiles", "max_side"]),
        ("convert.json", ["max_bit_depth", "multiframe", "fov_erode", "on_error", "workers"]),
    ):
        raw = json.loads((old_bundle / name).read_text())
        for key in keys:
            del raw[key]
        (old_bundle / name).write_text(json.dumps(raw))
    bundle = load_bundle(old_bundle, "cpu")
    assert bundle.preprocess == PreprocessConfig(channel="green", val_fraction=0.2, seed=0)
    assert bundle.convert == ConvertConfig(
        window_center=None, window_width=None, fov_fallback="threshold"
    )
    assert bundle.preprocess.contrast == "none" and bundle.convert.workers == 0


def test_a_key_without_a_default_is_still_required_in_a_record(old_bundle: Path):
    raw = json.loads((old_bundle / "preprocess.json").read_text())
    del raw["channel"]
    (old_bundle / "preprocess.json").write_text(json.dumps(raw))
    with pytest.raises(MedsegError, match=r"preprocess\.json: missing key preprocess\.channel$"):
        load_bundle(old_bundle, "cpu")


def test_a_new_bundle_records_its_format(made: Path):
    for name in ("model.safetensors", "last.safetensors"):
        assert _weights_metadata(made / name)[BUNDLE_FORMAT_KEY] == CURRENT


def test_a_bundle_of_a_newer_major_format_is_refused_in_one_line(made: Path, tmp_path: Path):
    newer = f"{BUNDLE_FORMAT[0] + 1}.0"
    weights = _rewrite_metadata(made, tmp_path, {BUNDLE_FORMAT_KEY: newer})
    with pytest.raises(MedsegError) as info:
        load_bundle(weights.parent, "cpu")
    assert str(info.value) == (
        f"{weights}: a model bundle of format {newer}, newer than this medseg reads "
        f"({CURRENT}); upgrade medseg to load it"
    )


def test_a_newer_minor_format_loads_and_its_unknown_keys_say_why(made: Path, tmp_path: Path):
    newer = f"{BUNDLE_FORMAT[0]}.{BUNDLE_FORMAT[1] + 1}"
    weights = _rewrite_metadata(made, tmp_path, {BUNDLE_FORMAT_KEY: newer})
    assert load_bundle(weights.parent, "cpu").spec == SPEC
    record = weights.parent / "preprocess.json"
    record.write_text(json.dumps({**json.loads(record.read_text()), "denoise": True}))
    with pytest.raises(MedsegError, match=rf"unknown key preprocess\.denoise.*format {newer}"):
        load_bundle(weights.parent, "cpu")


@pytest.mark.parametrize("text", ["1", "one.two", "1.1.1", "9" * 100])
def test_a_malformed_format_is_refused_naming_the_file(made: Path, tmp_path: Path, text: str):
    weights = _rewrite_metadata(made, tmp_path, {BUNDLE_FORMAT_KEY: text})
    with pytest.raises(MedsegError, match=rf"^{re.escape(str(weights))}: {BUNDLE_FORMAT_KEY}"):
        load_bundle(weights.parent, "cpu")
