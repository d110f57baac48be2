"""The one object that applies a model (nnU-Net's predictor): built once from its runners, the
window settings, a threshold resolved to a number and the post-processing chosen on validation,
then called case by case. Validation, evaluate, crossval and ``medseg predict`` all go through
it; an ensemble of crossval folds is a predictor with several runners (the mean of their
probabilities)."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import numpy as np

from medseg.errors import MedsegError
from medseg.inference.postprocess import Steps, apply
from medseg.inference.runners import Runner, as_runner
from medseg.inference.window import (
    WindowSettings,
    predict_probabilities,
    predict_probabilities_many,
)
from medseg.labels import LabelSpace
from medseg.preprocess.transforms import resize_image

log = logging.getLogger(__name__)


class Bundle(Protocol):
    """What the predictor needs of a loaded model (`medseg.inference.bundle.Bundle` has it); a
    protocol, so that the bundle loader may use the inference package without an import cycle."""

    @property
    def model(self) -> Any: ...

    @property
    def device(self) -> Any: ...

    @property
    def labels(self) -> LabelSpace: ...

    @property
    def threshold(self) -> float | None: ...

    @property
    def postprocess(self) -> Steps: ...


def shared_postprocess(bundles: Sequence[Bundle]) -> Steps:
    """The post-processing of an ensemble: the bundles' own where they all hold the same, else
    none (each was chosen for one model's errors, not for their mean), with a warning."""
    first = bundles[0].postprocess
    if all(b.postprocess == first for b in bundles[1:]):
        return first
    log.warning(
        "the models of the ensemble chose different post-processing (%s); the ensemble applies "
        "none", "; ".join(str(b.postprocess or "none") for b in bundles),
    )  # fmt: skip
    return {}


UNUSED_THRESHOLD = 0.5  # what a model with several classes reports as its (unused) threshold


def resolve_threshold(
    threshold: float | str, bundles: Sequence[Bundle], fallback: float | None = None
) -> float:
    """The threshold as a number: a number stays; ``auto`` is the mean of the bundles'
    stored validation thresholds (`medseg.inference.bundle.THRESHOLD`; one bundle: its own).

    A bundle without one counts as ``fallback`` where that is given, as `UNUSED_THRESHOLD` for
    a model with several classes (it does not use one).

    Raises:
        MedsegError: ``auto`` for a binary model trained without a validation split, and no
            ``fallback``.
    """
    if not isinstance(threshold, str):
        return threshold
    values = []
    for bundle in bundles:
        if bundle.threshold is not None:
            values.append(bundle.threshold)
        elif fallback is not None:
            log.info("the model has no validation threshold: threshold %s", fallback)
            values.append(fallback)
        elif bundle.labels.binary:
            raise MedsegError(
                "params: evaluate.threshold is auto, but the model's weights hold no validation "
                "threshold (trained without a validation split); set a number such as 0.5"
            )
        else:
            values.append(UNUSED_THRESHOLD)
    return float(np.mean(values))


class Predictor:
    """Segments prepared cases with one model or the mean of several.

    Args:
        runners: the models (`medseg.inference.runners.Runner`), all with the label space
            ``labels``.
        labels: what their output channels mean.
        threshold: the binary foreground threshold, a number (see `resolve_threshold`).
        settings: the sliding window's; default `WindowSettings()`.
        postprocess: class label -> operation specs applied to the labels
            (`medseg.inference.postprocess.apply`); default none (validation during training scores
            the raw labels).
    """

    def __init__(
        self, runners: Sequence[Runner], labels: LabelSpace, threshold: float,
        settings: WindowSettings | None = None,
        postprocess: Mapping[int, Sequence[Mapping[str, object]]] | None = None,
    ) -> None:  # fmt: skip
        if not runners:
            raise ValueError("a predictor needs at least one runner")
        if isinstance(threshold, str):
            raise ValueError(f"threshold {threshold!r}: resolve it first (resolve_threshold)")
        self.runners = list(runners)
        self.labels = labels
        self.threshold = threshold
        self.settings = settings or WindowSettings()
        self.postprocess: Steps = {k: [dict(s) for s in v] for k, v in (postprocess or {}).items()}

    @classmethod
    def from_bundles(
        cls, bundles: Sequence[Bundle], settings: WindowSettings, threshold: float | str,
        fallback: float | None = None,
    ) -> Predictor:  # fmt: skip
        """The predictor of one loaded bundle, or the ensemble of several (crossval's folds);
        ``threshold`` and ``fallback`` as `resolve_threshold` takes them, the post-processing
        that of the bundles (`shared_postprocess`).

        Raises:
            MedsegError: the bundles differ in their label spaces, or `resolve_threshold`'s.
        """
        spaces = list(dict.fromkeys(b.labels for b in bundles))
        if len(spaces) > 1:
            shown = "; ".join(f"{s.channels} output(s) {', '.join(s.names)}" for s in spaces)
            raise MedsegError(
                f"the models of an ensemble must have the same outputs and classes, these have: "
                f"{shown}; train every fold with the same train.classes"
            )
        runners = [as_runner(b.model, b.device) for b in bundles]
        value = resolve_threshold(threshold, bundles, fallback)
        return cls(runners, bundles[0].labels, value, settings, shared_postprocess(bundles))

    def member_probabilities(
        self, image: np.ndarray, fov: np.ndarray, out_fov: np.ndarray | None = None
    ) -> list[np.ndarray]:
        """Each runner's probabilities for one case, as `predict` uses them.

        Steps, per runner: (1) `predict_probabilities` at the model's resolution; (2) where
        the case was resized (``out_fov`` of another size), brought to the size of ``out_fov``
        (bilinear), so that scores are counted at the ground truth's resolution; (3) nothing
        claimed outside the FOV (`LabelSpace.clear_outside`).

        Args:
            image: (C, h, w) float32 as `medseg.preprocess.dataset.prepare_image` gives it.
            fov: (h, w) bool field of view at the model's resolution.
            out_fov: (H, W) bool FOV at the output resolution; default ``fov``.

        Returns:
            One (K, H, W) float32 array per runner.

        Raises:
            ValueError: a runner's output channels do not fit the label space.
        """
        inside = fov if out_fov is None else out_fov
        members = []
        for runner in self.runners:
            members.append(
                self._finish(predict_probabilities(runner, image, self.settings), inside)
            )
        return members

    @staticmethod
    def mean(members: Sequence[np.ndarray]) -> np.ndarray:
        """The ensemble's probabilities: the mean of the members' (summed in float64), as
        float32; a single member as it is."""
        if len(members) == 1:
            return members[0]
        total = members[0].astype(np.float64)
        for probs in members[1:]:
            total = total + probs
        return (total / len(members)).astype(np.float32)

    def segment(self, probs: np.ndarray, inside: np.ndarray) -> np.ndarray:
        """(K, H, W) probabilities -> (H, W) uint8 labels at this predictor's threshold,
        background outside ``inside`` (`LabelSpace.segment`), then its post-processing
        (`medseg.inference.postprocess.apply`; a filled hole never reaches outside ``inside``)."""
        labels = self.labels.segment(probs, self.threshold, inside)
        if not self.postprocess:
            return labels
        labels = apply(labels, self.postprocess)
        labels[~inside] = 0
        return labels

    def predict_volume(
        self, images: Sequence[np.ndarray], fovs: Sequence[np.ndarray],
        out_fovs: Sequence[np.ndarray],
    ) -> tuple[np.ndarray, np.ndarray]:  # fmt: skip
        """Segment a volume, its slices prepared as cases (`medseg.preprocess.transforms.
        prepare_slice`): the slices' probabilities as `member_probabilities` gives them (small
        slices many to a forward pass, `predict_probabilities_many`), stacked, labelled, and the
        post-processing applied to the volume as a whole (in 3D).

        Args:
            images: per slice, (C, h, w) float32 model input.
            fovs: per slice, (h, w) bool FOV at the model's resolution.
            out_fovs: per slice, (H, W) bool FOV at the output resolution.

        Returns:
            (Z, H, W) uint8 labels and (K, Z, H, W) float32 probabilities.
        """
        per_runner = []
        for runner in self.runners:
            raw = predict_probabilities_many(runner, list(images), self.settings)
            per_runner.append([self._finish(p, out) for p, out in zip(raw, out_fovs, strict=True)])
        slices = [self.mean([member[z] for member in per_runner]) for z in range(len(images))]
        probs = np.stack(slices, axis=1)
        inside = np.stack(out_fovs)
        labels = np.stack(
            [
                self.labels.segment(p, self.threshold, f)
                for p, f in zip(slices, out_fovs, strict=True)
            ]
        )
        if self.postprocess:
            labels = apply(labels, self.postprocess)
            labels[~inside] = 0
        return labels, probs

    def _finish(self, probs: np.ndarray, inside: np.ndarray) -> np.ndarray:
        """One runner's probabilities checked, at the output size, nothing outside ``inside``."""
        if probs.shape[0] != self.labels.channels:
            kind = "binary" if self.labels.binary else f"{self.labels.channels} classes"
            raise ValueError(
                f"the model gives {probs.shape[0]} channel(s); its label space ({kind}) "
                f"needs {self.labels.channels}"
            )
        if probs.shape[1:] != inside.shape:
            probs = np.clip(resize_image(probs, inside.shape), 0.0, 1.0)
        self.labels.clear_outside(probs, inside)
        return probs

    def predict(
        self, image: np.ndarray, fov: np.ndarray, out_fov: np.ndarray | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Segment one prepared case: `member_probabilities`, their `mean`, `segment`.

        Returns:
            (H, W) uint8 labels (0/1 for a binary model) and (K, H, W) float32 probabilities,
            at the size of ``out_fov`` (default ``fov``).
        """
        probs = self.mean(self.member_probabilities(image, fov, out_fov))
        return self.segment(probs, fov if out_fov is None else out_fov), probs
