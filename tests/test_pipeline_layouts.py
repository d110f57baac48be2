"""End to end: the `folders` and `manifest` layouts through the real `dvc repro` (tiny params)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import STAGES, ran, run, tiny_params, write_grey_dicom16, write_params
from PIL import Image

from medseg.config.keys import parse
from medseg.config.sections import SynthesizeConfig
from medseg.preprocess.processed import open_split
from medseg.synthetic import generate_case

N_CASES = 6


def _cases() -> list:
    cfg = parse(SynthesizeConfig, tiny_params()["synthesize"])
    return [generate_case(cfg, i) for i in range(N_CASES)]


def _grey16(rgb: np.ndarray) -> np.ndarray:
    return (rgb[..., 1].astype(np.uint16) * 257).astype(np.uint16)


def _folders_set(root: Path) -> None:
    """JPEG photographs and PNG masks, no FOV masks, no split: the plainest user data."""
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    for i, case in enumerate(_cases()):
        Image.fromarray(case.image).save(root / "images" / f"eye{i}.jpg", quality=95)
        Image.fromarray(case.vessels.astype(np.uint8) * 255).save(root / "masks" / f"eye{i}.png")


def _manifest_set(root: Path) -> None:
    """16-bit TIFF and DICOM images, GIF masks, some FOV masks, a split and ids, in a CSV."""
    (root / "scans").mkdir(parents=True)
    (root / "labels").mkdir()
    lines = ["image,mask,fov,split,case_id"]
    for i, case in enumerate(_cases()):
        image = _grey16(case.image)
        if i % 2:
            write_grey_dicom16(root / "scans" / f"s{i}.dcm", image)
            name = f"scans/s{i}.dcm"
        else:
            tifffile.imwrite(root / "scans" / f"s{i}.tif", image)
            name = f"scans/s{i}.tif"
        Image.fromarray(case.vessels.astype(np.uint8) * 255).save(root / "labels" / f"v{i}.gif")
        fov = ""
        if i < 3:
            Image.fromarray(case.fov.astype(np.uint8) * 255).save(root / "labels" / f"f{i}.gif")
            fov = f"labels/f{i}.gif"
        split = "test" if i >= 4 else "train"
        lines.append(f"{name},labels/v{i}.gif,{fov},{split},p{i:02d}")
    (root / "list.csv").write_text("\n".join(lines) + "\n")


def _params(proj: Path, root: Path, layout: str) -> None:
    params = tiny_params(
        data={"root": str(root), "layout": layout, "manifest": "list.csv", "test_fraction": 0.34},
        convert={"workers": 2},
    )
    write_params(proj / "params.yaml", params)


def _manifest(proj: Path) -> pd.DataFrame:
    return pd.read_csv(proj / "data" / "converted" / "manifest.csv", dtype={"case_id": str})


@pytest.mark.slow  # a fresh pipeline run; the colour test below runs the folders layout
def test_folders_layout_through_the_whole_pipeline(project: Path, tmp_path: Path):
    _folders_set(tmp_path / "data")
    _params(project, tmp_path / "data", "folders")
    assert ran(run(project, "dvc", "repro")) == list(STAGES)
    manifest = _manifest(project)
    assert len(manifest) == N_CASES
    assert set(manifest["fov_source"]) == {"threshold"}
    assert set(manifest["source_format"]) == {"jpeg"} and (manifest["channels"] == 3).all()
    metrics = json.loads((project / "results" / "evaluate" / "metrics.json").read_text())
    assert metrics["n_images"] == (manifest["split"] == "test").sum() == 2
    assert 0.0 <= metrics["test"]["fov"]["dice"] <= 1.0
    assert ran(run(project, "dvc", "repro")) == []


def test_manifest_layout_through_convert_and_preprocess(project: Path, tmp_path: Path):
    _manifest_set(tmp_path / "data")
    _params(project, tmp_path / "data", "manifest")
    assert ran(run(project, "dvc", "repro", "preprocess")) == ["convert", "plan", "preprocess"]
    manifest = _manifest(project)
    assert manifest["case_id"].tolist() == [f"p{i:02d}" for i in range(N_CASES)]
    assert manifest["fov_source"].tolist() == ["given"] * 3 + ["threshold"] * 3
    assert sorted(set(manifest["source_format"])) == ["dicom", "tiff"]
    assert (manifest["bit_depth"] == 16).all() and (manifest["channels"] == 1).all()
    test = open_split(project / "data" / "processed", "test")
    assert sorted(test.ids) == ["p04", "p05"]
    # a changed image reruns convert; the same data again does nothing
    assert ran(run(project, "dvc", "repro", "preprocess")) == []
    (tmp_path / "data" / "labels" / "v0.gif").unlink()
    proc = run(project, "dvc", "repro", "preprocess", check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stdout + proc.stderr
    assert "list.csv line 2, column mask: labels/v0.gif does not exist" in proc.stdout + proc.stderr


def test_colour_images_of_mixed_sizes_through_the_whole_pipeline(project: Path, tmp_path: Path):
    """Dermoscopy-like data: RGB photographs of six sizes, a lesion darker in every channel,
    three channels to the network, the larger cases scaled down (preprocess.max_side) and
    scored at their own size."""
    root = tmp_path / "data"
    for sub in ("images", "masks"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    sizes = [(48, 80), (100, 60), (72, 72), (130, 90), (64, 40), (90, 120)]
    for i, (h, w) in enumerate(sizes):
        yy, xx = np.ogrid[:h, :w]
        lesion = (yy - h / 2) ** 2 / (h / 4) ** 2 + (xx - w / 2) ** 2 / (w / 5) ** 2 < 1
        skin = np.array([200, 150, 130]) + rng.normal(0, 8, (h, w, 3))
        skin[lesion] = np.array([110, 60, 50]) + rng.normal(0, 8, (int(lesion.sum()), 3))
        Image.fromarray(np.clip(skin, 0, 255).astype(np.uint8)).save(root / "images" / f"{i}.png")
        Image.fromarray(lesion.astype(np.uint8) * 255).save(root / "masks" / f"{i}.png")
    params = tiny_params(
        data={"root": str(root), "layout": "folders", "test_fraction": 0.34},
        convert={"fov_fallback": "whole_image"},
        preprocess={"channel": "rgb", "max_side": 96},
    )
    write_params(project / "params.yaml", params)
    assert ran(run(project, "dvc", "repro")) == list(STAGES)
    spec = json.loads((project / "models" / "model.json").read_text())
    assert spec["in_channels"] == 3
    manifest = _manifest(project)
    test = manifest[manifest["split"] == "test"]
    overlays = project / "results" / "evaluate" / "overlays"
    for row in test.itertuples():
        with Image.open(overlays / f"{row.case_id}.png") as im:  # at the ground truth's size
            assert im.size == (row.width, row.height)
    stats = json.loads((project / "data" / "processed" / "stats.json").read_text())
    assert sum(stats[s]["resized"] for s in ("train", "val", "test")) == 3  # sides over 96
    table = pd.read_csv(project / "results" / "evaluate" / "per_image.csv", dtype={"case_id": str})
    assert sorted(table["case_id"]) == sorted(test["case_id"])
    # a trained bundle segments a new photograph at its own size
    new = tmp_path / "new.png"
    Image.fromarray(rng.integers(0, 255, (150, 110, 3), dtype=np.uint8)).save(new)
    run(project, "medseg", "predict", "--model", "models", "--out", "pred", str(new))
    with Image.open(project / "pred" / "new.png") as im:
        assert im.size == (110, 150)
