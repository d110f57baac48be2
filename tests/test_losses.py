from __future__ import annotations

import math

import pytest
import torch

from medseg.training.losses import (
    bce_dice_loss,
    cldice_loss,
    make_loss,
    masked_bce,
    soft_dice_loss,
    soft_skeleton,
)

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


# --- several classes: softmax and cross-entropy, the target holds class indices ---------------


def test_cross_entropy_by_hand():
    # 3 classes, logits 0 everywhere: every class has probability 1/3, CE = log 3 per pixel
    target = _t([0, 1, 2, 2])
    logits = torch.zeros(1, 3, 1, 4)
    assert masked_bce(logits, target, torch.ones_like(target)).item() == pytest.approx(math.log(3))
    # a confident, right pixel costs nothing; a pixel outside valid is not counted
    logits[0, 2, 0, 3] = BIG
    valid = _t([0, 1, 1, 1])
    expected = (math.log(3) * 2 + math.log(1 + 2 * math.exp(-BIG))) / 3
    assert masked_bce(logits, target, valid).item() == pytest.approx(expected, abs=1e-6)


def test_multiclass_dice_by_hand():
    # uniform softmax over 2 classes = probability 1/2 for the foreground class: as binary Dice
    target = _t([1, 1, 0, 0])
    two = soft_dice_loss(torch.zeros(1, 2, 1, 4), target, torch.ones_like(target))
    assert two.item() == pytest.approx(1 - 3 / 5)
    # 3 classes, perfect prediction of class 2 only; class 1 absent from truth and prediction:
    # its Dice is (0 + eps) / (0 + eps) = 1, so the mean loss is 0
    target = _t([2, 0, 2, 0])
    logits = torch.full((1, 3, 1, 4), -BIG)
    logits[0, 2] = torch.where(target[0, 0] == 2, BIG, -BIG)
    logits[0, 0] = torch.where(target[0, 0] == 0, BIG, -BIG)
    assert soft_dice_loss(logits, target, torch.ones_like(target)).item() == pytest.approx(
        0, abs=1e-6
    )


# --- clDice --------------------------------------------------------------------------------------


def _image(rows: list[str]) -> torch.Tensor:
    """A binary (1, 1, H, W) image from strings of '#' and '.'."""
    return torch.tensor([[c == "#" for c in r] for r in rows], dtype=torch.float32)[None, None]


BAR = [".........", "#########", "#########", "#########", "........."]
LINE = [".........", ".........", "#########", ".........", "........."]


def test_soft_skeleton_of_binary_shapes():
    # a one-pixel line is its own skeleton; a 3-pixel-wide bar thins to its centre line
    assert torch.equal(soft_skeleton(_image(LINE), 3), _image(LINE))
    assert torch.equal(soft_skeleton(_image(BAR), 3), _image(LINE))
    assert soft_skeleton(torch.zeros(1, 1, 5, 9), 3).sum() == 0


def _logits(image: torch.Tensor) -> torch.Tensor:
    return (image * 2 - 1) * BIG


def test_cldice_ignores_width_but_counts_breaks():
    bar, line, ones = _image(BAR), _image(LINE), torch.ones(1, 1, 5, 9)
    # the centre line inside the bar has the right topology: clDice 1 (plain Dice would not)
    assert cldice_loss(_logits(line), bar, ones).item() == pytest.approx(0, abs=1e-6)
    assert soft_dice_loss(_logits(line), bar, ones).item() > 0.4
    # break the predicted line: 3 of the 9 skeleton pixels of the truth are missed.
    # precision = (6 + 1) / (6 + 1) = 1 (eps = 1); sensitivity = (6 + 1) / (9 + 1) = 0.7
    broken = line.clone()
    broken[..., 3:6] = 0
    sens = 0.7
    expected = 1 - 2 * 1.0 * sens / (1.0 + sens)
    assert cldice_loss(_logits(broken), bar, ones).item() == pytest.approx(expected, abs=1e-6)


def test_cldice_counts_only_valid_pixels():
    bar, line = _image(BAR), _image(LINE)
    # a spurious predicted line in row 0, outside the FOV (row 0 invalid): it does not count
    pred = line.clone()
    pred[..., 0, :] = 1
    valid = torch.ones_like(bar)
    valid[..., 0, :] = 0
    assert cldice_loss(_logits(pred), bar, valid).item() == pytest.approx(0, abs=1e-6)
    # inside the FOV it lowers topology precision: 9 of 18 skeleton pixels in the truth
    prec = (9 + 1) / (18 + 1)
    expected = 1 - 2 * prec / (prec + 1)
    assert cldice_loss(_logits(pred), bar, torch.ones_like(bar)).item() == pytest.approx(
        expected, abs=1e-6
    )


@pytest.mark.parametrize("name", ["bce", "dice", "bce_dice", "cldice"])
def test_make_loss_by_name(name: str):
    target = _t([1, 1, 0, 0])
    logits, valid = torch.zeros_like(target), torch.ones_like(target)
    direct = {
        "bce": masked_bce(logits, target, valid),
        "dice": soft_dice_loss(logits, target, valid),
        "bce_dice": bce_dice_loss(logits, target, valid, 0.3),
        "cldice": cldice_loss(logits, target, valid, 2),
    }[name]
    loss = make_loss(name, bce_weight=0.3, cldice_iters=2)
    assert loss(logits, target, valid).item() == pytest.approx(direct.item())
    mixed = make_loss(name, bce_weight=0.3, cldice_weight=0.25, cldice_iters=2)
    cl = cldice_loss(logits, target, valid, 2).item()
    expected = direct.item() if name == "cldice" else 0.75 * direct.item() + 0.25 * cl
    assert mixed(logits, target, valid).item() == pytest.approx(expected)


def test_unknown_loss_name():
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        make_loss("focal")


def test_cldice_gradient_flows():
    logits = torch.zeros(1, 1, 16, 16, requires_grad=True)
    target = torch.zeros(1, 1, 16, 16)
    target[..., 7:9, :] = 1
    cldice_loss(logits, target, torch.ones_like(target)).backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
