"""Post-processing chosen after training, for the model bundle.

The best epoch's weights predict every validation case through the one predictor
(`medseg.inference.predictor.Predictor`, at validation's window settings and the best validation
threshold, without post-processing), at the ground truth's resolution: the candidates' sizes
(``drop_small``'s ``min_size``) are pixels of the converted images.
`medseg.inference.postprocess.choose` then keeps, class by class, each candidate of
``train.postprocess`` that raises the pooled validation Dice; the train stage records what it kept
in the bundle (`medseg.inference.bundle.POSTPROCESS`).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from medseg.inference.postprocess import Choice, Steps, choose
from medseg.inference.predictor import Predictor
from medseg.inference.runners import TorchRunner, prepare_model
from medseg.io.shards import CaseStore
from medseg.labels import LabelSpace
from medseg.model import build_model
from medseg.preprocess.processed import read_case
from medseg.spec import ModelSpec
from medseg.training.validation import VALIDATION_THRESHOLD

log = logging.getLogger(__name__)


def choose_for_bundle(
    candidates: Sequence[Mapping[str, object]],
    spec: ModelSpec,
    state: Mapping[str, torch.Tensor],
    val: CaseStore,
    device: torch.device,
    labels: LabelSpace,
    threshold: float | None,
) -> Steps:
    """The post-processing the train stage records for the weights ``state``: `best_predictor`,
    then `choose_postprocess`; empty without candidates or validation cases.

    Args:
        candidates: operation specs to try, in order (``train.postprocess``).
        spec, state, device, labels, threshold: as `best_predictor` takes them.
        val: the validation cases.
    """
    if not candidates or not len(val):
        return {}
    predictor = best_predictor(spec, state, device, labels, threshold)
    return choose_postprocess(candidates, predictor, val)


def best_predictor(
    spec: ModelSpec,
    state: Mapping[str, torch.Tensor],
    device: torch.device,
    labels: LabelSpace,
    threshold: float | None,
) -> Predictor:
    """The predictor evaluate will build from the bundle, without its post-processing: the
    network of ``spec`` with the weights ``state`` prepared as `medseg.inference.bundle.load_bundle`
    prepares it, at validation's window settings.

    Args:
        spec: the network's spec; ``state``: its weights (the best epoch's).
        device: where to predict.
        labels: what its output channels mean.
        threshold: the best validation threshold (binary); None: `VALIDATION_THRESHOLD`.
    """
    net = build_model(spec)
    net.load_state_dict(dict(state))
    model = prepare_model(net.to(device).eval(), spec.in_channels)
    value = VALIDATION_THRESHOLD if threshold is None else threshold
    return Predictor([TorchRunner(model, device)], labels, value)


def choose_postprocess(
    candidates: Sequence[Mapping[str, object]], predictor: Predictor, val: CaseStore
) -> Steps:
    """Per class, the candidates that raise the Dice of ``predictor``'s labels pooled over the
    validation cases (`medseg.inference.postprocess.choose`); each candidate tried is logged.

    Returns:
        Class label -> the operation specs kept (classes where none helped left out).
    """
    cases = validation_predictions(predictor, val)
    labels = predictor.labels
    choice = choose(cases, candidates, labels.foreground_labels, predictor.threshold)
    log_choice(choice, labels)
    return {k: v for k, v in choice.steps.items() if v}


def validation_predictions(
    predictor: Predictor, val: CaseStore
) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """Every validation case predicted at its ground truth's resolution.

    Returns:
        Per case: (H, W) uint8 predicted labels, (H, W) truth labels, (H, W) bool FOV, as
        `medseg.inference.postprocess.choose` takes them. The truths are views into the case store,
        so memory holds the predictions only.
    """
    cases = []
    for i in val:
        case = read_case(val, i)
        pred, _ = predictor.predict(case.image, case.fov, out_fov=case.truth_fov)
        cases.append((pred, case.truth, case.truth_fov))
        val.release(i)
    return cases


def log_choice(choice: Choice, labels: LabelSpace) -> None:
    """One INFO line per candidate tried and class, then what was kept."""
    for k, lines in choice.tried.items():
        for line in lines:
            log.info("post-processing of %s: %s", labels.names[k], line)
    kept = {labels.names[k]: steps for k, steps in choice.steps.items() if steps}
    log.info("post-processing kept for the bundle: %s", kept or "none")
