"""Losses for thin structures, counted only where ``valid`` (the FOV) is 1.

Every loss takes logits (B, C, H, W) and a target (B, 1, H, W): with C == 1 a sigmoid output
and a 0/1 target; with C > 1 a softmax over classes and the target holds class indices (0 the
background). The losses are built from sums over the batch (pooled, so patches without vessels
are harmless); ``allsum`` turns each sum into the sum over all processes of a distributed run, so
that N processes with N shares of a batch compute exactly the loss of one process over the whole
batch.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from medseg.config.sections import TrainConfig

AllSum = Callable[[torch.Tensor], torch.Tensor]


def _local(t: torch.Tensor) -> torch.Tensor:
    return t


def _probs_and_onehot(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Foreground probabilities and targets, (B, K, H, W) each, zero outside ``valid``.

    K = 1 for a sigmoid output; K = C - 1 (one per foreground class) for a softmax output.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        return torch.sigmoid(logits) * valid, target * valid
    prob = torch.softmax(logits, dim=1)[:, 1:]
    classes = torch.arange(1, logits.shape[1], device=logits.device).view(1, -1, 1, 1)
    onehot = (target == classes).to(prob.dtype)
    return prob * valid, onehot * valid


def soft_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    eps: float = 1.0,
    allsum: AllSum = _local,
) -> torch.Tensor:
    """1 - soft Dice over the whole batch; with several classes, the mean over foreground classes.

    Args:
        logits: (B, C, H, W) raw scores.
        target: (B, 1, H, W); 0/1 when C == 1, class indices when C > 1.
        valid: (B, 1, H, W) in {0, 1}; pixels with 0 are ignored.
        eps: smoothing added to numerator and denominator.
        allsum: sums over the processes of a distributed run (identity in one process).

    Returns:
        Scalar tensor in [0, 1].
    """
    prob, truth = _probs_and_onehot(logits, target, valid)
    dims = (0, 2, 3)
    inter = allsum((prob * truth).sum(dims))
    total = allsum(prob.sum(dims) + truth.sum(dims))
    return (1.0 - (2.0 * inter + eps) / (total + eps)).mean()


def masked_bce(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, allsum: AllSum = _local
) -> torch.Tensor:
    """Binary cross-entropy (C == 1) or cross-entropy (C > 1) with logits, averaged over valid
    pixels. Shapes as `soft_dice_loss`."""
    logits = logits.float()
    if logits.shape[1] == 1:
        per_pixel = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    else:
        per_pixel = F.cross_entropy(logits, target[:, 0].long(), reduction="none")[:, None]
    return allsum((per_pixel * valid).sum()) / allsum(valid.sum()).clamp_min(1.0)


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    bce_weight: float = 0.5,
    allsum: AllSum = _local,
) -> torch.Tensor:
    """``bce_weight * BCE + (1 - bce_weight) * (1 - Dice)``; shapes as `soft_dice_loss`."""
    return bce_weight * masked_bce(logits, target, valid, allsum) + (
        1.0 - bce_weight
    ) * soft_dice_loss(logits, target, valid, allsum=allsum)


def soft_erode(x: torch.Tensor) -> torch.Tensor:
    """Grey-level erosion by a 3x3 cross (min of the vertical and horizontal 3-neighbourhoods).

    Args:
        x: (B, K, H, W) in [0, 1]. Outside the image counts as absent, not as 0.
    """
    vertical = -F.max_pool2d(-x, (3, 1), stride=1, padding=(1, 0))
    horizontal = -F.max_pool2d(-x, (1, 3), stride=1, padding=(0, 1))
    return torch.minimum(vertical, horizontal)


def soft_dilate(x: torch.Tensor) -> torch.Tensor:
    """Grey-level dilation by a 3x3 square. Shapes as `soft_erode`."""
    return F.max_pool2d(x, 3, stride=1, padding=1)


def soft_skeleton(x: torch.Tensor, iters: int) -> torch.Tensor:
    """Differentiable skeleton by iterated soft opening (Shit et al., clDice, CVPR 2021).

    Each round keeps what an opening removes (the thin parts of the current shape), then erodes;
    ``iters`` should be about the largest structure radius in pixels. On a binary input this is
    the morphological skeleton by a cross; a 1-pixel-wide line is its own skeleton.

    Args:
        x: (B, K, H, W) in [0, 1].
        iters: number of erosions.

    Returns:
        (B, K, H, W) in [0, 1].
    """
    skel = F.relu(x - soft_dilate(soft_erode(x)))
    for _ in range(iters):
        x = soft_erode(x)
        delta = F.relu(x - soft_dilate(soft_erode(x)))
        skel = skel + F.relu(delta - skel * delta)
    return skel


def cldice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    valid: torch.Tensor,
    iters: int = 3,
    eps: float = 1.0,
    allsum: AllSum = _local,
) -> torch.Tensor:
    """1 - clDice: the harmonic mean of topology precision and topology sensitivity.

    Topology precision is the share of the predicted skeleton inside the true mask; topology
    sensitivity the share of the true skeleton inside the prediction. A prediction that covers
    the centre line of every vessel but is too thin or too thick still scores 0; a break in a
    vessel costs in proportion to the skeleton it cuts. With several classes, it is computed on
    the probability of any foreground class. Shapes as `soft_dice_loss`.
    """
    logits = logits.float()
    if logits.shape[1] == 1:
        pred, truth = torch.sigmoid(logits), target
    else:
        pred, truth = 1.0 - torch.softmax(logits, dim=1)[:, :1], (target > 0).to(logits.dtype)
    pred, truth = pred * valid, truth * valid
    skel_pred, skel_true = soft_skeleton(pred, iters), soft_skeleton(truth, iters)
    precision = (allsum((skel_pred * truth).sum()) + eps) / (allsum(skel_pred.sum()) + eps)
    sensitivity = (allsum((skel_true * pred).sum()) + eps) / (allsum(skel_true.sum()) + eps)
    return 1.0 - 2.0 * precision * sensitivity / (precision + sensitivity)


LossFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def _bce(bce_weight: float, cldice_iters: int, allsum: AllSum) -> LossFn:
    return lambda x, t, v: masked_bce(x, t, v, allsum)


def _dice(bce_weight: float, cldice_iters: int, allsum: AllSum) -> LossFn:
    return lambda x, t, v: soft_dice_loss(x, t, v, allsum=allsum)


def _bce_dice(bce_weight: float, cldice_iters: int, allsum: AllSum) -> LossFn:
    return lambda x, t, v: bce_dice_loss(x, t, v, bce_weight, allsum)


def _cldice(bce_weight: float, cldice_iters: int, allsum: AllSum) -> LossFn:
    return lambda x, t, v: cldice_loss(x, t, v, cldice_iters, allsum=allsum)


# train.loss: every name of `medseg.names.LOSSES` and the factory of its loss
LOSSES: dict[str, Callable[[float, int, AllSum], LossFn]] = {
    "bce": _bce,
    "dice": _dice,
    "bce_dice": _bce_dice,
    "cldice": _cldice,
}


def make_loss(
    name: str,
    *,
    bce_weight: float = 0.5,
    cldice_weight: float = 0.0,
    cldice_iters: int = 3,
    allsum: AllSum = _local,
) -> LossFn:
    """The training loss by name (``train.loss``), one of `LOSSES`: ``bce``, ``dice``,
    ``bce_dice`` or ``cldice``.

    With ``cldice_weight`` w > 0 the result is ``(1 - w) * loss + w * clDice``.

    Returns:
        ``loss(logits, target, valid) -> scalar``; shapes as `soft_dice_loss`.
    """
    if name not in LOSSES:
        raise ValueError(f"unknown loss {name!r}; known: {', '.join(LOSSES)}")
    first = LOSSES[name](bce_weight, cldice_iters, allsum)
    if cldice_weight == 0.0 or name == "cldice":
        return first

    def mixed(x: torch.Tensor, t: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        return (1.0 - cldice_weight) * first(x, t, v) + cldice_weight * cldice_loss(
            x, t, v, cldice_iters, allsum=allsum
        )

    return mixed


def loss_from_config(cfg: TrainConfig, allsum: AllSum = _local) -> LossFn:
    """The loss the ``train.loss``, ``bce_weight`` and ``cldice_*`` params describe."""
    return make_loss(
        cfg.loss, bce_weight=cfg.bce_weight, cldice_weight=cfg.cldice_weight,
        cldice_iters=cfg.cldice_iters, allsum=allsum,
    )  # fmt: skip
