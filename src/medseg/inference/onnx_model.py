"""An exported model: the medseg metadata an ONNX file carries and the onnxruntime runner that
serves it (`medseg.inference.export` writes the file).

The file alone is a deployable model: one input ``image`` (N, C, H, W) float32, H and W
multiples of ``medseg.divisor``, one output ``probabilities`` (N, K, H, W) float32, and in its
``metadata_props`` the records a new image needs (`METADATA`). No torch here, so that
``medseg predict --model x.onnx`` runs without importing it.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from medseg.errors import MedsegError
from medseg.names import BUNDLE_FORMAT_KEY

SUFFIX = ".onnx"
EXTRA = "pip install 'medseg[onnx]'"  # what to install when onnx or onnxruntime is missing
INPUT, OUTPUT = "image", "probabilities"
FORMAT = "medseg-onnx/1"  # bumped when the layout below changes
# metadata_props keys -> what they hold (JSON unless said otherwise)
METADATA = {
    "medseg.format": f"the string {FORMAT}",
    BUNDLE_FORMAT_KEY: "the bundle format of its records, major.minor (medseg.names.BUNDLE_FORMAT)",
    "medseg.spec": "the network's spec (model.json of the bundle)",
    "medseg.divisor": "input height and width must be multiples of it (an integer)",
    "medseg.preprocess": "the preprocess params it was trained with (preprocess.json)",
    "medseg.convert": "the convert params of its training data (convert.json), or null",
    "medseg.classes": "class names in label order, background first",
    "medseg.threshold": "a binary model's best validation threshold (threshold auto), or null",
    "medseg.postprocess": "class label -> post-processing chosen on validation, {} for none",
}


def require(module: str) -> ModuleType:
    """Import ``onnx`` or ``onnxruntime``, or say which extra to install.

    Raises:
        MedsegError: the module is not installed.
    """
    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise MedsegError(f"ONNX models need the {module} package ({err}); {EXTRA}") from err


class OnnxRunner:
    """An onnxruntime session as a `medseg.inference.runners.Runner`.

    Args:
        session: an ``onnxruntime.InferenceSession`` of a medseg export.
        divisor: what its input sides must divide by.
    """

    def __init__(self, session: Any, divisor: int) -> None:
        self.session = session
        self._divisor = divisor

    @property
    def divisor(self) -> int:
        """See `medseg.inference.runners.Runner.divisor`."""
        return self._divisor

    def probabilities(self, windows: np.ndarray) -> np.ndarray:
        """(N, C, h, w) float32 windows -> (N, K, h, w) float32 probabilities."""
        x = np.ascontiguousarray(windows, dtype=np.float32)
        out: np.ndarray = self.session.run([OUTPUT], {INPUT: x})[0]
        return out


def providers(device: str) -> list[str]:
    """onnxruntime execution providers for ``auto``, ``cpu`` or ``cuda``.

    Raises:
        MedsegError: ``cuda`` with an onnxruntime that has no CUDA provider.
    """
    ort = require("onnxruntime")
    cuda = "CUDAExecutionProvider" in ort.get_available_providers()
    if device == "cuda" and not cuda:
        raise MedsegError(
            "--device cuda: this onnxruntime has no CUDA provider; install onnxruntime-gpu "
            "instead of onnxruntime, or use --device cpu"
        )
    if device == "cpu" or not cuda:
        return ["CPUExecutionProvider"]
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


def open_onnx(
    path: str | Path, device: str = "auto", threads: int | None = None
) -> tuple[OnnxRunner, dict[str, str]]:
    """Open a medseg ONNX export for inference.

    Args:
        path: the ``.onnx`` file.
        device: ``auto`` (CUDA where this onnxruntime has it), ``cpu`` or ``cuda``.
        threads: onnxruntime's intra-op threads; default: its own choice (physical cores).

    Returns:
        The runner and the file's ``metadata_props`` (`METADATA` keys among them).

    Raises:
        MedsegError: the file is missing, not an ONNX model, or not one medseg exported.
    """
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"--model: {path} is missing; give an exported .onnx file")
    ort = require("onnxruntime")
    options = ort.SessionOptions()
    if threads is not None:
        options.intra_op_num_threads = threads
    try:
        session = ort.InferenceSession(str(path), options, providers=providers(device))
    except MedsegError:
        raise
    except Exception as err:  # onnxruntime's error types live in its private pybind module
        detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise MedsegError(f"{path}: not a readable ONNX model ({detail})") from err
    meta = dict(session.get_modelmeta().custom_metadata_map)
    if meta.get("medseg.format") != FORMAT:
        raise MedsegError(
            f"{path}: an ONNX model, but not one exported by this medseg (its metadata has no "
            f"medseg.format {FORMAT}); export the trained model with `medseg export`"
        )
    names = ([i.name for i in session.get_inputs()], [o.name for o in session.get_outputs()])
    divisor = meta.get("medseg.divisor", "")
    if names != ([INPUT], [OUTPUT]) or not divisor.isdigit() or int(divisor) < 1:
        raise MedsegError(
            f"{path}: a damaged medseg export (inputs {names[0]}, outputs {names[1]}, divisor "
            f"{divisor!r}); export the model again"
        )
    return OnnxRunner(session, int(divisor)), meta
