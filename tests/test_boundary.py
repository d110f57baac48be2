from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.scoring.boundary import (
    BoundaryScores,
    BoundaryTally,
    boundary,
    boundary_scores,
    surface_distances,
    worst_distance,
)

SHAPE = (30, 40)


def canvas() -> np.ndarray:
    return np.zeros(SHAPE, bool)


def square(top: int, left: int, side: int) -> np.ndarray:
    mask = canvas()
    mask[top : top + side, left : left + side] = True
    return mask


def line(row: int, cols: slice) -> np.ndarray:
    mask = canvas()
    mask[row, cols] = True
    return mask


def test_boundary_is_mask_xor_erosion_by_the_cross():
    mask = square(5, 5, 4)
    mask[0, 10:14] = True  # touches the image edge: its pixels there are boundary
    edge = boundary(mask)
    inner = canvas()
    inner[6:8, 6:8] = True  # the 2x2 interior of the 4x4 square
    assert np.array_equal(edge, mask & ~inner)
    # a pixel whose four neighbours are set but one diagonal is not stays interior (cross)
    notch = square(10, 10, 5)
    notch[10, 10] = False
    assert not boundary(notch)[11, 11]


def test_two_lines_three_rows_apart():
    scores = boundary_scores(line(8, slice(5, 25)), line(5, slice(5, 25)), tolerance=3.0)
    assert scores == BoundaryScores(hd95=3.0, assd=3.0, nsd=1.0, status="both")
    assert boundary_scores(line(8, slice(5, 25)), line(5, slice(5, 25)), tolerance=2.9).nsd == 0.0


def test_two_squares_ten_columns_apart_by_hand():
    # 4x4 squares, the prediction 10 columns right of the truth. Both boundaries have 12
    # pixels; each direction's distances are {7: 4, 8: 2, 9: 2, 10: 4} (to the nearest column
    # of the other boundary in the same row)
    truth, pred = square(10, 10, 4), square(10, 20, 4)
    to_truth, to_pred = surface_distances(pred, truth)
    expected = [7.0] * 4 + [8.0] * 2 + [9.0] * 2 + [10.0] * 4
    assert sorted(to_truth) == expected and sorted(to_pred) == expected
    scores = boundary_scores(pred, truth, tolerance=8.0)
    assert scores.hd95 == pytest.approx(
        10.0
    )  # q95 of 12 values: between the 11th and 12th, both 10
    assert scores.assd == pytest.approx(2 * 102 / 24)
    assert scores.nsd == pytest.approx(12 / 24)


def test_ring_against_the_filled_square():
    # truth: a 9x9 square; prediction: the same with a 3x3 hole. The outer boundaries agree;
    # the 12 pixels 4-adjacent to the hole are 2 from the outer boundary
    truth = square(10, 10, 9)
    ring = truth.copy()
    ring[13:16, 13:16] = False
    to_truth, to_pred = surface_distances(ring, truth)
    assert sorted(to_truth) == [0.0] * 32 + [2.0] * 12
    assert np.all(to_pred == 0.0) and to_pred.size == 32
    assert boundary_scores(ring, truth).hd95 == pytest.approx(2.0)
    assert boundary_scores(ring, truth).assd == pytest.approx(24 / 76)
    assert boundary_scores(ring, truth, tolerance=1.0).nsd == pytest.approx(64 / 76)
    assert boundary_scores(ring, truth, tolerance=2.0).nsd == 1.0


def test_anisotropic_spacing_scales_each_axis():
    spacing = (2.0, 0.5)  # mm per row, mm per column
    down = boundary_scores(line(8, slice(5, 25)), line(5, slice(5, 25)), spacing=spacing)
    assert down.hd95 == pytest.approx(6.0) and down.assd == pytest.approx(6.0)
    right = canvas()
    right[5:25, 13] = True
    left = canvas()
    left[5:25, 10] = True
    scores = boundary_scores(right, left, spacing=spacing, tolerance=1.5)
    assert scores.hd95 == pytest.approx(1.5) and scores.nsd == 1.0
    assert boundary_scores(right, left, spacing=spacing, tolerance=1.4).nsd == 0.0
    # a tolerance that is a multiple of the spacing: 3 x 0.4 mm is within 1.2 mm, rounding aside
    fine = boundary_scores(
        line(8, slice(5, 25)), line(5, slice(5, 25)), spacing=(0.4, 0.4), tolerance=1.2
    )
    assert fine.nsd == 1.0
    # a diagonal: 3 rows and 4 columns apart
    a, b = canvas(), canvas()
    a[2, 2] = b[5, 6] = True
    assert boundary_scores(a, b).hd95 == pytest.approx(5.0)
    assert boundary_scores(a, b, spacing=spacing).hd95 == pytest.approx(math.hypot(6.0, 2.0))


