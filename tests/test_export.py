"""`medseg export --format onnx` and `medseg predict --model x.onnx`: real exports of small
random-weight bundles, run by the real onnxruntime."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO, make_bundle

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")

from medseg.cli import main  # noqa: E402
from medseg.config.sections import ConvertConfig  # noqa: E402
from medseg.errors import MedsegError  # noqa: E402
from medseg.inference import export  # noqa: E402
from medseg.inference.bundle import Bundle, load_bundle  # noqa: E402
from medseg.inference.onnx_model import METADATA  # noqa: E402
from medseg.inference.runners import TorchRunner  # noqa: E402
from medseg.inference.window import pad_to_multiple  # noqa: E402
from medseg.io.images import read_raster, write_png  # noqa: E402
from medseg.names import BUNDLE_FORMAT, BUNDLE_FORMAT_KEY, CONVERT_RECORD  # noqa: E402
from medseg.spec import ModelSpec  # noqa: E402

DRIVE_SIZE = (584, 565)  # height, width


def _cli(*args: str | Path) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    return int(exit_info.value.code or 0)


THREE_STEPS = {2: [{"op": "drop_small", "min_size": 3}]}  # the post-processing of the 3 classes


def _bundle(folder: Path, classes: int, seed: int = 1) -> Path:
    """A random-weight bundle: binary green-channel with a validation threshold of 0.37, or
    ``classes`` classes from RGB with post-processing (`THREE_STEPS`), with a convert record
    that sets a DICOM window."""
    channels = 1 if classes == 1 else 3
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], channels, classes)
    names = None if classes == 1 else ["background", *(f"c{k}" for k in range(1, classes))]
    make_bundle(
        folder,
        spec,
        "green" if classes == 1 else "rgb",
        names,
        seed,
        0.37 if classes == 1 else None,
        None if classes == 1 else THREE_STEPS,
    )
    convert = ConvertConfig(window_center=40.0, window_width=400.0)
    (folder / CONVERT_RECORD).write_text(json.dumps(dataclasses.asdict(convert)))
    return folder


def _export(base: Path, classes: int) -> tuple[Path, Path, Bundle, Bundle]:
    """A bundle, its export made by `medseg export`, and both loaded."""
    folder = _bundle(base / "models", classes)
    out = base / "deploy" / "model.onnx"
    assert _cli("export", "--model", folder, "--format", "onnx", "--out", out) == 0
    return folder, out, load_bundle(folder, "cpu"), load_bundle(out, "cpu")


# loading and running a network is the cost here: each export is made and loaded once
@pytest.fixture(scope="module")
def binary(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Bundle, Bundle]:
    return _export(tmp_path_factory.mktemp("binary"), 1)


@pytest.fixture(scope="module")
def three(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Bundle, Bundle]:
    return _export(tmp_path_factory.mktemp("three"), 3)


@pytest.fixture(params=["binary", "three"])
def exported(request: pytest.FixtureRequest) -> tuple[Path, Path, Bundle, Bundle]:
    """Both exports in turn."""
    return request.getfixturevalue(request.param)


def test_export_carries_the_records_and_matches_torch_on_a_drive_image(exported):
    folder, path, bundle, deployed = exported
    meta = {p.key: p.value for p in onnx.load(str(path), load_external_data=False).metadata_props}
    assert set(METADATA) <= set(meta)
    assert json.loads(meta["medseg.spec"]) == json.loads((folder / "model.json").read_text())
    assert json.loads(meta["medseg.convert"])["window_width"] == 400.0
    for record in ("spec", "preprocess", "classes", "convert", "threshold", "postprocess"):
        assert getattr(deployed, record) == getattr(bundle, record)
    assert bundle.threshold == (0.37 if bundle.spec.classes == 1 else None)
    assert bundle.postprocess == ({} if bundle.spec.classes == 1 else THREE_STEPS)
    assert deployed.model.divisor == 32 and deployed.device == "cpu"
    image = np.random.default_rng(7).normal(size=(bundle.spec.in_channels, *DRIVE_SIZE))
    x = pad_to_multiple(image.astype(np.float32), 32)[None]
    assert x.shape[2:] == (608, 576)
    want = TorchRunner(bundle.model).probabilities(x)
    got = deployed.model.probabilities(x)
    assert got.shape == want.shape == (1, bundle.spec.classes, 608, 576)
    assert np.abs(got - want).max() < 1e-4
    if bundle.spec.classes > 1:
        assert np.allclose(got.sum(axis=1), 1.0, atol=1e-5)


def test_batch_height_and_width_are_dynamic(exported):
    _, _, bundle, deployed = exported
    c = bundle.spec.in_channels
    rng = np.random.default_rng(8)
    for shape in ((1, c, 64, 96), (3, c, 160, 32)):
        x = rng.normal(size=shape).astype(np.float32)
        got = deployed.model.probabilities(x)
        assert got.shape == (shape[0], bundle.spec.classes, *shape[2:])
        assert np.abs(got - TorchRunner(bundle.model).probabilities(x)).max() < 1e-4


def _masks_agree(a: np.ndarray, b: np.ndarray, probs: np.ndarray, classes: int) -> None:
    """Equal masks, except where the decision is a tie within 1e-4 (float noise decides it)."""
    if classes == 1:
        tie = np.abs(probs - 0.5) < 1e-4
    else:
        top2 = np.sort(probs, axis=0)[-2:]
        tie = top2[1] - top2[0] < 1e-4
    assert np.array_equal(a[~tie], b[~tie]) and tie.mean() < 0.01


def test_predict_with_the_onnx_file_gives_the_bundles_masks(exported, tmp_path: Path):
    folder, path, _, deployed = exported
    png = tmp_path / "in" / "fundus.png"
    png.parent.mkdir()
    write_png(png, np.random.default_rng(0).integers(0, 256, (70, 90, 3), dtype=np.uint8))
    outs = {}
    for name, model in (("torch", folder), ("onnx", path)):
        outs[name] = tmp_path / name
        args = ("--window", "64", "--overlap", "0.5", "--tta", "--probabilities")
        assert _cli("predict", "--model", model, "--out", outs[name], png, *args) == 0
    classes = deployed.spec.classes
    probs_dir = outs["torch"] / "probabilities"
    names = ["fundus.png"] if classes == 1 else [f"fundus_class{k}.png" for k in (1, 2)]
    for name in names:
        a, b = (read_raster(o / "probabilities" / name).astype(int) for o in outs.values())
        assert np.abs(a - b).max() <= 1  # 16-bit PNGs: one step is 1.5e-5
    probs = np.stack([read_raster(probs_dir / n) / 65535.0 for n in names])
    if classes > 1:
        probs = np.concatenate([1.0 - probs.sum(axis=0, keepdims=True), probs])
    masks = [read_raster(o / "fundus.png") for o in outs.values()]
    _masks_agree(masks[0], masks[1], probs[0] if classes == 1 else probs, classes)


# Blocks `import torch` for everything imported after it: the process fails if predict needs torch
_NO_TORCH = """
import sys

