"""``medseg predict``: a trained model on new image files, with the pipeline's own readers,
preprocessing and inference.

What a model needs to travel: ``model.safetensors`` (weights), ``model.json`` (the network's
spec) and ``preprocess.json`` (the preprocess params it was trained with, written by the
preprocess stage), all in one folder.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from medseg.config import CONVERT_RECORD, ConvertConfig, EvaluateConfig, PreprocessConfig, parse
from medseg.convert import fov_from_image
from medseg.errors import MedsegError
from medseg.inference import predict_probabilities, prepare_model, segment
from medseg.io.images import IMAGE_SUFFIXES, binarize, read_image, source_format, write_png
from medseg.model import ModelSpec, build_model, resolve_device
from medseg.preprocess import RECORD, load_record, prepare_image

MODEL_FILE = "model.safetensors"
PROBABILITIES = "probabilities"
IN_CHANNELS = 1  # `prepare_image` gives one channel (green or grey)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Predictor:
    """A loaded model with what it needs to segment a new image."""

    model: torch.nn.Module
    spec: ModelSpec
    preprocess: PreprocessConfig
    device: torch.device
    convert: ConvertConfig | None = None  # None: a model whose convert params did not travel


def load_predictor(
    model: str | Path, device: str = "auto", preprocess: str | Path | None = None
) -> Predictor:
    """Load a trained model and its preprocess params, refusing any mismatch.

    Args:
        model: the weights file, or the folder holding ``model.safetensors``.
        device: ``auto``, ``cpu`` or ``cuda``.
        preprocess: the ``preprocess.json`` to use; default: the one beside the weights.

    Raises:
        MedsegError: a file is missing or unreadable, the spec does not fit the weights, or the
            model expects other input channels than the preprocessing gives.
    """
    path = Path(model)
    if path.is_dir():
        path = path / MODEL_FILE
    spec_path = path.with_suffix(".json")
    for needed in (path, spec_path):
        if not needed.is_file():
            raise MedsegError(
                f"--model: {needed} is missing; give the weights file of a trained model "
                f"(e.g. models/{MODEL_FILE}) with its {spec_path.name} beside it"
            )
    record = Path(preprocess) if preprocess is not None else path.parent / RECORD
    if not record.is_file():
        raise MedsegError(
            f"{record}: missing; the model's preprocess params are needed to prepare new "
            f"images the way it was trained. Copy data/processed/{RECORD} of the run that "
            f"trained it beside the weights, or pass --preprocess"
        )
    pre = load_record(record)
    spec = _read_spec(spec_path)
    if spec.in_channels != IN_CHANNELS:
        raise MedsegError(
            f"{spec_path}: the model takes {spec.in_channels} input channel(s) but the "
            f"preprocessing (preprocess.channel={pre.channel}) gives {IN_CHANNELS}; "
            "this model was not trained by this pipeline's preprocess stage"
        )
    if spec.classes < 1:
        raise MedsegError(f"{spec_path}: classes must be >= 1, got {spec.classes}")
    net = build_model(spec)
    state = _read_weights(path)
    try:
        net.load_state_dict(state)
    except RuntimeError as err:
        first = str(err).strip().splitlines()
        detail = " ".join(line.strip() for line in first[:3])
        raise MedsegError(
            f"{path}: the weights do not fit {spec_path.name} (arch {spec.arch}, encoder "
            f"{spec.encoder}, {spec.in_channels} channel(s) in, {spec.classes} class(es) out): "
            f"{detail}"
        ) from err
    dev = resolve_device(device)
    net = prepare_model(net.to(dev).eval(), spec.in_channels)
    return Predictor(net, spec, pre, dev, _convert_record(record.parent / CONVERT_RECORD))


def _convert_record(path: Path) -> ConvertConfig | None:
    """The convert params the model's training data went through, where they travelled with it."""
    if not path.is_file():
        log.warning(
            "%s: missing; DICOM files are read with their own window and images without --fov "
            "count whole", path
        )  # fmt: skip
        return None
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise MedsegError(f"{path}: not a readable convert record ({err})") from err
    return parse(ConvertConfig, raw, prefix="convert.", source=str(path))


def read_input(predictor: Predictor, path: Path) -> np.ndarray:
    """Read an input image as the convert stage read the model's training images (its DICOM
    window override included)."""
    cfg = predictor.convert
    window = None
    if cfg is not None and cfg.window_center is not None and cfg.window_width is not None:
        window = (cfg.window_center, cfg.window_width)
    return read_image(path, window=window)