def test_both_empty_is_perfect():
    assert boundary_scores(canvas(), canvas()) == BoundaryScores(0.0, 0.0, 1.0, "both_empty")


def test_one_empty_side_takes_the_fov_diagonal():
    fov = canvas()
    fov[3:23, 5:36] = True  # bounding box 20 x 31: farthest pixel centres 19 rows, 30 columns
    worst = math.hypot(19, 30)
    assert worst_distance(fov) == pytest.approx(worst)
    missed = boundary_scores(canvas(), square(10, 10, 4), fov)
    assert missed == BoundaryScores(pytest.approx(worst), pytest.approx(worst), 0.0, "pred_empty")
    invented = boundary_scores(square(10, 10, 4), canvas(), fov, spacing=(0.5, 2.0))
    assert invented.status == "truth_empty"
    assert invented.hd95 == invented.assd == pytest.approx(math.hypot(9.5, 60.0))
    assert worst_distance(canvas()) == 0.0
    # without a FOV, the whole image
    assert boundary_scores(canvas(), square(1, 1, 2)).hd95 == pytest.approx(math.hypot(29, 39))


def test_only_the_fov_counts():
    fov = canvas()
    fov[:, :30] = True
    truth = line(5, slice(5, 25))
    pred = line(8, slice(5, 25)) | square(20, 32, 3)  # the square lies outside the FOV
    assert boundary_scores(pred, truth, fov).hd95 == pytest.approx(3.0)
    # a structure that is wholly outside the FOV is no structure
    assert boundary_scores(square(20, 32, 3), canvas(), fov).status == "both_empty"


def test_bad_tolerance_and_spacing_are_user_errors():
    with pytest.raises(MedsegError, match="tolerance"):
        boundary_scores(canvas(), canvas(), tolerance=-1.0)
    with pytest.raises(MedsegError, match="spacing"):
        boundary_scores(canvas(), canvas(), spacing=(0.0, 1.0))
    with pytest.raises(ValueError, match="one shape"):
        boundary_scores(canvas(), np.zeros((3, 3), bool))
    with pytest.raises(ValueError, match="both masks"):
        surface_distances(canvas(), square(1, 1, 2))


def test_tally_summarises_per_class_and_counts_empty_cases():
    tally = BoundaryTally()
    tally.add("liver", BoundaryScores(1.0, 0.5, 0.9, "both"))
    tally.add("liver", BoundaryScores(3.0, 1.5, 0.7, "both"))
    tally.add("liver", BoundaryScores(0.0, 0.0, 1.0, "both_empty"))
    tally.add("liver", BoundaryScores(50.0, 50.0, 0.0, "pred_empty"))
    tally.add("tumour", BoundaryScores(2.0, 1.0, 0.8, "both"))
    summary = tally.summary()
    liver = summary["liver"]
    assert liver["hd95"]["mean"] == pytest.approx(54 / 4)
    assert liver["hd95"]["median"] == pytest.approx(2.0)
    assert liver["hd95"]["p95"] == pytest.approx(np.percentile([1, 3, 0, 50], 95))
    assert liver["nsd"]["p05"] == pytest.approx(np.percentile([0.9, 0.7, 1.0, 0.0], 5))
    assert (liver["n_both_empty"], liver["n_pred_empty"], liver["n_truth_empty"]) == (1, 1, 0)
    assert summary["tumour"]["assd"]["n"] == 1


# --- agreement with MONAI on random masks -------------------------------------------------


