"""Validation inside training: whole validation cases predicted and scored as evaluate does
(`medseg.inference.predictor.Predictor`, `medseg.scoring.tally.ScoreTally`), for the best epoch
and the threshold that ``evaluate.threshold: auto`` uses."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from medseg.inference.predictor import Predictor
from medseg.inference.runners import TorchRunner
from medseg.io.shards import CaseStore
from medseg.labels import LabelSpace
from medseg.preprocess.processed import read_case
from medseg.scoring.tally import ScoreTally


@dataclass(frozen=True)
class Validation:
    """Scores of one validation pass.

    Attributes:
        dice: pooled Dice at threshold 0.5 (binary) or of the most probable class.
        threshold: binary: the threshold on evaluate's grid
        (`medseg.scoring.tally.CURVE_POINTS`)
            with the best pooled Dice (``evaluate.threshold: auto``); None for several classes.
        threshold_dice: the pooled Dice at that threshold.
    """

    dice: float
    threshold: float | None = None
    threshold_dice: float | None = None


VALIDATION_THRESHOLD = 0.5  # validation scores as evaluate's defaults do


def validate(
    model: torch.nn.Module, val: CaseStore, device: torch.device, labels: LabelSpace
) -> Validation:
    """Dice inside the FOV, pooled over the whole validation cases (at the ground truth's
    resolution), predicted and scored as evaluate does (`medseg.inference.predictor.Predictor`
    at the default window settings, `medseg.scoring.tally.ScoreTally`); for several classes the
    mean over the foreground classes. A binary model also gets the threshold that maximises that
    Dice. The labels are scored raw: post-processing is chosen after training, for the best
    epoch (`medseg.training.postchoice`).

    Args:
        model: the network, (B, C, H, W) -> (B, K, H, W) logits.
        labels: what its K output channels mean.
    """
    model.eval()
    predictor = Predictor([TorchRunner(model, device)], labels, VALIDATION_THRESHOLD)
    tally = ScoreTally(labels.channels, list(labels.names), light=True)
    for i in val:
        case = read_case(val, i)
        pred, probs = predictor.predict(case.image, case.fov, out_fov=case.truth_fov)
        tally.add(case.case_id, probs, pred, case.truth, case.truth_fov)
        val.release(i)
    best = tally.best_threshold()
    return Validation(tally.pooled_dice(), *(best or ()))
