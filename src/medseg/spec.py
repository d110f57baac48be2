"""The network's spec: what rebuilds it (`medseg.model.build_model`) and what a saved model
declares about itself. Torch-free, so that an exported ONNX model is described and served
without importing torch."""

from __future__ import annotations

from dataclasses import dataclass

from medseg.config.sections import TrainConfig

__all__ = ["ModelSpec"]


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
