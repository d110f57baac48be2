"""NIfTI volumes (``.nii``, ``.nii.gz``, via nibabel): read as slices-first arrays with their
spacing and affine, checked before decoding; label maps written back on the input's grid.

Axis order. A volume comes back as (Z, H, W): Z runs along the file's voxel axis with the
largest spacing (the slice axis of a thick-slice series; the third voxel axis where spacings
tie, as in most files), H along the later and W along the earlier of the two others. For the
common axial file (voxel axes i, j, k with k the slice axis) that is ``array[k, j, i]``.
`Volume.axes` records the permutation, so a prediction goes back onto the file's own voxel grid
(`write_nifti_labels`) under the file's affine and header, whatever its orientation.

Refused, one line naming the file, from the header before any voxel is decoded: more than
three dimensions (a time series or several channels in one file: give one file per channel),
an affine whose 3 x 3 part is singular or not orthogonal (a sheared grid: slices would not be
planes of constant depth), more voxels than ``convert.max_pixels``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.io.limits import ReadOptions, check_file_size, check_pixel_count, decode_guard

NIFTI_SUFFIXES = (".nii.gz", ".nii")
# the largest |cosine| between two voxel axes that still counts as orthogonal (0.06 degrees
# from a right angle: rounding in a header written as float32, never a real shear)
ORTHOGONAL_TOLERANCE = 1.0e-3
# how far two affines may differ and still describe the same grid (mm and direction cosines;
# headers store float32)
SAME_GRID_TOLERANCE = 1.0e-3


@dataclass(frozen=True)
class Volume:
    """A volume as `read_nifti` gives it.

    Attributes:
        array: (Z, H, W) voxels; int16 or float32 for images (the smallest that holds the
            file's values exactly), the file's integers for labels.
        spacing: (z, row, col) voxel spacing in mm.
        affine: (4, 4) float64, the file's voxel (i, j, k) to world (mm) transform.
        axes: the file's voxel axes that became (Z, H, W): ``array = data.transpose(axes)``.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    affine: np.ndarray
    axes: tuple[int, int, int]


def is_nifti(path: str | Path) -> bool:
    """Whether ``path`` has a NIfTI ending (``.nii`` or ``.nii.gz``)."""
    return str(path).lower().endswith(NIFTI_SUFFIXES)


def nifti_stem(path: str | Path) -> str:
    """The file name without its NIfTI ending: ``case_0000.nii.gz`` -> ``case_0000``."""
    name = Path(path).name
    for suffix in NIFTI_SUFFIXES:
        if name.lower().endswith(suffix):
            return name[: -len(suffix)]
    return Path(path).stem


def read_nifti(
    path: str | Path, options: ReadOptions | None = None, *, labels: bool = False
) -> Volume:
    """Read a NIfTI volume, checked from its header before its voxels are decoded.

    Args:
        path: the file.
        options: the size limit (``max_pixels``); default `ReadOptions()`.
        labels: a label map: its values must be non-negative integers (they come back as the
            smallest unsigned integer type that holds them); an image comes back as int16 where
            its values are integers that fit, else float32.

    Returns:
        The `Volume`.

    Raises:
        MedsegError: one line naming the file: unreadable or damaged, 4D, a singular or
            non-orthogonal affine, too many voxels, labels that are not integers.
    """
    import nibabel as nib  # here: only volume data sets need it

    path = Path(path)
    options = options or ReadOptions()
    if not str(path).lower().endswith(".gz"):  # a compressed file is bounded by its shape
        check_file_size(path, options)
    with decode_guard(path, "read NIfTI header"):
        img: Any = nib.load(os.fspath(path))
    shape = tuple(int(n) for n in img.shape)
    if len(shape) == 4 and shape[3] == 1:
        shape = shape[:3]
    if len(shape) > 3:
        raise MedsegError(
            f"{path}: a {len(shape)}D NIfTI image {'x'.join(map(str, shape))}; medseg reads 3D "
            "volumes (give each channel or time point as its own file, nnU-Net's _0000, _0001)"
        )
    shape = shape + (1,) * (3 - len(shape))
    check_pixel_count(path, int(np.prod(shape)), options.max_pixels, "x".join(map(str, shape)))
    affine = np.asarray(img.affine, dtype=np.float64)
    spacing_ijk = _check_affine(path, affine)
    axes = slice_axes(spacing_ijk)
    with decode_guard(path, "decode NIfTI voxels"):
        data = np.asanyarray(img.dataobj).reshape(shape)
    data = _labels(path, data) if labels else _image(data)
    array = np.ascontiguousarray(data.transpose(axes))
    spacing = (spacing_ijk[axes[0]], spacing_ijk[axes[1]], spacing_ijk[axes[2]])
    return Volume(array, spacing, affine, axes)


def slice_axes(spacing_ijk: tuple[float, float, float]) -> tuple[int, int, int]:
    """The voxel axes that become (Z, H, W): Z the axis of the largest spacing (the last of
    equals), H the later and W the earlier of the other two."""
    z = max(range(3), key=lambda a: (round(spacing_ijk[a], 4), a))
    w, h = (a for a in range(3) if a != z)
    return (z, h, w)


def _check_affine(path: Path, affine: np.ndarray) -> tuple[float, float, float]:
    """The voxel spacing (i, j, k) in mm of an affine, refused where it is not a grid."""
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise MedsegError(f"{path}: the affine is not a finite 4 x 4 matrix; the header is damaged")
    m = affine[:3, :3]
    norms = np.linalg.norm(m, axis=0)
    if (norms < 1e-6).any() or abs(np.linalg.det(m)) < 1e-9 * float(np.prod(norms)):
        raise MedsegError(
            f"{path}: the affine is singular (a voxel axis of zero length or two axes along one "
            "direction); fix the header (sform/qform) of the file"
        )
    unit = m / norms
    cosines = np.abs(unit.T @ unit - np.eye(3))
    if cosines.max() > ORTHOGONAL_TOLERANCE:
        raise MedsegError(
            f"{path}: the affine is not orthogonal (a sheared grid, voxel axes at "
            f"{np.degrees(np.arccos(np.clip(1 - cosines.max(), -1, 1))):.2f} degrees off a right "
            "angle); resample the volume onto an orthogonal grid first"
        )
    # headers store float32: 0.9 mm is 0.8999999762; six decimals are a micrometre
    return (round(float(norms[0]), 6), round(float(norms[1]), 6), round(float(norms[2]), 6))


def _image(data: np.ndarray) -> np.ndarray:
    """Image voxels as int16 where they are integers that fit, else float32."""
    if np.issubdtype(data.dtype, np.integer):
        if data.size == 0 or (data.min() >= -32768 and data.max() <= 32767):
            return data.astype(np.int16, copy=False)
        return data.astype(np.float32)
    data = data.astype(np.float32, copy=False)
    if not np.isfinite(data).all():
        return np.nan_to_num(data, nan=0.0, posinf=0.0, neginf=0.0)
    rounded = np.rint(data)
    if (rounded == data).all() and data.min() >= -32768 and data.max() <= 32767:
        return rounded.astype(np.int16)
    return data


def _labels(path: Path, data: np.ndarray) -> np.ndarray:
    """Label voxels as unsigned integers; refused unless every value is a non-negative integer."""
    if not np.issubdtype(data.dtype, np.integer) and (
        not np.isfinite(data).all() or (np.rint(data) != data).any()
    ):
        raise MedsegError(
            f"{path}: a label map with values that are not integers; labels must be whole "
            "numbers (0 background, 1, 2, ... the classes)"
        )
    if data.size and data.min() < 0:
        raise MedsegError(f"{path}: a label map with negative values; labels are 0, 1, 2, ...")
    top = int(data.max()) if data.size else 0
    dtype = np.uint8 if top <= 255 else np.uint16 if top <= 65535 else np.uint32
    return data.astype(dtype)


def check_same_grid(image_path: Path, image: Volume, label_path: Path, label: Volume) -> None:
    """Refuse a label volume whose shape or affine differs from its image's.

    Raises:
        MedsegError: naming the label file, both shapes or the largest affine difference.
    """
    if label.array.shape != image.array.shape or label.axes != image.axes:
        raise MedsegError(
            f"{label_path}: the label volume is {_shape(label)} voxels but its image "
            f"{image_path} is {_shape(image)}; they must lie on the same grid"
        )
    diff = float(np.abs(label.affine - image.affine).max())
    if diff > SAME_GRID_TOLERANCE * max(1.0, float(np.abs(image.affine).max())):
        raise MedsegError(
            f"{label_path}: the label volume's affine differs from its image's {image_path} "
            f"(by up to {diff:.4g}); they must lie on the same grid (resample the labels onto it)"
        )


def _shape(volume: Volume) -> str:
    """The file's voxel shape (i x j x k) of a volume."""
    file_shape = [0, 0, 0]
    for dim, axis in enumerate(volume.axes):
        file_shape[axis] = volume.array.shape[dim]
    return "x".join(map(str, file_shape))


def write_nifti_labels(labels: np.ndarray, reference: str | Path, out: str | Path) -> None:
    """Write a (Z, H, W) label map onto the voxel grid of the NIfTI file ``reference``: its
    affine and header (sform and qform codes, units, description), uint8 voxels, no scaling.

    The file appears whole or not at all (written beside and renamed).

    Args:
        labels: (Z, H, W) integer labels, as `read_nifti` ordered ``reference``'s voxels.
        reference: the input volume the labels belong to.
        out: the file to write (``.nii`` or ``.nii.gz``).
    """
    import nibabel as nib

    ref: Any = nib.load(os.fspath(reference))  # a Nifti1Image or Nifti2Image
    ref_shape = tuple(int(n) for n in ref.shape)[:3]
    ref_shape = ref_shape + (1,) * (3 - len(ref_shape))
    axes = slice_axes(_check_affine(Path(reference), np.asarray(ref.affine, dtype=np.float64)))
    data = np.asarray(labels).transpose(np.argsort(axes)).astype(np.uint8)
    if data.shape != ref_shape:
        raise MedsegError(
            f"{out}: a label map of {data.shape} voxels does not fit {reference} ({ref_shape})"
        )
    header = ref.header.copy()
    header.set_data_dtype(np.uint8)
    if len(ref.shape) != 3:
        data = data.reshape(tuple(int(n) for n in ref.shape))
    img = type(ref)(data, ref.affine, header)
    img.header.set_slope_inter(1.0, 0.0)
    img.set_sform(ref.affine, int(ref.header["sform_code"]))
    img.set_qform(ref.affine, int(ref.header["qform_code"]))
    out = Path(out)
    ending = ".nii.gz" if out.name.lower().endswith(".gz") else ".nii"  # nibabel goes by it
    tmp = out.with_name(f".{out.name}.{os.getpid()}{ending}")
    try:
        nib.save(img, os.fspath(tmp))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
