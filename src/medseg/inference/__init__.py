"""Inference: the runners (torch here, ONNX in `medseg.onnx_model`), the sliding window, the
label space and the `Predictor` that puts them together. The same code serves validation,
evaluate, crossval and ``medseg predict``.

Nothing here imports torch at import time, so that an ONNX model predicts without it.
"""

from medseg.inference.predictor import Predictor, resolve_threshold
from medseg.inference.runners import (
    Runner,
    TorchRunner,
    activate,
    as_runner,
    model_divisor,
    prepare_model,
)
from medseg.inference.window import (
    BLENDINGS,
    WindowSettings,
    blend_weights,
    pad_to_multiple,
    predict_probabilities,
    window_starts,
)
from medseg.labels import LabelSpace, to_uint8, to_uint16

__all__ = [
    "BLENDINGS",
    "LabelSpace",
    "Predictor",
    "Runner",
    "TorchRunner",
    "WindowSettings",
    "activate",
    "as_runner",
    "blend_weights",
    "model_divisor",
    "pad_to_multiple",
    "predict_probabilities",
    "prepare_model",
    "resolve_threshold",
    "to_uint8",
    "to_uint16",
    "window_starts",
]
