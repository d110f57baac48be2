"""Whole-image inference: padded sliding windows in batches, Gaussian or constant blending,
flip test-time augmentation, thresholding. The same code serves ``evaluate`` and ``predict``,
for a torch module and for an exported ONNX model alike: the network sits behind `Runner`.

torch is imported inside the functions that need it, so that an ONNX model predicts without it.
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

from medseg.config import EvaluateConfig
from medseg.transforms import resize_image

if TYPE_CHECKING:
    import torch

BLENDINGS = ("gaussian", "constant")
# sigma of the Gaussian weight as a share of the window side (nnU-Net's choice): the centre of a
# window, which saw the most context, outweighs its rim where windows overlap
GAUSSIAN_SIGMA = 1.0 / 8.0
_MIN_WEIGHT = 1e-3  # per axis: keeps pixels covered only by window rims defined


def prepare_model(model: torch.nn.Module, in_channels: int) -> torch.nn.Module:
    """A copy of ``model`` made faster for inference, giving the same outputs.

    Each convolution followed by a plain batch norm is folded into one convolution (in eval
    mode the norm is a fixed affine map; this saves about a fifth of a resnet18 UNet's CPU
    time), in channels-last memory layout. The fold pairs modules in registration order, so it
    is checked on a random input: if the outputs differ, the unfolded copy is used.

    Args:
        model: the network, on its device.
        in_channels: its input channels, for the check.

    Returns:
        A new module in eval mode; ``model`` itself is not changed.
    """
    import torch

    plain = copy.deepcopy(model).eval().to(memory_format=torch.channels_last)
    folded = copy.deepcopy(plain)
    _fold_batchnorm(folded)
    device = next(plain.parameters()).device
    x = torch.randn((1, in_channels, 64, 64), generator=torch.Generator().manual_seed(0))
    x = x.to(device).contiguous(memory_format=torch.channels_last)
    with torch.inference_mode():
        want, got = plain(x).float(), folded(x).float()
    if torch.allclose(want, got, rtol=1e-3, atol=1e-4 * (1.0 + float(want.abs().max()))):
        return folded
    return plain


def _fold_batchnorm(module: torch.nn.Module) -> None:
    import torch
    from torch.nn.utils.fusion import fuse_conv_bn_eval

    children = list(module.named_children())
    for (name, child), (next_name, after) in itertools.pairwise(children):
        if (
            type(child) is torch.nn.Conv2d
            and type(after) is torch.nn.BatchNorm2d
            and after.num_features == child.out_channels
            and after.track_running_stats
        ):
            setattr(module, name, fuse_conv_bn_eval(child, after))
            setattr(module, next_name, torch.nn.Identity())
    for _, child in module.named_children():
        _fold_batchnorm(child)


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


@runtime_checkable
class Runner(Protocol):
    """A network behind one call, whatever runs it: a torch module (`TorchRunner`) or an
    onnxruntime session (`medseg.onnx_model.OnnxRunner`)."""

    @property
    def divisor(self) -> int:
        """Input height and width must be multiples of this (the encoder's output stride)."""
        ...

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        """(N, C, h, w) float32 windows -> (N, K, h, w) float32 class probabilities (sigmoid
        for K = 1, softmax over K > 1 classes)."""
        ...


def activate(logits: torch.Tensor) -> torch.Tensor:
    """Sigmoid for one output channel (binary), softmax over channels for several classes:
    (N, K, h, w) logits -> float32 probabilities. The exported ONNX model ends with it too."""
    import torch

    logits = logits.float()
    return torch.sigmoid(logits) if logits.shape[1] == 1 else torch.softmax(logits, dim=1)


def model_divisor(model: torch.nn.Module) -> int:
    """What the input sides must divide by: the smp encoder's output stride (2 to the power of
    its depth), 32 for a network without one."""
    stride = getattr(getattr(model, "encoder", None), "output_stride", None)
    return stride if isinstance(stride, int) and stride > 0 else 32


class TorchRunner:
    """A torch module as a `Runner`: windows to ``device`` in channels-last layout, bf16
    autocast on CUDA, probabilities back on the host.

    Args:
        model: network in eval mode on ``device``, (N, C, h, w) -> (N, K, h, w) logits.
        device: where it lives.
    """

    def __init__(self, model: torch.nn.Module, device: torch.device | str = "cpu") -> None:
        import torch

        self.model = model
        self.device = torch.device(device)
        self._divisor = model_divisor(model)

    @property
    def divisor(self) -> int:
        """See `Runner.divisor`."""
        return self._divisor

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        """See `Runner.probabilities`."""
        import torch

        x = torch.from_numpy(windows).to(self.device)
        x = x.contiguous(memory_format=torch.channels_last)
        cuda = self.device.type == "cuda"
        with (
            torch.inference_mode(),
            torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=cuda),
        ):
            return activate(self.model(x)).cpu().numpy()


