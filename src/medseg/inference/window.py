"""The sliding window (MONAI's ``SlidingWindowInferer``, nnU-Net's Gaussian weighting): padded
windows in batches over any `medseg.inference.runners.Runner`, Gaussian or constant blending, flip
test-time augmentation. Settings travel as one `WindowSettings`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from medseg.inference.runners import Runner, as_runner
from medseg.names import BLENDINGS

if TYPE_CHECKING:
    import torch

    from medseg.config.sections import EvaluateConfig

# sigma of the Gaussian weight as a share of the window side (nnU-Net's choice): the centre of a
# window, which saw the most context, outweighs its rim where windows overlap
GAUSSIAN_SIGMA = 1.0 / 8.0
_MIN_WEIGHT = 1e-3  # per axis: keeps pixels covered only by window rims defined


@dataclass(frozen=True)
class WindowSettings:
    """How a whole image is cut into windows and put back together.

    Attributes:
        window: window side, a multiple of 32.
        overlap: share of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass (times 4 with ``tta``).
        blending: ``gaussian`` or ``constant``, see `blend_weights`.
        tta: average over the horizontal, vertical and double flips too.
    """

    window: int = 1024
    overlap: float = 0.25
    batch_size: int = 4
    blending: str = "gaussian"
    tta: bool = False

    @classmethod
    def from_config(cls, cfg: EvaluateConfig) -> WindowSettings:
        """The window settings of the ``evaluate`` params (or of ``medseg predict``'s options)."""
        return cls(cfg.window, cfg.overlap, cfg.batch_size, cfg.blending, cfg.tta)


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` pixels covering ``size`` pixels at ``stride``."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return [*starts, size - window]


def blend_weights(height: int, width: int, blending: str) -> np.ndarray:
    """Per-pixel weight of one window's prediction when overlapping windows are averaged.

    Args:
        height, width: window size.
        blending: ``gaussian`` (peak 1 at the centre, sigma = 1/8 of the side, each axis
            floored at 1e-3) or ``constant`` (all ones: a plain mean).

    Returns:
        (height, width) float32.
    """
    if blending == "constant":
        return np.ones((height, width), dtype=np.float32)
    if blending != "gaussian":
        raise ValueError(f"blending must be one of {BLENDINGS}, got {blending!r}")

    def axis(n: int) -> np.ndarray:
        x = np.arange(n, dtype=np.float64) - (n - 1) / 2.0
        g = np.exp(-0.5 * (x / (GAUSSIAN_SIGMA * n)) ** 2)
        # floored per axis, so that along an image border (where every window has its rim)
        # the window centred across the border still outweighs the others
        return np.maximum(g / g.max(), _MIN_WEIGHT)

    return np.outer(axis(height), axis(width)).astype(np.float32)


def _window_probabilities(runner: Runner, batch: np.ndarray, tta: bool) -> np.ndarray:
    """Probabilities for a batch of windows; with ``tta`` the mean over the identity and the
    horizontal, vertical and double flips (each undone before averaging), in one forward pass."""
    if not tta:
        return runner.probabilities(batch)
    flips: list[tuple[int, ...]] = [(), (-1,), (-2,), (-2, -1)]
    views = np.concatenate([np.flip(batch, f) if f else batch for f in flips])
    probs = np.split(runner.probabilities(views), len(flips))
    mean = probs[0].copy()
    for p, f in zip(probs[1:], flips[1:], strict=True):
        mean += np.flip(p, f)
    return mean / len(flips)


def pad_to_multiple(image: np.ndarray, divisor: int) -> np.ndarray:
    """Zero-pad at the bottom and right so that height and width divide by ``divisor``.

    Args:
        image: (C, H, W).
        divisor: e.g. `Runner.divisor`.

    Returns:
        A new (C, ceil(H / divisor) * divisor, ceil(W / divisor) * divisor) float32 array.
    """
    c, h, w = image.shape
    x = np.zeros((c, -(-h // divisor) * divisor, -(-w // divisor) * divisor), np.float32)
    x[:, :h, :w] = image
    return x


def predict_probabilities(
    model: torch.nn.Module | Runner,
    image: np.ndarray,
    settings: WindowSettings | None = None,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Class probabilities for every pixel of one image of any size.

    Steps: (1) zero-pad the image at the bottom and right to a multiple of the model's
    divisor (32 for a 5-level encoder); (2) cut it into windows of ``settings.window`` pixels
    (the padded size where that is smaller) overlapping by ``settings.overlap``; (3) run them
    ``settings.batch_size`` at a time, optionally with flips; (4) add each window's
    probabilities, weighted by `blend_weights`, and divide by the summed weights; (5) crop back
    to the image's size.

    Args:
        model: a `Runner`, or a torch network in eval mode, (B, C, h, w) -> (B, K, h, w)
            logits; K = 1 means binary (sigmoid), K > 1 means K classes with background as
            class 0 (softmax).
        image: (C, H, W) float32.
        settings: window, overlap, batch size, blending, flips; default `WindowSettings()`.
        device: where a torch model lives (a `Runner` knows its own).

    Returns:
        (K, H, W) float32 probabilities in [0, 1]; for K > 1 they sum to 1 over classes.
    """
    s = settings or WindowSettings()
    window, overlap = s.window, s.overlap
    runner = as_runner(model, device)
    _, h, w = image.shape
    x = pad_to_multiple(image, runner.divisor)
    ph, pw = x.shape[1:]
    win_h, win_w = min(window, ph), min(window, pw)
    stride_h = max(1, int(win_h * (1.0 - overlap)))
    stride_w = max(1, int(win_w * (1.0 - overlap)))
    tiles = [
        (top, left)
        for top in window_starts(ph, win_h, stride_h)
        for left in window_starts(pw, win_w, stride_w)
    ]
    weight = blend_weights(win_h, win_w, s.blending)
    total: np.ndarray | None = None
    weight_sum = np.zeros((ph, pw), dtype=np.float32)
    for i in range(0, len(tiles), s.batch_size):
        chunk = tiles[i : i + s.batch_size]
        batch = np.stack([x[:, t : t + win_h, c0 : c0 + win_w] for t, c0 in chunk])
        probs = _window_probabilities(runner, batch, s.tta)
        if total is None:
            total = np.zeros((probs.shape[1], ph, pw), dtype=np.float32)
        for (t, c0), p in zip(chunk, probs, strict=True):
            total[:, t : t + win_h, c0 : c0 + win_w] += p * weight
            weight_sum[t : t + win_h, c0 : c0 + win_w] += weight
    assert total is not None
    return (total / weight_sum)[:, :h, :w]
