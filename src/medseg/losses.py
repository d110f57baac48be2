"""Losses for thin structures, counted only where ``valid`` (the FOV) is 1."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def soft_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, eps: float = 1.0
) -> torch.Tensor:
    """1 - soft Dice over the whole batch (pooled, so patches without vessels are harmless).

    Args:
        logits: (B, 1, H, W) raw scores.
        target: (B, 1, H, W) in {0, 1}.
        valid: (B, 1, H, W) in {0, 1}; pixels with 0 are ignored.
        eps: smoothing added to numerator and denominator.

    Returns:
        Scalar tensor in [0, 1].
    """
    prob = torch.sigmoid(logits.float()) * valid
    target = target * valid
    inter = (prob * target).sum()
    return 1.0 - (2.0 * inter + eps) / (prob.sum() + target.sum() + eps)


def masked_bce(logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """Binary cross-entropy with logits, averaged over valid pixels. Shapes as `soft_dice_loss`."""
    per_pixel = F.binary_cross_entropy_with_logits(logits.float(), target, reduction="none")
    return (per_pixel * valid).sum() / valid.sum().clamp_min(1.0)


def bce_dice_loss(
    logits: torch.Tensor, target: torch.Tensor, valid: torch.Tensor, bce_weight: float = 0.5
) -> torch.Tensor:
    """``bce_weight * BCE + (1 - bce_weight) * (1 - Dice)``; shapes as `soft_dice_loss`."""
    return bce_weight * masked_bce(logits, target, valid) + (1.0 - bce_weight) * soft_dice_loss(
        logits, target, valid
    )
