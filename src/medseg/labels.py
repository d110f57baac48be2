"""What a model's output channels mean (nnU-Net's label manager): binary (one channel, sigmoid,
foreground at a threshold) or K named classes (softmax, the most probable class wins). Every
rule that depends on it lives here: activation, segmentation, the foreground probability, what
is claimed outside the field of view, and how masks and probability maps are written."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from medseg.preprocess.processed import BINARY  # the names of a data set without data.classes


@dataclass(frozen=True)
class LabelSpace:
    """The labels of a model with ``channels`` outputs.

    Attributes:
        channels: output channels: 1 (binary, sigmoid) or K > 1 (softmax, class 0 the
            background).
        names: label names in label order, background first (``max(channels, 2)`` of them).
    """

    channels: int
    names: tuple[str, ...]

    @classmethod
    def of(cls, channels: int, names: Sequence[str] | None = None) -> LabelSpace:
        """The label space of a model with ``channels`` outputs; ``names`` default to
        ``background, foreground`` (binary) or ``background, class_1, ...``.

        Raises:
            ValueError: ``names`` has not ``max(channels, 2)`` entries.
        """
        if names is None:
            others = (f"class_{k}" for k in range(1, channels))
            names = BINARY if channels == 1 else ("background", *others)
        if len(names) != max(channels, 2):
            raise ValueError(f"{channels} output channel(s) need {max(channels, 2)} names: {names}")
        return cls(channels, tuple(names))

    @property
    def binary(self) -> bool:
        """One output channel: a sigmoid, thresholded."""
        return self.channels == 1

    @property
    def activation(self) -> str:
        """``sigmoid`` (binary) or ``softmax`` (over the classes)."""
        return "sigmoid" if self.binary else "softmax"

    @property
    def named(self) -> bool:
        """Whether results are reported per class by name: several classes, or a binary model
        whose foreground has a name of the data set's own (``data.classes``)."""
        return not self.binary or self.names != BINARY

    @property
    def foreground_labels(self) -> list[int]:
        """The labels scored: ``[1]`` (binary) or ``1 .. K-1``."""
        return [1] if self.binary else list(range(1, self.channels))

    def class_probability(self, probs: np.ndarray, k: int) -> np.ndarray:
        """(K, H, W) probabilities -> (H, W) those of label ``k`` (one of `foreground_labels`)."""
        return probs[0] if self.binary else probs[k]

    def foreground(self, probs: np.ndarray) -> np.ndarray:
        """(K, H, W) probabilities -> (H, W) float32 probability of any foreground (for K > 1:
        1 - the background's)."""
        return probs[0] if self.binary else 1.0 - probs[0]

    def clear_outside(self, probs: np.ndarray, inside: np.ndarray) -> None:
        """Claim nothing outside the FOV, in place: probability 0, the background's 1.

        Args:
            probs: (K, H, W) float32.
            inside: (H, W) bool.
        """
        probs[:, ~inside] = 0.0
        if not self.binary:
            probs[0, ~inside] = 1.0

    def segment(
        self, probs: np.ndarray, threshold: float, inside: np.ndarray | None = None
    ) -> np.ndarray:
        """Label map from class probabilities.

        Args:
            probs: (K, H, W) float32.
            threshold: binary: foreground where the probability >= threshold; for K > 1 the
                most probable class wins (the threshold is not used).
            inside: (H, W) bool FOV; background outside it (even at threshold 0).

        Returns:
            (H, W) uint8 labels: 0/1 for a binary model, 0..K-1 otherwise.
        """
        if self.binary:
            labels = (probs[0] >= threshold).astype(np.uint8)
        else:
            labels = probs.argmax(axis=0).astype(np.uint8)
        if inside is not None:
            labels[~inside] = 0
        return labels

    def mask_image(self, labels: np.ndarray) -> np.ndarray:
        """(H, W) uint8 labels as a mask file holds them: 0/255 binary, the labels otherwise."""
        return labels * 255 if self.binary else labels

    @property
    def map_suffixes(self) -> list[str]:
        """The file-name suffixes of the probability maps a prediction writes: ``""`` for the
        foreground (binary), ``_class<k>`` per foreground class otherwise."""
        return [""] if self.binary else [f"_class{k}" for k in self.foreground_labels]

    def probability_maps(self, probs: np.ndarray) -> list[tuple[str, np.ndarray]]:
        """(K, H, W) probabilities -> the (H, W) maps a prediction writes, with their
        `map_suffixes`."""
        return [
            (suffix, self.class_probability(probs, k))
            for suffix, k in zip(self.map_suffixes, self.foreground_labels, strict=True)
        ]


def to_uint8(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] to an 8-bit grey image (x 255, rounded)."""
    return (np.clip(prob, 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_uint16(prob: np.ndarray) -> np.ndarray:
    """Probabilities in [0, 1] to a 16-bit grey image (x 65535, rounded)."""
    return (np.clip(prob, 0.0, 1.0) * 65535.0 + 0.5).astype(np.uint16)
