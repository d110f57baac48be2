"""The network behind one call (`Runner`): a torch module (`TorchRunner`) here, an onnxruntime
session in `medseg.inference.onnx_model.OnnxRunner`; and a torch module made faster for inference.

torch is imported inside the functions that need it, so that an ONNX model predicts without it.
"""

from __future__ import annotations

import copy
import itertools
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np

if TYPE_CHECKING:
    import torch


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


@runtime_checkable
class Runner(Protocol):
    """A network behind one call, whatever runs it: a torch module (`TorchRunner`) or an
    onnxruntime session (`medseg.inference.onnx_model.OnnxRunner`)."""

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
