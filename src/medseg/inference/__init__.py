"""Inference: the runners (torch here, ONNX in `medseg.inference.onnx_model`), the sliding window,
the label space and the `Predictor` that puts them together. The same code serves validation,
evaluate, crossval and ``medseg predict``.

Nothing here imports torch at import time, so that an ONNX model predicts without it.
"""
