from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
from conftest import make_bundle
from PIL import Image
from pydicom.data import get_testdata_file

from medseg.cli import main
from medseg.config.sections import ConvertConfig, PreprocessConfig
from medseg.convert.fov import fov_from_image
from medseg.inference.bundle import load_bundle
from medseg.inference.predict import collect_inputs, find_fov, read_input
from medseg.io.images import read_raster, write_png
from medseg.io.limits import ReadOptions
from medseg.io.reader import read
from medseg.names import CONVERT_RECORD
from medseg.preprocess.processed import RECORD, save_record
from medseg.spec import ModelSpec

CT_SMALL = get_testdata_file("CT_small.dcm")  # 128x128, 16-bit CT, ships with pydicom


def _model(
    folder: Path, classes: int = 1, in_channels: int = 1, record: bool = True,
    channel: str = "green",
) -> Path:  # fmt: skip
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels, classes)
    names = ["background", *(f"class{k}" for k in range(1, classes))] if classes > 1 else None
    make_bundle(folder, spec, channel=channel, names=names)
    if not record:
        (folder / RECORD).unlink()
    return folder / "model.safetensors"


def _run(*args: str | Path) -> int:
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", *map(str, args)])
    return int(exit_info.value.code or 0)


@pytest.fixture
def png(tmp_path: Path) -> Path:
    rng = np.random.default_rng(0)
    path = tmp_path / "in" / "fundus.png"
    path.parent.mkdir()
    write_png(path, rng.integers(0, 256, size=(70, 90, 3), dtype=np.uint8))
    return path


def test_predict_dicom_and_png_end_to_end(tmp_path: Path, png: Path, capsys):
    assert CT_SMALL is not None
    model = _model(tmp_path / "models")
    out = tmp_path / "out"
    code = _run("--model", model.parent, "--out", out, CT_SMALL, png, "--probabilities",
                "--window", "64", "--tta")  # fmt: skip
    assert code == 0, capsys.readouterr().err
    assert "wrote 2 mask(s)" in capsys.readouterr().out
    for stem, shape in (("CT_small", read(CT_SMALL)[0].shape), ("fundus", (70, 90))):
        mask = read_raster(out / f"{stem}.png")
        assert mask.shape == shape[:2] and mask.dtype == np.uint8
        assert set(np.unique(mask)) <= {0, 255}
        with Image.open(out / "probabilities" / f"{stem}.png") as im:
            assert im.mode.startswith("I;16") and im.size == (shape[1], shape[0])
        prob = read_raster(out / "probabilities" / f"{stem}.png").astype(np.float64) / 65535
        assert np.array_equal(mask == 255, prob >= 0.5 - 1e-4) or np.abs(prob - 0.5).min() < 1e-4
    assert not list(tmp_path.glob(".out.tmp-*"))


def test_predict_fov_folder_blanks_outside(tmp_path: Path, png: Path):
    model = _model(tmp_path / "models")
    fov_dir = tmp_path / "fov"
    fov_dir.mkdir()
    fov = np.zeros((70, 90), bool)
    fov[10:60, 10:80] = True
    write_png(fov_dir / "fundus_mask.png", fov)
    out = tmp_path / "out"
    assert _run("--model", model, "--out", out, png, "--fov", fov_dir, "--threshold", "0.0") == 0
    assert np.array_equal(read_raster(out / "fundus.png") == 255, fov)


