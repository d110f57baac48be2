"""The image transforms that make a model input, the same for the pipeline and for
`medseg predict`: channel choice, optional CLAHE, resizing, FOV-aware normalisation."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from medseg.config.sections import PreprocessConfig
from medseg.errors import MedsegError

_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def select_channel(image: np.ndarray, channel: str, path: str | Path = "image") -> np.ndarray:
    """The model's input channels of an image, as float32 in [0, 1].

    Args:
        image: (H, W) or (H, W, 3), uint8 or uint16.
        channel: ``green`` (the vessel-contrast channel of a fundus photograph; a grey image is
            used as it is), ``gray`` (luma of an RGB image) or ``rgb`` (all three channels:
            dermoscopy, endoscopy, histology; the image must be colour).
        path: the image's file, for messages.

    Returns:
        (C, H, W) float32: C = 3 for ``rgb``, else 1.

    Raises:
        MedsegError: ``rgb`` asked of a grey image.
    """
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    x = image.astype(np.float32) / scale
    if channel == "rgb":
        if x.ndim != 3 or x.shape[2] != 3:
            raise MedsegError(
                f"{path}: a grey image, but preprocess.channel is rgb (3 colour channels); "
                "use preprocess.channel: gray for grey data sets"
            )
        return np.ascontiguousarray(x.transpose(2, 0, 1))
    if x.ndim == 2:
        return x[None]
    if channel == "green":
        return np.ascontiguousarray(x[None, ..., 1])
    return (x @ _LUMA)[None]


def in_channels(channel: str) -> int:
    """Input channels of the model for ``preprocess.channel``."""
    return 3 if channel == "rgb" else 1


def normalize_in_fov(x: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Per channel: zero mean, unit variance using only FOV pixels; 0 outside the FOV.

    Args:
        x: (C, H, W) or (H, W) float32 image.
        fov: (H, W) bool field of view (at least one pixel).

    Returns:
        float32 of the shape of ``x``. A constant FOV gives zeros, never NaN.
    """
    flat = x[None] if x.ndim == 2 else x
    out = np.empty(flat.shape, dtype=np.float32)
    for c, channel in enumerate(flat):
        inside = channel[fov].astype(np.float64)
        std = float(inside.std())
        out[c] = (channel - float(inside.mean())) / (std if std > 1e-6 else 1.0)
        out[c][~fov] = 0.0
    return out[0] if x.ndim == 2 else out


def model_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """The size a case is given to the model: its own, or scaled down to ``max_side``."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float32 to (C, h, w): area averaging down (no aliasing), bilinear up."""
    if x.shape[-2:] == size:
        return x
    import torch  # here, not at the top: an ONNX model predicts without torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    down = size[0] <= x.shape[-2] and size[1] <= x.shape[-1]
    if down:
        out = F.interpolate(t, size=size, mode="area")
    else:
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out[0].numpy()


def resize_labels(labels: np.ndarray, size: tuple[int, int], n_labels: int) -> np.ndarray:
    """(H, W) integer labels to (h, w) uint8: each pixel takes the label covering most of it
    (area-weighted vote), so a resized mask keeps the classes' areas."""
    if labels.shape == size:
        return labels.astype(np.uint8, copy=False)
    onehot = np.stack([labels == k for k in range(n_labels)]).astype(np.float32)
    return resize_image(onehot, size).argmax(axis=0).astype(np.uint8)


def _check_channel_has_content(
    image: np.ndarray, chosen: np.ndarray, fov: np.ndarray, channel: str, path: str | Path
) -> None:
    """Refuse a colour image whose chosen channel is flat inside the FOV while its colours are
    not (a stain or fluorescence in red or blue only): the network would see a blank input."""
    inside = chosen[fov]
    if inside.size and inside.min() == inside.max():
        colours = image[fov]
        if (colours.max(axis=0) != colours.min(axis=0)).any():
            raise MedsegError(
                f"{path}: its {channel} channel is constant inside the field of view but its "
                "colour channels are not; set preprocess.channel: rgb (or gray)"
            )


def prepare_image(
    image: np.ndarray, fov: np.ndarray, cfg: PreprocessConfig, path: str | Path = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """The model input for one image: the same steps for the pipeline and ``medseg predict``.

    Steps: (1) the channels of ``preprocess.channel``; (2) optionally CLAHE, per channel, at
    full resolution; (3) scaled down to ``preprocess.max_side`` where the user asks for it;
    (4) zero mean and unit variance inside the FOV, 0 outside.

    Args:
        image: (H, W) or (H, W, 3) uint8 or uint16, as the readers of `medseg.io` return it.
        fov: (H, W) bool field of view (at least one pixel).
        cfg: the preprocess params the model was trained with.
        path: the image's file, for messages.

    Returns:
        (C, h, w) float32 input and its (h, w) bool FOV, unpadded; (h, w) = (H, W) unless
        resized.
    """
    x = select_channel(image, cfg.channel, path)
    if image.ndim == 3 and cfg.channel != "rgb":
        _check_channel_has_content(image, x[0], fov, cfg.channel, path)
    if cfg.contrast == "clahe":
        x = np.stack([clahe(c, cfg.clahe_clip, cfg.clahe_tiles) for c in x])
    size = model_size(fov.shape[0], fov.shape[1], cfg.max_side)
    if size != fov.shape:
        x = resize_image(x, size)
        fov = resize_labels(fov, size, 2) > 0
        if not fov.any():
            raise MedsegError(
                f"{path}: the field of view vanishes at preprocess.max_side {cfg.max_side}; "
                "raise it"
            )
    return normalize_in_fov(x, fov), fov


def clahe(x: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of one channel.

    Each of ``tiles`` x ``tiles`` regions gets its own histogram equalisation, its histogram
    clipped at ``clip`` (a share of the tile's pixels) so that noise in flat regions is not
    amplified, and neighbouring mappings are interpolated. Thin, faint vessels gain contrast
    against the uneven background of a fundus photograph.

    Args:
        x: (H, W) float32 in [0, 1].
        clip: clip limit in (0, 1].
        tiles: regions per image side.

    Returns:
        (H, W) float32 in [0, 1]; an image with (almost) no contrast comes back unchanged, as
        equalising it would only blow noise up to the full range.
    """
    if float(np.ptp(x)) < 1e-3:
        return x.astype(np.float32)
    from skimage import exposure  # here: only CLAHE needs scikit-image, slow to import

    kernel = (max(2, -(-x.shape[0] // tiles)), max(2, -(-x.shape[1] // tiles)))
    out = exposure.equalize_adapthist(np.clip(x, 0.0, 1.0), kernel_size=kernel, clip_limit=clip)
    return out.astype(np.float32)
