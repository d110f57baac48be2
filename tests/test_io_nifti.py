"""NIfTI volumes: real files written by nibabel, read back in slice order with their spacing
and affine; bad headers refused before their voxels are decoded; label maps written back on
the input's grid."""

from __future__ import annotations

import gzip
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from medseg.errors import MedsegError
from medseg.io.limits import ReadOptions
from medseg.io.nifti import (
    check_same_grid,
    is_nifti,
    nifti_stem,
    read_nifti,
    slice_axes,
    write_nifti_labels,
)


def _save(path: Path, data: np.ndarray, affine: np.ndarray, **header: float) -> Path:
    img = nib.Nifti1Image(data, affine)
    for key, value in header.items():
        img.header[key] = value
    nib.save(img, path)
    return path


# an oblique but orthogonal grid: voxel axes rotated 30 degrees about z, spacing 0.8, 0.8, 3 mm
_ANGLE = np.radians(30)
_ROT = np.array(
    [[np.cos(_ANGLE), -np.sin(_ANGLE), 0], [np.sin(_ANGLE), np.cos(_ANGLE), 0], [0, 0, 1]]
)
OBLIQUE = np.eye(4)
OBLIQUE[:3, :3] = _ROT @ np.diag([0.8, 0.8, 3.0])
OBLIQUE[:3, 3] = [-10.0, 20.0, 5.0]


def test_a_volume_comes_back_slices_first_with_spacing_and_affine(tmp_path: Path):
    data = np.arange(6 * 5 * 4, dtype=np.int16).reshape(6, 5, 4)  # (i, j, k)
    path = _save(tmp_path / "ct.nii.gz", data, OBLIQUE)
    vol = read_nifti(path)
    assert vol.axes == (2, 1, 0)  # k (3 mm) is the slice axis; rows j, columns i
    assert vol.array.shape == (4, 5, 6) and vol.array.dtype == np.int16
    np.testing.assert_array_equal(vol.array, data.transpose(2, 1, 0))
    assert vol.spacing == pytest.approx((3.0, 0.8, 0.8))
    np.testing.assert_allclose(vol.affine, OBLIQUE, atol=1e-5)


def test_the_thick_axis_becomes_the_slice_axis(tmp_path: Path):
    affine = np.diag([4.0, 1.0, 1.0, 1.0])  # a sagittal stack: i is the slice axis
    data = np.zeros((3, 7, 8), np.float32)
    data[1, 2, 5] = 2.5
    vol = read_nifti(_save(tmp_path / "sag.nii", data, affine))
    assert vol.axes == (0, 2, 1) and vol.array.shape == (3, 8, 7)
    assert vol.array[1, 5, 2] == np.float32(2.5) and vol.array.dtype == np.float32
    assert vol.spacing == (4.0, 1.0, 1.0)
    assert slice_axes((1.0, 1.0, 1.0)) == (2, 1, 0)  # ties: the third voxel axis


def test_scaled_integers_stay_integers(tmp_path: Path):
    """CT stored with a slope and an intercept (HU = 1 * raw - 1024) is int16 again."""
    raw = np.array([[[0, 1024], [2048, 3000]]], np.int16)
    path = _save(tmp_path / "hu.nii.gz", raw, np.eye(4), scl_slope=1.0, scl_inter=-1024.0)
    vol = read_nifti(path)
    assert vol.array.dtype == np.int16
    assert sorted(vol.array.ravel().tolist()) == [-1024, 0, 1024, 1976]


def test_names():
    assert is_nifti("a/B.NII.GZ") and is_nifti("x.nii") and not is_nifti("x.png")
    assert nifti_stem("dir/case_0000.nii.gz") == "case_0000" and nifti_stem("c.nii") == "c"


def test_4d_is_refused_naming_the_file(tmp_path: Path):
    path = _save(tmp_path / "bold.nii.gz", np.zeros((4, 4, 3, 5), np.int16), np.eye(4))
    with pytest.raises(MedsegError, match=r"bold.nii.gz: a 4D NIfTI image 4x4x3x5"):
        read_nifti(path)
    single = _save(tmp_path / "one.nii.gz", np.ones((4, 4, 3, 1), np.int16), np.eye(4))
    assert read_nifti(single).array.shape == (3, 4, 4)  # one time point is a volume


