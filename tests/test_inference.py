from __future__ import annotations

import numpy as np
import pytest
import torch

from medseg.inference import predict_probs, window_starts


class PixelModel(torch.nn.Module):
    """A 1x1 convolution: its output at a pixel depends on that pixel only."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 1, 1)
        torch.nn.init.constant_(self.conv.weight, 2.0)
        torch.nn.init.constant_(self.conv.bias, -1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        assert x.shape[-1] % 32 == 0 and x.shape[-2] % 32 == 0
        return self.conv(x)


@pytest.mark.parametrize(("size", "window", "stride"), [(100, 64, 48), (64, 64, 48), (10, 64, 48)])
def test_window_starts_cover_everything(size: int, window: int, stride: int):
    starts = window_starts(size, window, stride)
    covered = np.zeros(max(size, window), bool)
    for s in starts:
        covered[s : s + window] = True
    assert covered[:size].all() and starts[0] == 0


@pytest.mark.parametrize(("h", "w", "window"), [(70, 90, 32), (70, 90, 512), (33, 200, 64)])
def test_sliding_window_equals_direct_per_pixel_result(h: int, w: int, window: int):
    image = np.random.default_rng(0).normal(size=(1, h, w)).astype(np.float32)
    model = PixelModel().eval()
    probs = predict_probs(model, image, window=window, overlap=0.5, batch_size=3)
    assert probs.shape == (h, w) and probs.dtype == np.float32
    expected = 1 / (1 + np.exp(-(2 * image[0] - 1)))
    assert np.allclose(probs, expected, atol=1e-5)
