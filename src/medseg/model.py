"""The segmentation network, built from params with segmentation-models-pytorch, and its files."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import segmentation_models_pytorch as smp
import torch
from safetensors.torch import load_file, save_file

from medseg.config import TrainConfig
from medseg.errors import MedsegError

_ARCHS = {
    "unet": smp.Unet,
    "unetplusplus": smp.UnetPlusPlus,
}


@dataclass(frozen=True)
class ModelSpec:
    """Everything needed to rebuild the network; stored as JSON beside the weights."""

    arch: str
    encoder: str
    decoder_channels: list[int]
    in_channels: int
    classes: int

    @classmethod
    def from_config(cls, cfg: TrainConfig, in_channels: int) -> ModelSpec:
        """The spec described by the train params, for images with ``in_channels`` channels."""
        return cls(cfg.arch, cfg.encoder, list(cfg.decoder_channels), in_channels, cfg.classes)


def build_model(spec: ModelSpec, encoder_weights: str | None = None) -> torch.nn.Module:
    """Build the network; logits out, shape (B, classes, H, W) for input (B, in_channels, H, W).

    Raises:
        MedsegError: unknown ``train.arch`` or ``train.encoder``, or pretrained weights that are
            not available offline.
    """
    check_names(spec.arch, spec.encoder)
    try:
        return _ARCHS[spec.arch](
            encoder_name=spec.encoder,
            encoder_weights=encoder_weights,
            encoder_depth=len(spec.decoder_channels),
            decoder_channels=list(spec.decoder_channels),
            in_channels=spec.in_channels,
            classes=spec.classes,
        )
    except (ValueError, KeyError) as err:
        raise MedsegError(
            f"params: cannot build {spec.arch} with encoder {spec.encoder}: {err}"
        ) from err
    except OSError as err:  # pretrained weights not downloadable offline
        raise MedsegError(
            f"params: train.encoder_weights {encoder_weights!r} could not be loaded ({err}); "
            "use null to train from scratch offline"
        ) from err


def check_names(arch: str, encoder: str) -> None:
    """Fail early, naming the parameter, on an unknown architecture or encoder.

    Raises:
        MedsegError: ``train.arch`` or ``train.encoder`` is not known.
    """
    if arch not in _ARCHS:
        raise MedsegError(f"params: train.arch {arch!r} is unknown; known: {', '.join(_ARCHS)}")
    encoders = smp.encoders.get_encoder_names()
    if encoder not in encoders:
        close = [e for e in encoders if encoder.split("_")[0][:4] in e][:8]
        raise MedsegError(
            f"params: train.encoder {encoder!r} is not a segmentation-models-pytorch encoder"
            + (f"; similar: {', '.join(close)}" if close else "")
        )


def save_model(model: torch.nn.Module, spec: ModelSpec, path: str | Path) -> None:
    """Write ``path`` (safetensors weights) and ``path`` with ``.json`` ending (the spec)."""
    path = Path(path)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(path))
    path.with_suffix(".json").write_text(json.dumps(asdict(spec), indent=2) + "\n")


def load_model(
    path: str | Path, device: torch.device | str = "cpu"
) -> tuple[torch.nn.Module, ModelSpec]:
    """Rebuild a network saved by `save_model` and load its weights, in eval mode."""
    path = Path(path)
    spec_path = path.with_suffix(".json")
    if not path.is_file() or not spec_path.is_file():
        raise MedsegError(
            f"{path}: model weights or their {spec_path.name} are missing; train first"
        )
    spec = ModelSpec(**json.loads(spec_path.read_text()))
    model = build_model(spec)
    model.load_state_dict(load_file(str(path), device="cpu"))
    return model.to(device).eval(), spec


def resolve_device(name: str) -> torch.device:
    """``auto`` picks CUDA when present, else CPU; ``cuda`` without a GPU is a user error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise MedsegError("params: device is 'cuda' but no CUDA GPU is available; use 'auto'")
    return torch.device(name)