def input_fov(
    predictor: Predictor, fov_path: Path | None, image: np.ndarray, path: Path
) -> np.ndarray:
    """The FOV of an input: its mask file, else made as convert made a missing one (from the
    image with the model's ``convert.fov_threshold`` and ``fov_erode``, or the whole image)."""
    if fov_path is not None or predictor.convert is None:
        return read_fov(fov_path, image.shape[:2])
    cfg = predictor.convert
    if cfg.fov_fallback != "threshold":
        return np.ones(image.shape[:2], dtype=bool)
    fov = fov_from_image(image, cfg.fov_threshold, cfg.fov_erode)
    if not fov.any():
        raise MedsegError(
            f"{path}: no pixel above the model's convert.fov_threshold ({cfg.fov_threshold} of "
            "full scale) to make a field of view from; give one with --fov"
        )
    return fov


def _read_spec(path: Path) -> ModelSpec:
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
        return ModelSpec(**raw)
    except (OSError, json.JSONDecodeError, TypeError) as err:
        raise MedsegError(f"{path}: not a valid model spec ({err})") from err


def _read_weights(path: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise MedsegError(f"{path}: not a readable safetensors weights file ({err})") from err


def collect_inputs(paths: list[str | Path]) -> list[Path]:
    """The image files named, folders expanded to their images (not recursive), in order.

    Raises:
        MedsegError: a path is missing, a file has an unsupported ending, a folder holds no
            image, or two inputs share a stem (their outputs would overwrite each other).
    """
    found: list[Path] = []
    for given in paths:
        p = Path(given)
        if p.is_dir():
            images = sorted(
                f for f in p.iterdir()
                if f.is_file() and not f.name.startswith(".")
                and f.suffix.lower() in IMAGE_SUFFIXES
            )  # fmt: skip
            if not images:
                raise MedsegError(
                    f"{p}: no images in this folder (looked for {', '.join(IMAGE_SUFFIXES)})"
                )
            found.extend(images)
        elif p.is_file():
            source_format(p)  # raises on an unsupported ending
            found.append(p)
        else:
            raise MedsegError(f"{p}: no such file or folder")
    unique = list(dict.fromkeys(f.resolve() for f in found))
    stems: dict[str, Path] = {}
    for f in unique:
        if f.stem in stems:
            raise MedsegError(
                f"{f} and {stems[f.stem]} share the name {f.stem!r}; their masks would overwrite "
                "each other in the output folder. Predict them in two runs"
            )
        stems[f.stem] = f
    return unique


def find_fov(fov: Path | None, image: Path, n_inputs: int) -> Path | None:
    """The field-of-view mask for ``image``: ``fov`` itself when it is a file (one input only),
    else the file in folder ``fov`` whose stem is the image's stem, or starts with it plus
    ``_`` (DRIVE: ``01_test_mask.gif`` for ``01_test.tif``).

    Raises:
        MedsegError: no matching or several matching masks.
    """
    if fov is None:
        return None
    if fov.is_file():
        if n_inputs != 1:
            raise MedsegError(f"--fov {fov}: a single mask file fits one input; give a folder")
        return fov
    if not fov.is_dir():
        raise MedsegError(f"--fov {fov}: no such file or folder")
    matches = [
        f for f in sorted(fov.iterdir())
        if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES
        and (f.stem == image.stem or f.stem.startswith(image.stem + "_"))
    ]  # fmt: skip
    exact = [f for f in matches if f.stem == image.stem]
    if len(exact) == 1:
        return exact[0]
    if len(matches) != 1:
        what = "no" if not matches else f"{len(matches)}"
        raise MedsegError(
            f"--fov {fov}: {what} mask(s) named {image.stem}.* or {image.stem}_*.* for {image}"
        )
    return matches[0]


def read_fov(path: Path | None, shape: tuple[int, int]) -> np.ndarray:
    """The FOV mask as (H, W) bool: the file's, or the whole image when ``path`` is None."""
    if path is None:
        return np.ones(shape, dtype=bool)
    fov = binarize(read_image(path))
    if fov.shape != shape:
        raise MedsegError(
            f"{path}: FOV mask is {fov.shape[1]}x{fov.shape[0]}, its image "
            f"{shape[1]}x{shape[0]} (width x height); they must match"
        )
    if not fov.any():
        raise MedsegError(f"{path}: the FOV mask is empty")
    return fov


def predict_image(
    predictor: Predictor, image: np.ndarray, fov: np.ndarray, options: EvaluateConfig
) -> tuple[np.ndarray, np.ndarray]:
    """Segment one image as the pipeline would.

    Args:
        predictor: from `load_predictor`.
        image: (H, W) or (H, W, 3) uint8/uint16, as `medseg.io.images.read_image` returns it.
        fov: (H, W) bool; nothing is predicted outside it.
        options: threshold, window, overlap, blending, tta, batch size.

    Returns:
        (H, W) uint8 labels (0/1 for a binary model) and (K, H, W) float32 probabilities.
    """
    x = prepare_image(image, fov, predictor.preprocess)
    probs = predict_probabilities(
        predictor.model, x, options.window, options.overlap, options.batch_size,
        predictor.device, blending=options.blending, tta=options.tta,
    )  # fmt: skip
    probs[:, ~fov] = 0.0
    if probs.shape[0] > 1:
        probs[0, ~fov] = 1.0
    labels = segment(probs, options.threshold)
    labels[~fov] = 0  # also at threshold 0
    return labels, probs


def predict_files(
    model: str | Path,
    inputs: list[str | Path],
    out: str | Path,
    options: EvaluateConfig,
    probabilities: bool = False,
    fov: str | Path | None = None,
    preprocess: str | Path | None = None,
) -> list[Path]:
    """Segment image files (DICOM, TIFF, PNG, GIF, JPEG, BMP) and write one mask per image.

    Writes ``out/<stem>.png``: 0/255 for a binary model, the class labels 0..K-1 otherwise;
    with ``probabilities``, ``out/probabilities/<stem>.png`` (16-bit, probability x 65535; one
    ``<stem>_class<k>.png`` per foreground class for K > 1). Every output is written first into
    a temporary folder and moved into ``out`` only when all images succeeded; other files in
    ``out`` are left alone.

    Args:
        model: weights file or its folder; see `load_predictor`.
        inputs: image files and folders of images.
        out: output folder, created if needed.
        options: inference settings (the ``evaluate`` params; its ``device`` is used).
        probabilities: also write probability maps.
        fov: a FOV mask file (one input) or folder of masks; default: the whole image.
        preprocess: ``preprocess.json`` to use instead of the one beside the model.

    Returns:
        The mask files written.

    Raises:
        MedsegError: bad model, input or FOV; nothing is written to ``out`` then.
    """
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise MedsegError(f"--out {out}: exists and is not a folder")
    files = collect_inputs(list(inputs))
    fov_dir = Path(fov) if fov is not None else None
    fovs = {f: find_fov(fov_dir, f, len(files)) for f in files}
    names = [Path(f"{f.stem}.png") for f in files]
    _refuse_overwriting_inputs(out, names, files, probabilities)
    predictor = load_predictor(model, options.device, preprocess)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    written: list[Path] = []
    try:
        if probabilities:
            (tmp / PROBABILITIES).mkdir()
        for path, name in tqdm(
            list(zip(files, names, strict=True)), desc="predict", unit="image", disable=None
        ):
            image = read_input(predictor, path)
            labels, probs = predict_image(
                predictor, image, input_fov(predictor, fovs[path], image, path), options
            )
            write_png(tmp / name, labels * 255 if probs.shape[0] == 1 else labels)
            written.append(name)
            if probabilities:
                for suffix, prob in _probability_maps(probs):
                    rel = Path(PROBABILITIES) / f"{path.stem}{suffix}.png"
                    write_png(tmp / rel, (np.clip(prob, 0, 1) * 65535.0 + 0.5).astype(np.uint16))
                    written.append(rel)
        (out / PROBABILITIES if probabilities else out).mkdir(parents=True, exist_ok=True)
        for rel in written:
            os.replace(tmp / rel, out / rel)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return [out / n for n in names]


def _probability_maps(probs: np.ndarray) -> list[tuple[str, np.ndarray]]:
    if probs.shape[0] == 1:
        return [("", probs[0])]
    return [(f"_class{k}", probs[k]) for k in range(1, probs.shape[0])]


def _refuse_overwriting_inputs(
    out: Path, names: list[Path], files: list[Path], probabilities: bool
) -> None:
    """Nothing the user had is lost: an output may not replace one of the inputs."""
    inputs = set(files)
    for name in names:
        targets = [out / name]
        if probabilities:
            targets.append(out / PROBABILITIES / name)
        for target in targets:
            if target.resolve() in inputs:
                raise MedsegError(
                    f"--out {out}: the mask {target} would overwrite the input image of that "
                    "name; choose another output folder"
                )
