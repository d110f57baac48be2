"""``medseg export``: a trained bundle as one ONNX file that carries its records
(`medseg.inference.onnx_model`), checked against the torch model with onnxruntime before it is
written.

The network is exported as `medseg.inference.runners.prepare_model` leaves it (batch norms folded
into the convolutions) and ends with the activation, so the file maps an image to probabilities.
It is traced by torch's TorchScript-based exporter (``dynamo=False``): it needs nothing beyond
torch and onnx, works offline, and gives batch, height and width as dynamic axes.
"""

from __future__ import annotations

import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import numpy as np
import torch

from medseg import __version__
from medseg.errors import MedsegError
from medseg.inference.bundle import POSTPROCESS, THRESHOLD, Bundle, load_bundle
from medseg.inference.onnx_model import FORMAT, INPUT, OUTPUT, SUFFIX, require
from medseg.inference.postprocess import steps_record
from medseg.inference.runners import Runner, TorchRunner, activate, model_divisor
from medseg.inference.window import pad_to_multiple

FORMATS = ("onnx",)
OPSET = 17  # ONNX opset: onnxruntime >= 1.14 and TensorRT 8.6 read it
CHECK_SIZE = (584, 565)  # height, width of a DRIVE image: the size the export is checked at
TOLERANCE = 1e-4  # largest absolute difference of the probabilities an export may show


class _Probabilities(torch.nn.Module):
    """The network followed by its activation: (N, C, H, W) -> (N, K, H, W) probabilities."""

    def __init__(self, net: torch.nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return activate(self.net(x))


def export_onnx(
    model: str | Path, out: str | Path, preprocess: str | Path | None = None, opset: int = OPSET
) -> float:
    """Export a trained bundle to ``out`` (``.onnx``), checked before it is written.

    Steps: (1) load the bundle on the CPU (`medseg.inference.bundle.load_bundle`); (2) trace the
    network plus activation at a small size, with dynamic batch, height and width; (3) write the
    records into the file's ``metadata_props``; (4) load the file back through
    `load_bundle` and compare its probabilities with torch's on a DRIVE-sized image
    (`CHECK_SIZE`, padded as predict pads it), a size other than the traced one; (5) move it
    into place only when the largest difference is under `TOLERANCE`.

    Args:
        model: bundle folder or weights file.
        out: the ONNX file to write; replaced when it exists.
        preprocess: a ``preprocess.json`` to use instead of the bundle's.
        opset: ONNX opset version.

    Returns:
        The largest absolute difference of the probabilities, onnxruntime vs torch.

    Raises:
        MedsegError: a bad bundle, ``out`` not ending in ``.onnx``, onnx or onnxruntime not
            installed, a network that does not export, or an export that fails the check;
            nothing is written then.
    """
    out = Path(out)
    if out.suffix.lower() != SUFFIX:
        raise MedsegError(f"--out {out}: an ONNX model's file name ends in {SUFFIX}")
    if Path(model).suffix.lower() == SUFFIX:
        raise MedsegError(f"--model {model}: already an ONNX export; give the trained bundle")
    onnx = require("onnx")
    require("onnxruntime")
    bundle = load_bundle(model, "cpu", preprocess)
    assert isinstance(bundle.model, torch.nn.Module)
    divisor = model_divisor(bundle.model)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.stem}.tmp{SUFFIX}")
    try:
        _trace(bundle, divisor, tmp, opset)
        proto = onnx.load(str(tmp))
        proto.producer_name, proto.producer_version = "medseg", __version__
        proto.doc_string = (
            f"{bundle.spec.arch} {bundle.spec.encoder}: {INPUT} (N, C, H, W) float32, H and W "
            f"multiples of {divisor} -> {OUTPUT} (N, K, H, W) float32"
        )
        onnx.helper.set_model_props(proto, metadata(bundle, divisor))
        onnx.save(proto, str(tmp))
        diff = check_export(tmp, bundle, name=out)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return diff


