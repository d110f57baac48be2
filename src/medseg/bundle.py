"""The model bundle: one folder that holds everything a trained model needs to segment a new image.

```
models/model.safetensors   weights of the best epoch        (last.safetensors: the last epoch)
models/model.json          the network's spec (`ModelSpec`)  (last.json)
models/preprocess.json     the preprocess params it was trained with
models/convert.json        the convert params its data went through (DICOM window, FOV fallback)
models/classes.json        the class names in label order, background first
```

The weights file of the best epoch of a binary model trained with a validation split also holds,
in its safetensors metadata (`THRESHOLD`), the threshold with the best validation Dice of those
weights: ``evaluate.threshold: auto`` and ``medseg predict`` use it.

`save_bundle` writes it (the train stage), `load_bundle` is the one way a saved model is
loaded: the evaluate stage and ``medseg predict`` go through it, and every mismatch is refused
naming the file. (Validation inside training scores the model in memory, through the same
`medseg.inference.predict_case`.)
"""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path
from typing import Any

import torch

from medseg.config import CONVERT_RECORD, ConvertConfig, EvaluateConfig, PreprocessConfig, parse
from medseg.errors import MedsegError
from medseg.inference import prepare_model
from medseg.model import ModelSpec, build_model, resolve_device
from medseg.preprocess import BINARY, CLASSES, RECORD, in_channels, load_record, read_class_names

WEIGHTS = "model.safetensors"  # the best epoch: what evaluate and predict use
LAST = "last.safetensors"  # the last epoch
RECORDS = (RECORD, CONVERT_RECORD, CLASSES)  # travel from data/processed into the bundle
THRESHOLD = "medseg.threshold"  # safetensors metadata key of the weights file

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    """A loaded model with what it needs to segment a new image.

    Attributes:
        model: the network in eval mode on ``device``, prepared for inference (batch norms
            folded); (B, C, H, W) -> (B, K, H, W) logits.
        spec: its spec.
        preprocess: the preprocess params it was trained with.
        classes: class names in label order, background first (``background, foreground`` for
            a binary model).
        device: where it runs.
        convert: the convert params of its training data; None where they did not travel.
        threshold: the threshold with the best validation Dice of a binary model (from the
            weights' metadata, `THRESHOLD`); None where there is none (no validation split,
            several classes).
    """

    model: torch.nn.Module
    spec: ModelSpec
    preprocess: PreprocessConfig
    classes: list[str]
    device: torch.device
    convert: ConvertConfig | None = None
    threshold: float | None = None

    @property
    def named_classes(self) -> bool:
        """Whether the classes have names of the data set's own (``data.classes``)."""
        return tuple(self.classes) != BINARY