@pytest.mark.parametrize(
    ("matrix", "message"),
    [
        ([[1, 0, 0], [0, 1, 0], [0, 0, 0]], "singular"),
        ([[1, 1, 0], [1, 1, 0], [0, 0, 1]], "singular"),
        ([[1, 0.3, 0], [0, 1, 0], [0, 0, 1]], "not orthogonal"),
    ],
)
def test_bad_affines_are_refused(tmp_path: Path, matrix: list, message: str):
    affine = np.eye(4)
    affine[:3, :3] = matrix
    path = tmp_path / "bad.nii"
    img = nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4))
    img.set_qform(None, code=0)  # only the sform describes the grid, stored as given
    img.set_sform(affine, code=2)
    nib.save(img, path)
    with pytest.raises(MedsegError, match=rf"bad.nii: the affine is {message}"):
        read_nifti(path)


def test_too_many_voxels_are_refused_before_decoding(tmp_path: Path):
    """The header alone decides: a file whose voxel data is cut off is still refused for its
    size (a decode would have failed differently)."""
    path = _save(tmp_path / "big.nii.gz", np.zeros((40, 40, 40), np.int16), np.eye(4))
    whole = gzip.decompress(path.read_bytes())
    cut = tmp_path / "cut.nii.gz"
    cut.write_bytes(gzip.compress(whole[:400]))  # the header and no voxels
    options = ReadOptions(max_pixels=10_000)
    with pytest.raises(MedsegError, match=r"cut.nii.gz: 40x40x40 = 64,000 samples exceeds"):
        read_nifti(cut, options)
    with pytest.raises(MedsegError, match=r"cut.nii.gz: cannot decode NIfTI voxels"):
        read_nifti(cut)  # within the limit, the damage is found (one line, the file named)


def test_labels_must_be_whole_numbers(tmp_path: Path):
    path = _save(tmp_path / "soft.nii.gz", np.full((2, 2, 2), 0.5, np.float32), np.eye(4))
    with pytest.raises(MedsegError, match=r"soft.nii.gz: a label map with values that are not"):
        read_nifti(path, labels=True)
    ok = _save(tmp_path / "lab.nii.gz", np.array([[[0.0, 2.0]]], np.float32), np.eye(4))
    assert read_nifti(ok, labels=True).array.dtype == np.uint8


def test_a_label_volume_off_its_image_grid_is_refused(tmp_path: Path):
    image = read_nifti(_save(tmp_path / "im.nii.gz", np.zeros((6, 5, 4), np.int16), OBLIQUE))
    shape = _save(tmp_path / "s.nii.gz", np.zeros((6, 5, 3), np.uint8), OBLIQUE)
    with pytest.raises(MedsegError, match=r"s.nii.gz: the label volume is 6x5x3 voxels but its"):
        check_same_grid(tmp_path / "im.nii.gz", image, shape, read_nifti(shape, labels=True))
    moved = OBLIQUE.copy()
    moved[0, 3] += 2.0
    shifted = _save(tmp_path / "m.nii.gz", np.zeros((6, 5, 4), np.uint8), moved)
    with pytest.raises(MedsegError, match=r"m.nii.gz: the label volume's affine differs"):
        check_same_grid(tmp_path / "im.nii.gz", image, shifted, read_nifti(shifted, labels=True))


def test_labels_written_back_on_the_input_grid(tmp_path: Path):
    data = np.random.default_rng(0).integers(-100, 100, (6, 5, 4)).astype(np.int16)
    src = _save(tmp_path / "in.nii.gz", data, OBLIQUE)
    vol = read_nifti(src)
    labels = (vol.array > 0).astype(np.uint8) * 2  # (Z, H, W)
    out = tmp_path / "out.nii.gz"
    write_nifti_labels(labels, src, out)
    back = nib.load(out)
    assert back.shape == (6, 5, 4)
    np.testing.assert_allclose(back.affine, nib.load(src).affine)
    assert back.get_data_dtype() == np.uint8
    assert int(back.header["sform_code"]) == int(nib.load(src).header["sform_code"])
    np.testing.assert_array_equal(np.asarray(back.dataobj), (data > 0).astype(np.uint8) * 2)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # nothing left beside