def blobs(
    rng: np.random.Generator, shape: tuple[int, int], sigma: float, level: float
) -> np.ndarray:
    """Random smooth blobs: Gaussian-filtered noise above a quantile."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field > np.quantile(field, level)


def monai_scores(pred, truth, spacing, tolerance):
    torch = pytest.importorskip("torch")
    metrics = pytest.importorskip("monai.metrics")
    y_pred = torch.as_tensor(pred[None, None].astype(np.float32))
    y = torch.as_tensor(truth[None, None].astype(np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hd95 = metrics.compute_hausdorff_distance(
            y_pred, y, include_background=True, percentile=95, spacing=spacing
        )
        assd = metrics.compute_average_surface_distance(
            y_pred, y, include_background=True, symmetric=True, spacing=spacing
        )
        nsd = metrics.compute_surface_dice(
            y_pred, y, [tolerance], include_background=True, spacing=spacing
        )
    return float(hd95[0, 0]), float(assd[0, 0]), float(nsd[0, 0])


@pytest.mark.parametrize("seed", range(12))
def test_agrees_with_monai_on_random_masks(seed):
    rng = np.random.default_rng(seed)
    shape = (int(rng.integers(24, 72)), int(rng.integers(24, 72)))
    truth = blobs(
        rng, shape, sigma=float(rng.uniform(1.0, 4.0)), level=float(rng.uniform(0.5, 0.95))
    )
    pred = blobs(
        rng, shape, sigma=float(rng.uniform(1.0, 4.0)), level=float(rng.uniform(0.5, 0.95))
    )
    if seed % 3 == 0:  # a prediction close to the truth: many small distances, ties at 0
        pred = ndimage.binary_dilation(np.roll(truth, 1, axis=int(seed % 2)))
    fov = None
    if seed % 2:
        rows, cols = np.ogrid[: shape[0], : shape[1]]
        centre = (shape[0] / 2, shape[1] / 2)
        fov = (rows - centre[0]) ** 2 + (cols - centre[1]) ** 2 <= (0.45 * max(shape)) ** 2
    spacing = [None, (1.0, 1.0), (0.7, 1.3), (2.5, 0.4)][seed % 4]
    tolerance = [1.5, 2.5, 0.9][seed % 3]
    ours = boundary_scores(pred, truth, fov, spacing=spacing, tolerance=tolerance)
    assert ours.status == "both"
    # MONAI has no FOV: give it the masks cut to the FOV, which is our definition
    inside = np.ones(shape, bool) if fov is None else fov
    reference = monai_scores(pred & inside, truth & inside, spacing, tolerance)
    # MONAI's distances are float32: agreement to 1e-6 relative
    np.testing.assert_allclose((ours.hd95, ours.assd, ours.nsd), reference, rtol=1e-6, atol=1e-6)


def test_crop_matches_the_whole_image_transform():
    # the transforms run on the masks' bounding box; distances must be those of the whole image
    rng = np.random.default_rng(7)
    truth, pred = canvas(), canvas()
    truth[2:9, 3:12] = blobs(rng, (7, 9), 1.0, 0.4)
    pred[20:29, 25:39] = blobs(rng, (9, 14), 1.0, 0.4)
    to_truth, to_pred = surface_distances(pred, truth)
    edge_p, edge_t = boundary(pred), boundary(truth)
    whole_t = ndimage.distance_transform_edt(~edge_t)
    whole_p = ndimage.distance_transform_edt(~edge_p)
    np.testing.assert_allclose(to_truth, whole_t[edge_p], rtol=1e-6)
    np.testing.assert_allclose(to_pred, whole_p[edge_t], rtol=1e-6)


def test_row_has_the_documented_per_image_columns():
    row = BoundaryScores(1.0, 0.5, 0.9, "both").row()
    assert row == {"hd95": 1.0, "assd": 0.5, "nsd": 0.9, "boundary_status": "both"}


@pytest.mark.parametrize("seed", range(6))
def test_volumes_agree_with_monai_in_3d_with_anisotropic_spacing(seed):
    """A volume's boundary is its surface (6-neighbour erosion), its distances 3D with the
    slice spacing: MONAI's 3D metrics on the same volumes, to 1e-6."""
    rng = np.random.default_rng(100 + seed)
    shape = (int(rng.integers(6, 14)), int(rng.integers(20, 40)), int(rng.integers(20, 40)))
    truth = blobs(rng, shape, sigma=2.0, level=float(rng.uniform(0.6, 0.9)))
    pred = blobs(rng, shape, sigma=2.0, level=float(rng.uniform(0.6, 0.9)))
    if seed % 2 == 0:  # close to the truth: one slice off
        pred = ndimage.binary_dilation(np.roll(truth, 1, axis=0))
    spacing = [(2.5, 0.7, 0.9), (5.0, 1.0, 1.0), (1.0, 0.4, 0.4)][seed % 3]
    tolerance = [1.0, 2.5][seed % 2]
    ours = boundary_scores(pred, truth, spacing=spacing, tolerance=tolerance)
    reference = monai_scores(pred, truth, spacing, tolerance)
    np.testing.assert_allclose((ours.hd95, ours.assd, ours.nsd), reference, rtol=1e-6, atol=1e-6)


def test_a_volume_with_one_side_empty_takes_its_3d_diagonal():
    truth = np.zeros((4, 10, 10), bool)
    truth[1:3, 2:5, 2:5] = True
    scores = boundary_scores(np.zeros_like(truth), truth, spacing=(3.0, 1.0, 2.0))
    assert scores.status == "pred_empty"
    assert scores.hd95 == pytest.approx(float(np.sqrt(9.0**2 + 9.0**2 + 18.0**2)))