def test_predict_multiclass_writes_labels(tmp_path: Path, png: Path):
    model = _model(tmp_path / "models", classes=3)
    out = tmp_path / "out"
    assert _run("--model", model, "--out", out, png, "--probabilities") == 0
    assert read_raster(out / "fundus.png").max() <= 2
    assert sorted(p.name for p in (out / "probabilities").iterdir()) == [
        "fundus_class1.png", "fundus_class2.png",
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        ("in_channels", "takes 3 input channel(s)"),
        ("malformed_spec", "malformed model spec"),
        ("classes", "weights do not fit"),
        ("no_record", "preprocess.json: missing"),
        ("bad_record", "unknown key preprocess.colour"),
    ],
)
def test_predict_refuses_mismatched_models(tmp_path: Path, png: Path, capsys, setup, message):
    model = _model(tmp_path / "models", in_channels=3 if setup == "in_channels" else 1,
                   record=setup != "no_record")  # fmt: skip
    spec_path = model.with_suffix(".json")
    if setup == "classes":  # a spec that does not belong to these weights
        spec = json.loads(spec_path.read_text())
        spec_path.write_text(json.dumps({**spec, "classes": 2}))
    if setup == "malformed_spec":  # nothing is built or allocated from a spec like this
        spec = json.loads(spec_path.read_text())
        spec_path.write_text(json.dumps({**spec, "decoder_channels": [10**12] * 5}))
    if setup == "bad_record":
        record = model.parent / RECORD
        record.write_text(json.dumps({**json.loads(record.read_text()), "colour": "red"}))
    out = tmp_path / "out"
    assert _run("--model", model, "--out", out, png) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not out.exists()


def test_predict_bad_inputs_write_nothing(tmp_path: Path, png: Path, capsys):
    model = _model(tmp_path / "models")
    broken = png.parent / "zz_broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really")
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("the user's")
    assert _run("--model", model, "--out", out, png.parent) == 2
    assert "zz_broken.png" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]  # fundus.png not written
    assert _run("--model", model, "--out", out, tmp_path / "nothing.png") == 2
    assert "no such file" in capsys.readouterr().err
    (tmp_path / "notes.txt").write_text("x")
    assert _run("--model", model, "--out", out, tmp_path / "notes.txt") == 2
    assert "unsupported file type .txt" in capsys.readouterr().err
    assert _run("--model", model, "--out", out, png, "--overlap", "1.5") == 2
    assert "--overlap must be in [0, 1)" in capsys.readouterr().err


def test_predict_never_overwrites_an_input(tmp_path: Path, png: Path, capsys):
    model = _model(tmp_path / "models")
    before = png.read_bytes()
    assert _run("--model", model, "--out", png.parent, png) == 2
    assert "would overwrite the input" in capsys.readouterr().err
    assert png.read_bytes() == before