def save_bundle(
    out: str | Path,
    best: dict[str, torch.Tensor],
    last: dict[str, torch.Tensor],
    spec: ModelSpec,
    records: str | Path,
    threshold: float | None = None,
) -> None:
    """Write a bundle into the (new, empty) folder ``out``.

    Args:
        out: the folder.
        best, last: the state dicts of the best and the last epoch.
        spec: the network's spec.
        records: the folder holding the records (`RECORDS`) of the data it was trained on;
            ``preprocess.json`` must be there.
        threshold: the best epoch's validation threshold (binary models), kept in the metadata
            of its weights file (`THRESHOLD`).
    """
    from safetensors.torch import save_file

    out, records = Path(out), Path(records)
    for state, name in ((best, WEIGHTS), (last, LAST)):
        path = out / name
        meta = {THRESHOLD: repr(threshold)} if threshold is not None and name == WEIGHTS else None
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        save_file(tensors, str(path), metadata=meta)
        path.with_suffix(".json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    for name in RECORDS:
        if (records / name).is_file():
            shutil.copyfile(records / name, out / name)


def load_bundle(
    path: str | Path, device: str | torch.device = "auto", preprocess: str | Path | None = None
) -> Bundle:
    """Load a trained model and its records, refusing any mismatch.

    Args:
        path: the bundle folder, or a weights file in it (``model.safetensors``,
            ``last.safetensors``; the spec is the ``.json`` beside it).
        device: ``auto``, ``cpu`` or ``cuda``.
        preprocess: a ``preprocess.json`` to use instead of the one in the bundle.

    Raises:
        MedsegError: a file is missing or unreadable, the spec is malformed or does not fit the
            weights, or the model's input channels or classes do not match its records.
    """
    weights = Path(path)
    if weights.is_dir():
        weights = weights / WEIGHTS
    spec_path = weights.with_suffix(".json")
    for needed in (weights, spec_path):
        if not needed.is_file():
            raise MedsegError(
                f"--model: {needed} is missing; give a trained model's folder (e.g. models/) or "
                f"its weights file, with its {spec_path.name} beside it"
            )
    folder = weights.parent
    record = Path(preprocess) if preprocess is not None else folder / RECORD
    if not record.is_file():
        raise MedsegError(
            f"{record}: missing; the model's preprocess params are needed to prepare new "
            f"images the way it was trained. Copy data/processed/{RECORD} of the run that "
            f"trained it beside the weights, or pass --preprocess"
        )
    pre = load_record(record)
    spec = read_spec(spec_path)
    if spec.in_channels != in_channels(pre.channel):
        raise MedsegError(
            f"{spec_path}: the model takes {spec.in_channels} input channel(s) but its "
            f"preprocessing (preprocess.channel={pre.channel} in {record}) gives "
            f"{in_channels(pre.channel)}"
        )
    classes = read_class_names(folder)
    if spec.classes != len(classes) and not (spec.classes == 1 and len(classes) == 2):
        raise MedsegError(
            f"{spec_path}: the model has {spec.classes} output class(es) but {folder / CLASSES} "
            f"names {len(classes)} labels ({', '.join(classes)})"
        )
    net = build_model(spec)
    try:
        net.load_state_dict(read_weights(weights))
    except RuntimeError as err:
        detail = " ".join(line.strip() for line in str(err).strip().splitlines()[:3])
        raise MedsegError(
            f"{weights}: the weights do not fit {spec_path.name} (arch {spec.arch}, encoder "
            f"{spec.encoder}, {spec.in_channels} channel(s) in, {spec.classes} class(es) out): "
            f"{detail}"
        ) from err
    dev = resolve_device(device) if isinstance(device, str) else device
    model = prepare_model(net.to(dev).eval(), spec.in_channels)
    convert = _convert_record(folder / CONVERT_RECORD)
    return Bundle(model, spec, pre, classes, dev, convert, _threshold(weights))


def resolve_threshold(
    options: EvaluateConfig, bundle: Bundle, fallback: float | None = None
) -> EvaluateConfig:
    """``options`` with a numeric threshold: ``auto`` becomes the bundle's (`THRESHOLD`), or
    ``fallback`` where it has none; 0.5 for a model that does not use one (several classes).

    Raises:
        MedsegError: ``auto`` for a binary model trained without a validation split, and no
            ``fallback``.
    """
    if options.threshold != "auto":
        return options
    if bundle.threshold is None and fallback is not None:
        log.info("the model has no validation threshold: threshold %s", fallback)
        return replace(options, threshold=fallback)
    if bundle.threshold is None and bundle.spec.classes == 1:
        raise MedsegError(
            "params: evaluate.threshold is auto, but the model's weights hold no validation "
            "threshold (trained without a validation split); set a number such as 0.5"
        )
    return replace(options, threshold=bundle.threshold if bundle.threshold is not None else 0.5)


def _threshold(weights: Path) -> float | None:
    """The validation threshold in the metadata of a weights file (None where absent)."""
    from safetensors import safe_open

    with safe_open(str(weights), "pt") as f:
        text = (f.metadata() or {}).get(THRESHOLD)
    if text is None:
        return None
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:
        raise MedsegError(f"{weights}: the threshold in its metadata is {text!r}; retrain it")
    return value


def read_spec(path: Path) -> ModelSpec:
    """A model spec from JSON, every field type-checked before anything is built."""
    try:
        raw: Any = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as err:
        raise MedsegError(f"{path}: not a readable model spec ({err})") from err
    want = {f.name for f in fields(ModelSpec)}
    if not isinstance(raw, dict) or set(raw) != want:
        raise MedsegError(f"{path}: a model spec has exactly the keys {', '.join(sorted(want))}")
    ok = (
        isinstance(raw["arch"], str)
        and isinstance(raw["encoder"], str)
        and isinstance(raw["decoder_channels"], list)
        and 0 < len(raw["decoder_channels"]) <= 8
        and all(_small_int(c, 4096) for c in raw["decoder_channels"])
        and _small_int(raw["in_channels"], 64)
        and _small_int(raw["classes"], 1024)
    )
    if not ok:
        raise MedsegError(
            f"{path}: malformed model spec: arch and encoder must be names, decoder_channels a "
            "list of up to 8 positive integers, in_channels and classes positive integers"
        )
    return ModelSpec(**raw)


def _small_int(value: Any, top: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and 0 < value <= top


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A safetensors weights file, on the CPU."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(path), device="cpu")
    except (SafetensorError, OSError) as err:
        raise MedsegError(f"{path}: not a readable safetensors weights file ({err})") from err


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