class NoTorch:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("torch", "torchvision", "segmentation_models_pytorch"):
            raise ImportError(f"{name} is blocked: the ONNX path must not import it")

sys.meta_path.insert(0, NoTorch())
from medseg.errors import run_cli
from medseg.cli import _main
code = run_cli(_main, sys.argv[1:])
assert "torch" not in sys.modules
sys.exit(code)
"""


def test_predict_with_onnx_runs_without_torch(binary, tmp_path: Path):
    folder, path, _, _ = binary
    png = tmp_path / "fundus.png"
    write_png(png, np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    args = ["predict", "--model", str(path), "--out", str(tmp_path / "out"), str(png)]
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TORCH, *args, "--tta", "--window", "32"],
        capture_output=True, text=True, env=env, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert read_raster(tmp_path / "out" / "fundus.png").shape == (40, 50)
    # the same block is felt: a torch bundle cannot be loaded under it
    args[2] = str(folder)
    proc = subprocess.run([sys.executable, "-c", _NO_TORCH, *args], capture_output=True, env=env)
    assert proc.returncode != 0 and b"is blocked" in proc.stderr


def _with_metadata(path: Path, out: Path, key: str, value: str | None) -> Path:
    """A copy of the export ``path`` whose metadata ``key`` is ``value`` (None: without it)."""
    proto = onnx.load(str(path))
    kept = [p for p in proto.metadata_props if p.key != key]
    del proto.metadata_props[:]
    proto.metadata_props.extend(kept)
    if value is not None:
        proto.metadata_props.add(key=key, value=value)
    onnx.save(proto, out)
    return out


def test_an_export_older_than_post_processing_has_none(three, tmp_path: Path):
    old = _with_metadata(three[1], tmp_path / "old.onnx", "medseg.postprocess", None)
    assert load_bundle(old, "cpu").postprocess == {} and three[3].postprocess == THREE_STEPS


def test_an_export_carries_the_bundle_format_and_a_newer_major_is_refused(three, tmp_path):
    proto = onnx.load(str(three[1]), load_external_data=False)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta[BUNDLE_FORMAT_KEY] == ".".join(map(str, BUNDLE_FORMAT))
    older = _with_metadata(three[1], tmp_path / "older.onnx", BUNDLE_FORMAT_KEY, None)
    assert load_bundle(older, "cpu").postprocess == THREE_STEPS  # 1.0: before the key
    newer = _with_metadata(three[1], tmp_path / "newer.onnx", BUNDLE_FORMAT_KEY, "99.0")
    with pytest.raises(MedsegError, match=r"newer\.onnx: a model bundle of format 99\.0, newer"):
        load_bundle(newer, "cpu")


def test_a_corrupt_or_foreign_onnx_file_is_one_line_naming_it(binary, tmp_path, capsys):
    path = binary[1]
    png = tmp_path / "in.png"
    write_png(png, np.zeros((40, 40), np.uint8))
    truncated = tmp_path / "truncated.onnx"
    truncated.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    graph = onnx.helper.make_graph(
        [onnx.helper.make_node("Sigmoid", ["image"], ["probabilities"])], "foreign",
        [onnx.helper.make_tensor_value_info("image", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
        [onnx.helper.make_tensor_value_info("probabilities", onnx.TensorProto.FLOAT, [1, 1, 8, 8])],
    )  # fmt: skip
    foreign = tmp_path / "foreign.onnx"
    onnx.save(
        onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 17)]), foreign
    )
    bad_threshold = _with_metadata(path, tmp_path / "threshold.onnx", "medseg.threshold", "1.5")
    bad_steps = _with_metadata(
        path, tmp_path / "steps.onnx", "medseg.postprocess", '{"1": [{"op": "erode"}]}'
    )
    for bad, message in (
        (bad_threshold, "medseg.threshold in its metadata is 1.5"),
        (
            bad_steps,
            "medseg.postprocess in its metadata: unknown post-processing 'erode'",
        ),
        (truncated, "not a readable ONNX model"),
        (foreign, "not one exported by this medseg"),
        (tmp_path / "absent.onnx", "is missing"),
    ):
        assert _cli("predict", "--model", bad, "--out", tmp_path / "out", png) == 2
        err = capsys.readouterr().err
        assert str(bad) in err and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "out").exists()


def test_export_refuses_bad_arguments_and_a_failing_check(binary, tmp_path, capsys, monkeypatch):
    folder, path, bundle, _ = binary
    assert _cli("export", "--model", folder, "--out", tmp_path / "model.pt") == 2
    assert "ends in .onnx" in capsys.readouterr().err
    assert _cli("export", "--model", path, "--out", tmp_path / "again.onnx") == 2
    assert "already an ONNX export" in capsys.readouterr().err
    # another model's weights under the same records: the check sees the difference
    other = _bundle(tmp_path / "other", bundle.spec.classes, seed=2)
    with pytest.raises(MedsegError, match="onnxruntime and torch disagree"):
        export.check_export(path, load_bundle(other, "cpu"), size=(64, 80))
    # nothing passes (at a small size, to be quick): nothing may be written
    monkeypatch.setattr(export, "TOLERANCE", 0.0)
    monkeypatch.setattr(export, "CHECK_SIZE", (64, 80))
    out = tmp_path / "refused" / "model.onnx"
    assert _cli("export", "--model", folder, "--out", out) == 2
    err = capsys.readouterr().err
    assert f"{out}: onnxruntime and torch disagree" in err and "not written" in err
    assert list(out.parent.iterdir()) == []
