"""The field of view made from an image, for data sets that ship no FOV masks: the one policy of
the convert stage and of `medseg predict` for new images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy import ndimage

from medseg.errors import MedsegError


def fov_from_image(image: np.ndarray, threshold: float, erode: int = 0) -> np.ndarray:
    """A field-of-view mask made from the image itself, for data sets that ship none.

    Steps: 1. the brightest channel as a share of full scale; 2. a 5x5 median against noise
    (it keeps the rim where it is);
    3. threshold; 4. keep the largest connected region; 5. fill its holes (dark vessels, lesions);
    6. shave ``erode`` pixels off the rim.

    Args:
        image: (H, W) or (H, W, 3) uint8 or uint16.
        threshold: share of full scale (255 or 65535) in (0, 1).
        erode: pixels removed from the rim, >= 0.

    Returns:
        (H, W) bool; all False when nothing exceeds the threshold.
    """
    full = 65535.0 if image.dtype == np.uint16 else 255.0
    bright = image.max(axis=2) if image.ndim == 3 else image
    # the 5x5 median of the thresholded image (the same as thresholding the median, and ~30x
    # faster): a pixel is in where the majority of its 25 neighbours is
    above = (bright > threshold * full).astype(np.float32)
    mask = ndimage.uniform_filter(above, size=5) > 0.5
    labels, n = ndimage.label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    mask = ndimage.binary_fill_holes(labels == int(sizes.argmax()))
    if erode > 0:
        mask = ndimage.distance_transform_edt(mask) > erode
    return np.asarray(mask, dtype=bool)


FOV_LABEL_TOLERANCE = 0.01  # share of a case's labelled pixels a thresholded FOV may leave out
FOV_RIM = 3  # pixels beyond the FOV's rim that count as the rim (a threshold shaves a few)


def labels_outside(masks: np.ndarray, fovs: np.ndarray) -> tuple[float, int]:
    """The largest share of a frame's labelled pixels that lie farther than ``FOV_RIM`` pixels
    outside its FOV, and that frame's index.

    Args:
        masks: (F, H, W) integer labels, 0 = background.
        fovs: (F, H, W) or (1, H, W) bool.
    """
    worst, where = 0.0, 0
    for k, mask in enumerate(masks):
        labelled = mask > 0
        total = int(np.count_nonzero(labelled))
        if not total:
            continue
        near = ndimage.binary_dilation(fovs[k if len(fovs) > 1 else 0], iterations=FOV_RIM)
        share = np.count_nonzero(labelled & ~near) / total
        if share > worst:
            worst, where = float(share), k
    return worst, where


def check_fov_keeps_labels(image: Path, masks: np.ndarray, fovs: np.ndarray) -> None:
    """Refuse an FOV made by thresholding that cuts away labelled anatomy.

    The threshold is made for a black surround (fundus photographs). On CT, X-ray or skin a dark
    structure (air, lungs, a dark lesion) that touches the border is not a surround; pixels outside
    the FOV are neither trained on nor scored, so cutting such a structure away would silently
    drop it. More than ``FOV_LABEL_TOLERANCE`` of a case's labelled pixels farther than
    ``FOV_RIM`` pixels outside is an error (vessels that cross a fundus rim lose a pixel or two
    there, which is no reason to refuse).
    """
    share, k = labels_outside(masks, fovs)
    if share > FOV_LABEL_TOLERANCE:
        frame = f" (frame {k + 1})" if len(masks) > 1 else ""
        raise MedsegError(
            f"{image}{frame}: {100.0 * share:.1f}% of the labelled pixels lie "
            "well outside the field of view found by convert.fov_threshold; dark regions "
            "here belong to the anatomy: set convert.fov_fallback: whole_image (CT, X-ray, "
            "dermoscopy, microscopy) or give FOV masks"
        )