def as_runner(model: torch.nn.Module | Runner, device: torch.device | str = "cpu") -> Runner:
    """``model`` itself where it is a `Runner`, else the torch module in a `TorchRunner`."""
    return model if isinstance(model, Runner) else TorchRunner(model, device)


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
    window: int = 512,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    blending: str = "gaussian",
    tta: bool = False,
) -> np.ndarray:
    """Class probabilities for every pixel of one image of any size.

    Steps: (1) zero-pad the image at the bottom and right to a multiple of the model's
    divisor (32 for a 5-level encoder); (2) cut it into windows of ``window`` pixels (the
    padded size where that is smaller) overlapping by ``overlap``; (3) run them ``batch_size``
    at a time, optionally with flips; (4) add each window's probabilities, weighted by
    `blend_weights`, and divide by the summed weights; (5) crop back to the image's size.

    Args:
        model: a `Runner`, or a torch network in eval mode, (B, C, h, w) -> (B, K, h, w)
            logits; K = 1 means binary (sigmoid), K > 1 means K classes with background as
            class 0 (softmax).
        image: (C, H, W) float32.
        window: window side, a multiple of 32.
        overlap: share of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass (times 4 with ``tta``).
        device: where a torch model lives (a `Runner` knows its own).
        blending: ``gaussian`` or ``constant``, see `blend_weights`.
        tta: average over the flipped images too.

    Returns:
        (K, H, W) float32 probabilities in [0, 1]; for K > 1 they sum to 1 over classes.
    """
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
    weight = blend_weights(win_h, win_w, blending)
    total: np.ndarray | None = None
    weight_sum = np.zeros((ph, pw), dtype=np.float32)
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i : i + batch_size]
        batch = np.stack([x[:, t : t + win_h, c0 : c0 + win_w] for t, c0 in chunk])
        probs = _window_probabilities(runner, batch, tta)
        if total is None:
            total = np.zeros((probs.shape[1], ph, pw), dtype=np.float32)
        for (t, c0), p in zip(chunk, probs, strict=True):
            total[:, t : t + win_h, c0 : c0 + win_w] += p * weight
            weight_sum[t : t + win_h, c0 : c0 + win_w] += weight
    assert total is not None
    return (total / weight_sum)[:, :h, :w]


def predict_probs(
    model: torch.nn.Module | Runner,
    image: np.ndarray,
    window: int = 512,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
    blending: str = "gaussian",
    tta: bool = False,
) -> np.ndarray:
    """Foreground probability of a binary model for every pixel: `predict_probabilities`
    of a model with one output channel, as (H, W) float32.

    Raises:
        ValueError: the model has more than one output channel (use `predict_probabilities`).
    """
    probs = predict_probabilities(
        model, image, window, overlap, batch_size, device, blending=blending, tta=tta
    )
    if probs.shape[0] != 1:
        raise ValueError(f"predict_probs needs a binary model, this one has {probs.shape[0]}")
    return probs[0]


def segment(probs: np.ndarray, threshold: float) -> np.ndarray:
    """Label map from class probabilities.

    Args:
        probs: (K, H, W) from `predict_probabilities`.
        threshold: for K = 1, foreground where the probability >= threshold; for K > 1 the
            most probable class wins (the threshold is not used).

    Returns:
        (H, W) uint8 labels: 0/1 for a binary model, 0..K-1 otherwise.
    """
    if probs.shape[0] == 1:
        return (probs[0] >= threshold).astype(np.uint8)
    return probs.argmax(axis=0).astype(np.uint8)


def predict_case(
    model: torch.nn.Module | Runner,
    image: np.ndarray,
    fov: np.ndarray,
    options: EvaluateConfig,
    device: torch.device | str = "cpu",
    out_fov: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one prepared case: the one way validation, evaluate and predict apply a model.

    Steps: (1) `predict_probabilities` at the model's resolution; (2) where the case was
    resized (``out_fov`` of another size), probabilities brought to the size of ``out_fov``
    (bilinear), so that scores are counted at the ground truth's resolution; (3) nothing claimed
    outside the FOV (probability 0, background 1); (4) `segment`, background outside the FOV
    even at threshold 0.

    Args:
        model: a `Runner` or a network in eval mode on ``device`` (e.g.
            `medseg.bundle.Bundle.model`).
        image: (C, h, w) float32 as `medseg.preprocess.prepare_image` gives it.
        fov: (h, w) bool field of view at the model's resolution.
        options: threshold, window, overlap, batch size, blending, tta.
        device: where the model lives.
        out_fov: (H, W) bool FOV at the output resolution; default ``fov``.

    Returns:
        (H, W) uint8 labels (0/1 for a binary model) and (K, H, W) float32 probabilities.
    """
    probs = predict_probabilities(
        model, image, options.window, options.overlap, options.batch_size, device,
        blending=options.blending, tta=options.tta,
    )  # fmt: skip
    inside = fov if out_fov is None else out_fov
    if probs.shape[1:] != inside.shape:
        probs = np.clip(resize_image(probs, inside.shape), 0.0, 1.0)
    probs[:, ~inside] = 0.0
    if probs.shape[0] > 1:
        probs[0, ~inside] = 1.0
    if isinstance(options.threshold, str):  # "auto" comes from the model bundle
        raise ValueError("threshold auto: call medseg.bundle.resolve_threshold first")
    labels = segment(probs, options.threshold)
    labels[~inside] = 0
    return labels, probs
