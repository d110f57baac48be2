"""Whole-image inference: sliding windows with constant blending, padding and cropping back."""

from __future__ import annotations

import numpy as np
import torch


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of ``window`` pixels covering ``size`` pixels at ``stride``."""
    if size <= window:
        return [0]
    starts = list(range(0, size - window, stride))
    return [*starts, size - window]


@torch.no_grad()
def predict_probs(
    model: torch.nn.Module,
    image: np.ndarray,
    window: int = 512,
    overlap: float = 0.25,
    batch_size: int = 4,
    device: torch.device | str = "cpu",
) -> np.ndarray:
    """Foreground probability for every pixel of one image.

    The image is padded (zeros) to a multiple of 32 and at least one window, cut into windows of
    ``window`` pixels overlapping by ``overlap``, run in batches, and the overlapping predictions
    are averaged before cropping back.

    Args:
        model: binary network, (B, C, h, w) -> (B, 1, h, w) logits, in eval mode.
        image: (C, H, W) float32.
        window: window side, a multiple of 32.
        overlap: share of a window shared with its neighbour, in [0, 1).
        batch_size: windows per forward pass.
        device: where the model lives.

    Returns:
        (H, W) float32 probabilities in [0, 1].
    """
    c, h, w = image.shape
    ph, pw = -(-h // 32) * 32, -(-w // 32) * 32
    win_h, win_w = min(window, ph), min(window, pw)
    x = torch.zeros((c, ph, pw), dtype=torch.float32)
    x[:, :h, :w] = torch.from_numpy(image)
    stride_h = max(1, int(win_h * (1.0 - overlap)))
    stride_w = max(1, int(win_w * (1.0 - overlap)))
    tiles = [
        (top, left)
        for top in window_starts(ph, win_h, stride_h)
        for left in window_starts(pw, win_w, stride_w)
    ]
    total = torch.zeros((ph, pw), dtype=torch.float32)
    count = torch.zeros((ph, pw), dtype=torch.float32)
    device = torch.device(device)
    for i in range(0, len(tiles), batch_size):
        chunk = tiles[i : i + batch_size]
        batch = torch.stack([x[:, t : t + win_h, c0 : c0 + win_w] for t, c0 in chunk]).to(device)
        batch = batch.contiguous(memory_format=torch.channels_last)
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            logits = model(batch)
        probs = torch.sigmoid(logits.float())[:, 0].cpu()
        for (t, c0), p in zip(chunk, probs, strict=True):
            total[t : t + win_h, c0 : c0 + win_w] += p
            count[t : t + win_h, c0 : c0 + win_w] += 1.0
    return (total / count)[:h, :w].numpy()
