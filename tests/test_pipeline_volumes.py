"""End to end: NIfTI volumes in the nnunet layout through the real `dvc repro` (tiny params):
converted once, cut into slices, scored per volume in 3D in mm; `medseg predict` writes NIfTI
label maps on the input's grid."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pandas as pd
from conftest import STAGES, ran, run, tiny_params, write_params

from medseg.preprocess.processed import open_split

# voxel axes (i, j, k): 24 x 20 in plane at 0.9 mm, 8 slices of 2.5 mm
SHAPE = (24, 20, 8)
AFFINE = np.diag([-0.9, 0.9, 2.5, 1.0])
AFFINE[:3, 3] = [30.0, -12.0, 40.0]


def _volume(rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like volume (int16, HU) with a bright ellipsoid (label 1), a dark blob (label 2) and
    air and bone outliers that the CT normalisation clips."""
    i, j, k = np.meshgrid(*(np.arange(n) for n in SHAPE), indexing="ij")
    ci, cj, ck = rng.uniform(8, 16), rng.uniform(7, 13), rng.uniform(3, 5)
    organ = ((i - ci) / 6) ** 2 + ((j - cj) / 5) ** 2 + ((k - ck) / 2.5) ** 2 < 1
    blob = ((i - ci - 3) / 2) ** 2 + ((j - cj) / 2) ** 2 + ((k - ck) / 1.2) ** 2 < 1
    labels = np.where(blob, 2, np.where(organ, 1, 0)).astype(np.uint8)
    image = 40 + 120 * organ - 80 * blob + rng.normal(0, 15, SHAPE)
    image[:, :, 0] = -1000.0  # slice 0 (k = 0): air
    image[:3, :, -1] = 1500.0  # bone on the last slice
    return image.astype(np.int16), labels


def _nnunet_volumes(root: Path) -> None:
    rng = np.random.default_rng(0)
    desc = {
        "channel_names": {"0": "CT"},
        "labels": {"background": 0, "organ": 1, "lesion": 2},
        "file_ending": ".nii.gz",
        "training": [],
    }
    for images, labels, ids in (
        ("imagesTr", "labelsTr", range(6)),
        ("imagesTs", "labelsTs", (6, 7)),
    ):
        (root / images).mkdir(parents=True)
        (root / labels).mkdir()
        for n in ids:
            image, label = _volume(rng)
            nib.save(nib.Nifti1Image(image, AFFINE), root / images / f"vol_{n:03d}_0000.nii.gz")
            nib.save(nib.Nifti1Image(label, AFFINE), root / labels / f"vol_{n:03d}.nii.gz")
            if images == "imagesTr":
                desc["training"].append(
                    {
                        "image": f"./imagesTr/vol_{n:03d}.nii.gz",
                        "label": f"./labelsTr/vol_{n:03d}.nii.gz",
                    }
                )
    (root / "dataset.json").write_text(json.dumps(desc))


def test_nifti_volumes_through_the_whole_pipeline(project: Path, tmp_path: Path):
    root = tmp_path / "data"
    _nnunet_volumes(root)
    params = tiny_params(
        data={"root": str(root), "layout": "nnunet"},
        convert={"fov_fallback": "whole_image"},
        preprocess={"channel": "gray", "val_fraction": 0.2},
        train={"epochs": 2},  # train.classes 1: the three of dataset.json
        evaluate={"threshold": "auto", "boundary_unit": "mm"},
    )
    write_params(project / "params.yaml", params)
    assert ran(run(project, "dvc", "repro")) == list(STAGES)
    converted = project / "data" / "converted"
    manifest = pd.read_csv(converted / "manifest.csv", dtype={"case_id": str})
    # one row per volume, written once as arrays (no PNG per slice), one group each
    assert manifest["case_id"].tolist() == [f"vol_{n:03d}" for n in range(8)]
    assert manifest["group"].is_unique
    assert (manifest["depth"] == 8).all() and (manifest["spacing_slice"] == 2.5).all()
    assert manifest["height"].eq(20).all() and manifest["width"].eq(24).all()  # rows j, cols i
    assert json.loads(manifest["affine"][0]) == AFFINE.tolist()
    assert not any((converted / "images").glob("*"))
    assert len(list((converted / "volumes").glob("*.npy"))) == 8
    names = json.loads((converted / "classes.json").read_text())["names"]
    assert names == ["background", "organ", "lesion"]  # from dataset.json
    # CT: clipped to the training foreground's 0.5 / 99.5 percentiles, its mean and std
    intensity = json.loads((project / "data" / "processed" / "intensity.json").read_text())
    (lo, hi), mean = intensity["clip"][0], intensity["mean"][0]
    assert -100 < lo < mean < hi < 250 and intensity["std"][0] > 0
    assert json.loads((project / "models" / "intensity.json").read_text()) == intensity
    # each slice is a case of the store, its volume and depth kept
    test = open_split(project / "data" / "processed", "test")
    assert len(test) == 2 * 8
    air = test.get(0, "image")  # slice z = 0 is air: clipped to the low end
    assert np.allclose(air, (lo - mean) / intensity["std"][0], atol=1e-5)
    meta = test.meta(3)
    assert (meta["volume"], meta["z"], meta["spacing"], meta["slice_spacing"]) == (
        "vol_006", 3, [0.9, 0.9], 2.5,
    )  # fmt: skip
    # scored per volume: one row per volume and class, boundaries in mm in 3D
    table = pd.read_csv(project / "results" / "evaluate" / "per_image.csv", dtype={"case_id": str})
    assert sorted(table["case_id"].unique()) == ["vol_006", "vol_007"]
    assert len(table) == 2 * 2 and set(table["class"]) == {"organ", "lesion"}
    metrics = json.loads((project / "results" / "evaluate" / "metrics.json").read_text())
    assert metrics["n_images"] == 2 and metrics["boundary_unit"] == "mm"
    overlays = project / "results" / "evaluate" / "overlays"
    assert sorted(p.name for p in overlays.iterdir()) == ["vol_006.png", "vol_007.png"]

    # a NIfTI in, a NIfTI label map out, on the input's grid
    source = root / "imagesTs" / "vol_006_0000.nii.gz"
    run(project, "medseg", "predict", "--model", "models", "--out", "pred", str(source))
    out = nib.load(project / "pred" / "vol_006_0000.nii.gz")
    assert out.shape == SHAPE and out.get_data_dtype() == np.uint8
    np.testing.assert_allclose(out.affine, nib.load(source).affine)
    assert set(np.unique(np.asarray(out.dataobj)).tolist()) <= {0, 1, 2}
