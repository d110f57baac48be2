"""The segmentation network, built from params with segmentation-models-pytorch (its files:
`medseg.inference.bundle`)."""

from __future__ import annotations

from collections.abc import Callable

import segmentation_models_pytorch as smp
import torch

from medseg.errors import MedsegError
from medseg.names import ARCHS
from medseg.spec import ModelSpec

__all__ = ["build_model", "check_names", "resolve_device"]


def _per_block(channels: list[int]) -> dict:
    """Decoders with one width per block: the list sets the widths and the encoder depth."""
    return {"encoder_depth": len(channels), "decoder_channels": list(channels)}


def _one_width(channels: list[int]) -> dict:
    """Decoders with a single width: the first entry of ``decoder_channels``."""
    return {"decoder_channels": channels[0]}


def _fpn(channels: list[int]) -> dict:
    """FPN: pyramid and segmentation width both the first entry (GroupNorm: a multiple of 32)."""
    return {"decoder_pyramid_channels": channels[0], "decoder_segmentation_channels": channels[0]}


def _segformer(channels: list[int]) -> dict:
    return {"decoder_segmentation_channels": channels[0]}


def _no_width(channels: list[int]) -> dict:
    """Decoders without a width parameter: ``decoder_channels`` does not apply."""
    return {}


# Architecture name (``train.arch``, one of `medseg.names.ARCHS`) -> smp class and how
# ``train.decoder_channels`` maps onto it; one registry instead of an if-chain.
_ARCHS: dict[str, tuple[type[torch.nn.Module], Callable[[list[int]], dict]]] = {
    "unet": (smp.Unet, _per_block),
    "unetplusplus": (smp.UnetPlusPlus, _per_block),
    "manet": (smp.MAnet, _per_block),
    "linknet": (smp.Linknet, _no_width),
    "fpn": (smp.FPN, _fpn),
    "pspnet": (smp.PSPNet, _no_width),
    "deeplabv3": (smp.DeepLabV3, _one_width),
    "deeplabv3plus": (smp.DeepLabV3Plus, _one_width),
    "pan": (smp.PAN, _one_width),
    "upernet": (smp.UPerNet, _one_width),
    "segformer": (smp.Segformer, _segformer),
}


def build_model(spec: ModelSpec, encoder_weights: str | None = None) -> torch.nn.Module:
    """Build the network; logits out, shape (B, classes, H, W) for input (B, in_channels, H, W).

    Raises:
        MedsegError: unknown ``train.arch`` or ``train.encoder``, or pretrained weights that are
            not available offline.
    """
    check_names(spec.arch, spec.encoder)
    cls, decoder_kwargs = _ARCHS[spec.arch]
    try:
        return cls(
            encoder_name=spec.encoder,
            encoder_weights=encoder_weights,
            in_channels=spec.in_channels,
            classes=spec.classes,
            **decoder_kwargs(list(spec.decoder_channels)),
        )
    except (ValueError, KeyError, AssertionError, TypeError) as err:
        if encoder_weights is not None and "weights" in str(err):
            raise MedsegError(
                f"params: train.encoder_weights {encoder_weights!r} is not available for encoder "
                f"{spec.encoder}: {err}"
            ) from err
        raise MedsegError(
            f"params: cannot build {spec.arch} with encoder {spec.encoder} and decoder_channels "
            f"{list(spec.decoder_channels)}: {err}"
        ) from err
    except OSError as err:  # pretrained weights not downloadable offline
        raise MedsegError(
            f"params: train.encoder_weights {encoder_weights!r} could not be loaded ({err}); "
            "they are downloaded once and need network access; use null to train from scratch "
            "offline"
        ) from err


def check_names(arch: str, encoder: str) -> None:
    """Fail early, naming the parameter, on an unknown architecture or encoder.

    Raises:
        MedsegError: ``train.arch`` or ``train.encoder`` is not known.
    """
    if arch not in _ARCHS:
        raise MedsegError(f"params: train.arch {arch!r} is unknown; known: {', '.join(ARCHS)}")
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders:
        close = [e for e in encoders if encoder.split("_")[0][:4] in e][:8]
        raise MedsegError(
            f"params: train.encoder {encoder!r} is not a segmentation-models-pytorch encoder"
            + (f"; similar: {', '.join(close)}" if close else "")
        )


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else Apple's MPS when present, else CPU; ``cuda`` or
    ``mps`` without such a device is a user error. (MPS is untested on real hardware.)"""
    mps = torch.backends.mps.is_available()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "mps" if mps else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MedsegError("params: device is 'cuda' but no CUDA GPU is available; use 'auto'")
    if name == "mps" and not mps:
        raise MedsegError("params: device is 'mps' but no Apple MPS device is available; use auto")
    return torch.device(name)
