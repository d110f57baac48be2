"""The image transforms that make a model input, the same for the pipeline and for
`medseg predict`: channel choice, optional CLAHE, resizing, FOV-aware normalisation."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

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


# CT intensities are clipped to these percentiles of the training foreground (nnU-Net's)
CT_PERCENTILES = (0.5, 99.5)


@dataclass(frozen=True)
class Intensity:
    """A CT data set's intensity normalisation (nnU-Net's ``CTNormalization``): clip to the
    0.5 and 99.5 percentiles of the training foreground voxels, then subtract their mean and
    divide by their standard deviation (over the whole training set), per channel.

    Attributes:
        clip: per channel, (low, high).
        mean, std: per channel, of the clipped foreground voxels.
    """

    clip: list[tuple[float, float]]
    mean: list[float]
    std: list[float]

    @classmethod
    def from_samples(cls, samples: list[np.ndarray]) -> Intensity:
        """From foreground voxel samples: per volume, (n, C) float32."""
        values = np.concatenate(samples).astype(np.float64)
        lo, hi = np.percentile(values, CT_PERCENTILES, axis=0)
        clipped = np.clip(values, lo, hi)
        return cls(
            [(float(a), float(b)) for a, b in zip(lo, hi, strict=True)],
            [float(m) for m in clipped.mean(axis=0)],
            [float(s) for s in clipped.std(axis=0)],
        )

    def record(self) -> dict[str, Any]:
        """The JSON record (`medseg.names.INTENSITY_RECORD`)."""
        return {"modality": "CT", "clip": [list(c) for c in self.clip], "mean": self.mean,
                "std": self.std}  # fmt: skip

    def apply(self, volume: np.ndarray) -> np.ndarray:
        """(C, Z, H, W) -> float32, clipped and normalised per channel."""
        if len(volume) != len(self.mean):
            raise MedsegError(
                f"a volume of {len(volume)} channel(s) for an intensity record of "
                f"{len(self.mean)}; the model was trained on other data"
            )
        out = np.empty(volume.shape, dtype=np.float32)
        for c, channel in enumerate(volume):
            lo, hi = self.clip[c]
            x = np.clip(np.asarray(channel, dtype=np.float32), lo, hi)
            out[c] = (x - self.mean[c]) / (self.std[c] if self.std[c] > 1e-6 else 1.0)
        return out


def read_intensity(path: Path) -> Intensity | None:
    """The intensity record at ``path`` (`Intensity.record`), None where there is none.

    Raises:
        MedsegError: a record that is not one.
    """
    if not path.is_file():
        return None
    from medseg.io.records import read_json

    raw = read_json(path, "intensity record")
    try:
        clip = [(float(a), float(b)) for a, b in raw["clip"]]
        mean = [float(m) for m in raw["mean"]]
        std = [float(s) for s in raw["std"]]
    except (KeyError, TypeError, ValueError) as err:
        raise MedsegError(f"{path}: not an intensity record (clip, mean, std per channel)") from err
    if not len(clip) == len(mean) == len(std) or not all(map(np.isfinite, mean + std)):
        raise MedsegError(f"{path}: not an intensity record (clip, mean, std per channel)")
    return Intensity(clip, mean, std)


def normalise_volume(volume: np.ndarray, intensity: Intensity | None) -> np.ndarray:
    """A volume as the model sees it: a CT data set's `Intensity` where there is one, else
    `zscore_volume` (MR and every other modality)."""
    return intensity.apply(volume) if intensity is not None else zscore_volume(volume)


def zscore_volume(volume: np.ndarray) -> np.ndarray:
    """A volume normalised per channel over all its voxels: zero mean, unit variance (nnU-Net's
    normalisation for MR and every modality but CT). A constant channel gives zeros.

    Args:
        volume: (C, Z, H, W) int16 or float32.

    Returns:
        (C, Z, H, W) float32.
    """
    out = np.empty(volume.shape, dtype=np.float32)
    for c, channel in enumerate(volume):
        x = np.asarray(channel, dtype=np.float32)
        mean = float(x.mean(dtype=np.float64))
        std = float(x.std(dtype=np.float64))
        out[c] = (x - mean) / (std if std > 1e-6 else 1.0)
    return out


def prepare_slice(
    x: np.ndarray, truth: np.ndarray, max_side: int | None, n_labels: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """One slice of a normalised volume as a model input: resized to ``max_side`` where the
    user (or the plan) asks for it; a slice's field of view is all of it.

    Args:
        x: (C, H, W) float32 normalised slice.
        truth: (H, W) uint8 labels.
        max_side: `model_size`'s limit, or None.
        n_labels: labels, background included.

    Returns:
        (C, h, w) float32 input, (h, w) uint8 labels and (h, w) bool field of view.
    """
    size = model_size(truth.shape[0], truth.shape[1], max_side)
    if size != truth.shape:
        x = resize_image(x, size)
        truth = resize_labels(truth, size, n_labels)
    return x, truth, np.ones(size, dtype=bool)


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