def test_collect_inputs_and_fov_matching(tmp_path: Path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    for folder in (a, b):
        write_png(folder / "01.png", np.zeros((4, 4), np.uint8))
    (a / ".hidden.png").write_bytes(b"")
    (a / "readme.txt").write_text("")
    assert collect_inputs([a]) == [(a / "01.png").resolve()]
    assert collect_inputs([a / "01.png", a]) == [(a / "01.png").resolve()]  # once
    with pytest.raises(Exception, match="share the name '01'"):
        collect_inputs([a, b])
    (tmp_path / "empty").mkdir()
    with pytest.raises(Exception, match="no images in this folder"):
        collect_inputs([tmp_path / "empty"])
    write_png(b / "01_mask.png", np.ones((4, 4), np.uint8))
    write_png(b / "011_mask.png", np.ones((4, 4), np.uint8))
    assert find_fov(b, a / "01.png", 2) == b / "01.png"  # exact stem first
    (b / "01.png").unlink()
    assert find_fov(b, a / "01.png", 2) == b / "01_mask.png"  # not 011_mask
    with pytest.raises(Exception, match="no mask"):
        find_fov(b, a / "02.png", 2)


def _convert_record(folder: Path, **changes: object) -> None:
    cfg = dataclasses.replace(ConvertConfig(None, None), **changes)  # type: ignore[arg-type]
    (folder / CONVERT_RECORD).write_text(json.dumps(dataclasses.asdict(cfg)))


def _disc_photo(path: Path) -> np.ndarray:
    """A fundus-like photograph: a bright textured disc on a black border."""
    rng = np.random.default_rng(3)
    yy, xx = np.mgrid[:80, :96]
    disc = (yy - 40) ** 2 + (xx - 48) ** 2 < 35**2
    image = np.zeros((80, 96, 3), np.uint8)
    image[disc] = rng.integers(90, 200, size=(int(disc.sum()), 3), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_png(path, image)
    return image


def test_without_fov_masks_predict_makes_the_fov_as_convert_did(tmp_path: Path):
    model = _model(tmp_path / "models")
    _convert_record(model.parent, fov_fallback="threshold", fov_threshold=0.1, fov_erode=1)
    image = _disc_photo(tmp_path / "in" / "eye.png")
    fov = fov_from_image(image, 0.1, 1)
    assert 0 < fov.sum() < fov.size
    write_png(tmp_path / "eye_fov.png", fov)
    made, given = tmp_path / "made", tmp_path / "given"
    assert _run("--model", model, "--out", made, tmp_path / "in", "--probabilities") == 0
    assert _run("--model", model, "--out", given, tmp_path / "in", "--probabilities",
                "--fov", tmp_path / "eye_fov.png") == 0  # fmt: skip
    p_made = read_raster(made / "probabilities" / "eye.png")
    assert np.array_equal(p_made, read_raster(given / "probabilities" / "eye.png"))
    assert not p_made[~fov].any()  # nothing outside the disc
    # a model whose convert stage counted images whole does the same
    _convert_record(model.parent, fov_fallback="whole_image")
    whole = tmp_path / "whole"
    assert _run("--model", model, "--out", whole, tmp_path / "in", "--probabilities") == 0
    assert read_raster(whole / "probabilities" / "eye.png")[~fov].any()


def test_predict_reads_dicom_with_the_models_window_override(tmp_path: Path):
    assert CT_SMALL is not None
    model = _model(tmp_path / "models")
    _convert_record(model.parent, window_center=40.0, window_width=400.0)  # a CT soft-tissue window
    bundle = load_bundle(model)
    assert np.array_equal(
        read_input(bundle, Path(CT_SMALL)), read(CT_SMALL, ReadOptions(window=(40.0, 400.0)))[0]
    )
    assert not np.array_equal(
        read(CT_SMALL, ReadOptions(window=(40.0, 400.0)))[0], read(CT_SMALL)[0]
    )


def test_a_broken_convert_record_is_refused_naming_it(tmp_path: Path, png: Path, capsys):
    model = _model(tmp_path / "models")
    (model.parent / CONVERT_RECORD).write_text('{"window_center": null}')
    assert _run("--model", model, "--out", tmp_path / "out", png) == 2
    assert "convert.json: missing key convert.window_width" in capsys.readouterr().err


def test_predict_colour_and_resized_models_answer_at_the_input_size(tmp_path: Path, png: Path):
    """An rgb model takes all three channels; a model trained with preprocess.max_side
    predicts at its own scale and answers at the input's size."""
    model = _model(tmp_path / "models", in_channels=3, channel="rgb")
    record = model.parent / RECORD
    save_record(PreprocessConfig("rgb", 0.2, 0, max_side=32), record)
    out = tmp_path / "out"
    assert _run("--model", model, "--out", out, png, "--probabilities") == 0
    assert read_raster(out / "fundus.png").shape == (70, 90)
    assert read_raster(out / "probabilities" / "fundus.png").shape == (70, 90)
    grey = tmp_path / "grey.png"
    write_png(grey, np.zeros((40, 40), np.uint8))
    assert _run("--model", model, "--out", tmp_path / "o2", grey) == 2


def test_predict_applies_the_bundles_post_processing(tmp_path: Path, png: Path):
    from scipy import ndimage

    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], 1, 1)
    raw = make_bundle(tmp_path / "raw", spec, seed=2)
    largest = make_bundle(
        tmp_path / "largest", spec, seed=2, postprocess={1: [{"op": "keep_largest"}]}
    )
    masks = {}
    for folder in (raw, largest):
        out = tmp_path / f"out-{folder.name}"
        assert _run("--model", folder, "--out", out, png, "--threshold", "0.5") == 0
        masks[folder.name] = read_raster(out / "fundus.png") > 0
    parts = {name: ndimage.label(m, np.ones((3, 3)))[1] for name, m in masks.items()}
    assert parts["raw"] > 1 and parts["largest"] == 1, parts
    assert (masks["largest"] <= masks["raw"]).all()
