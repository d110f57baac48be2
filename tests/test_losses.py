from __future__ import annotations

import math

import pytest
import torch

from medseg.losses import bce_dice_loss, masked_bce, soft_dice_loss

BIG = 20.0  # sigmoid(20) = 1 - 2e-9


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32).view(1, 1, 1, -1)


def test_perfect_prediction_has_zero_dice_loss():
    target = _t([1, 0, 1, 0])
    logits = (target * 2 - 1) * BIG
    assert soft_dice_loss(logits, target, torch.ones_like(target)).item() == pytest.approx(
        0, abs=1e-6
    )


def test_dice_by_hand():
    # probabilities 0.5 everywhere, 2 positives of 4: Dice = (2*1 + 1) / (2 + 2 + 1) = 0.6
    target = _t([1, 1, 0, 0])
    loss = soft_dice_loss(torch.zeros_like(target), target, torch.ones_like(target))
    assert loss.item() == pytest.approx(1 - 3 / 5)


def test_bce_by_hand_and_ignores_invalid_pixels():
    target = _t([1, 0, 1, 0])
    logits = _t([0.0, 0.0, -BIG, BIG])
    valid = _t([1, 1, 0, 0])  # the two badly wrong pixels are outside the FOV
    assert masked_bce(logits, target, valid).item() == pytest.approx(math.log(2))
    assert masked_bce(logits, target, torch.ones_like(valid)).item() > 5


def test_bce_dice_mixes_by_weight():
    target = _t([1, 1, 0, 0])
    logits, valid = torch.zeros_like(target), torch.ones_like(target)
    mix = bce_dice_loss(logits, target, valid, bce_weight=0.25).item()
    assert mix == pytest.approx(0.25 * math.log(2) + 0.75 * 0.4)


def test_gradient_flows():
    logits = torch.zeros(2, 1, 8, 8, requires_grad=True)
    target = (torch.rand(2, 1, 8, 8) > 0.5).float()
    bce_dice_loss(logits, target, torch.ones_like(target)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
