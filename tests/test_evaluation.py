from __future__ import annotations

import numpy as np

from medseg.evaluation import FN_COLOUR, FP_COLOUR, TP_COLOUR, overlay


def test_overlay_colours_each_outcome():
    image = np.zeros((1, 5), np.float32)
    pred = np.array([[1, 1, 0, 0, 0]], bool)
    truth = np.array([[1, 0, 1, 0, 0]], bool)
    fov = np.array([[1, 1, 1, 1, 0]], bool)
    rgb = overlay(image, pred, truth, fov)
    assert rgb.shape == (1, 5, 3) and rgb.dtype == np.uint8
    for col, colour in ((0, TP_COLOUR), (1, FP_COLOUR), (2, FN_COLOUR)):
        # the outcome's colour dominates the pixel
        assert np.argmax(rgb[0, col]) == np.argmax(colour)
    assert len({tuple(rgb[0, c]) for c in range(3)}) == 3
    assert rgb[0, 3].tolist() == [128, 128, 128]  # true negative: the grey image (0 -> mid-grey)
    assert rgb[0, 4].tolist() == [0, 0, 0]  # outside the FOV