def metadata(bundle: Bundle, divisor: int) -> dict[str, str]:
    """The ``metadata_props`` of an export: `medseg.inference.onnx_model.METADATA`, as JSON
    strings."""
    convert = asdict(bundle.convert) if bundle.convert is not None else None
    return {
        "medseg.format": FORMAT,
        "medseg.spec": json.dumps(asdict(bundle.spec)),
        "medseg.divisor": str(divisor),
        "medseg.preprocess": json.dumps(asdict(bundle.preprocess)),
        "medseg.convert": json.dumps(convert),
        "medseg.classes": json.dumps(list(bundle.classes)),
        THRESHOLD: json.dumps(bundle.threshold),
        POSTPROCESS: json.dumps(steps_record(bundle.postprocess)),
    }


def _trace(bundle: Bundle, divisor: int, path: Path, opset: int) -> None:
    assert isinstance(bundle.model, torch.nn.Module)
    net = _Probabilities(bundle.model).eval()
    example = torch.zeros((1, bundle.spec.in_channels, 4 * divisor, 4 * divisor))
    axes = {0: "batch", 2: "height", 3: "width"}
    try:
        with warnings.catch_warnings():
            # the TorchScript-based exporter is deprecated in favour of the dynamo one, which
            # needs onnxscript; this one is still shipped and exports these networks exactly
            warnings.simplefilter("ignore", DeprecationWarning)
            # `activate` asks the class count, a constant of the model; any size baked into
            # the trace by mistake is caught by `check_export` at another size
            warnings.simplefilter("ignore", torch.jit.TracerWarning)
            torch.onnx.export(
                net, (example,), str(path), dynamo=False, opset_version=opset,
                input_names=[INPUT], output_names=[OUTPUT],
                dynamic_axes={INPUT: axes, OUTPUT: axes},
            )  # fmt: skip
    except RuntimeError as err:  # an operator without an ONNX form
        detail = str(err).strip().splitlines()[0]
        raise MedsegError(
            f"{bundle.spec.arch} with encoder {bundle.spec.encoder} does not export to ONNX "
            f"opset {opset}: {detail}"
        ) from err


def check_export(
    path: Path, bundle: Bundle, size: tuple[int, int] | None = None, name: Path | None = None
) -> float:
    """Compare an export with its torch bundle on one seeded image of ``size`` (H, W; default
    `CHECK_SIZE`).

    The file is read back through `load_bundle` (so its metadata must give the same records)
    and both models see the image zero-padded to their divisor, as predict pads it. ``name``
    is the file errors name (default ``path``).

    Returns:
        The largest absolute difference of the probabilities.

    Raises:
        MedsegError: the records differ, or the difference is not under `TOLERANCE`.
    """
    exported = load_bundle(path, "cpu")
    records = ("spec", "preprocess", "classes", "convert", "postprocess")
    for record in records:
        if getattr(exported, record) != getattr(bundle, record):
            raise MedsegError(f"{name or path}: the exported {record} differs from the bundle's")
    assert isinstance(bundle.model, torch.nn.Module) and isinstance(exported.model, Runner)
    torch_runner = TorchRunner(bundle.model, "cpu")
    size = size or CHECK_SIZE
    rng = np.random.default_rng(0)
    image = rng.standard_normal((bundle.spec.in_channels, *size), dtype=np.float32)
    x = pad_to_multiple(image, torch_runner.divisor)[None]
    want = torch_runner.probabilities(x)
    got = exported.model.probabilities(x)
    diff = float(np.abs(got - want).max()) if got.shape == want.shape else float("inf")
    if not diff < TOLERANCE:
        raise MedsegError(
            f"{name or path}: onnxruntime and torch disagree on a {size[1]}x{size[0]} image "
            f"(largest probability difference {diff:.3g}, allowed {TOLERANCE:g}); not written"
        )
    return diff
