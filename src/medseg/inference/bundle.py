"""The model bundle: one folder that holds everything a trained model needs to segment a new image.

```
models/model.safetensors   weights of the best epoch        (last.safetensors: the last epoch)
models/model.json          the network's spec (`ModelSpec`)  (last.json)
models/preprocess.json     the preprocess params it was trained with
models/convert.json        the convert params its data went through (DICOM window, FOV fallback)
models/classes.json        the class names in label order, background first
```

A model exported by ``medseg export`` (`medseg.inference.export`) is a bundle in one ``.onnx`` file,
its records in the file's metadata (`medseg.inference.onnx_model`); `load_bundle` loads it the same
way, without torch.

The weights file of the best epoch of a binary model trained with a validation split also holds,
in its safetensors metadata (`THRESHOLD`), the threshold with the best validation Dice of those
weights: ``evaluate.threshold: auto`` and ``medseg predict`` use it
(`medseg.inference.predictor.resolve_threshold`). Beside it (`POSTPROCESS`), the post-processing
chosen on the validation cases after training (`medseg.training.postchoice`; JSON
``{"1": [{"op": "keep_largest"}]}``, ``{}`` for none), which every predictor of the bundle
applies to its labels.

`save_bundle` writes it (the train stage), `load_bundle` is the one way a saved model is
loaded: the evaluate stage and ``medseg predict`` go through it, and every mismatch is refused
naming the file. (Validation inside training scores the model in memory, through the same
`medseg.inference.predictor.Predictor`.)
"""

from __future__ import annotations

import json
import logging
import re
import shutil
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, NoReturn

from medseg.config import ConvertConfig, PreprocessConfig
from medseg.errors import MedsegError, shown
from medseg.inference.onnx_model import SUFFIX, open_onnx
from medseg.inference.postprocess import Steps, parse_steps, steps_record
from medseg.io.records import read_json
from medseg.labels import LabelSpace
from medseg.names import (
    ARCHS,
    CLASSES,
    CONVERT_RECORD,
    MAX_CLASSES,
    MAX_DECODER_BLOCKS,
    MAX_DECODER_WIDTH,
)
from medseg.preprocess.processed import RECORD, check_class_names, load_record, read_class_names
from medseg.preprocess.transforms import in_channels
from medseg.spec import ModelSpec
from medseg.strict import parse

if TYPE_CHECKING:  # torch is imported where a torch model is loaded: ONNX bundles run without
    import torch

    from medseg.inference.runners import Runner

WEIGHTS = "model.safetensors"  # the best epoch: what evaluate and predict use
LAST = "last.safetensors"  # the last epoch
RECORDS = (RECORD, CONVERT_RECORD, CLASSES)  # travel from data/processed into the bundle
THRESHOLD = "medseg.threshold"  # safetensors metadata key of the weights file
POSTPROCESS = "medseg.postprocess"  # another: the chosen post-processing

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Bundle:
    """A loaded model with what it needs to segment a new image.

    Attributes:
        model: the network in eval mode on ``device``, prepared for inference (batch norms
            folded); (B, C, H, W) -> (B, K, H, W) logits. For an ONNX export, its
            `medseg.inference.onnx_model.OnnxRunner`.
        spec: its spec.
        preprocess: the preprocess params it was trained with.
        classes: class names in label order, background first (``background, foreground`` for
            a binary model).
        device: where it runs (``cpu`` or ``cuda`` for an ONNX export).
        convert: the convert params of its training data; None where they did not travel.
        threshold: the threshold with the best validation Dice of a binary model (from the
            weights' metadata, `THRESHOLD`); None where there is none (no validation split,
            several classes).
        postprocess: class label -> the post-processing operations chosen on validation
            (`POSTPROCESS`, `medseg.inference.postprocess.apply`); empty where none was chosen or
            the bundle is older than the choice.
    """

    model: torch.nn.Module | Runner
    spec: ModelSpec
    preprocess: PreprocessConfig
    classes: list[str]
    device: torch.device | str
    convert: ConvertConfig | None = None
    threshold: float | None = None
    postprocess: Steps = field(default_factory=dict)

    @property
    def labels(self) -> LabelSpace:
        """What its output channels mean (`medseg.labels.LabelSpace`)."""
        return LabelSpace.of(self.spec.classes, self.classes)


def save_bundle(
    out: str | Path,
    best: dict[str, torch.Tensor],
    last: dict[str, torch.Tensor],
    spec: ModelSpec,
    records: str | Path,
    threshold: float | None = None,
    postprocess: Steps | None = None,
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
        postprocess: the post-processing chosen for the best epoch (`POSTPROCESS`), kept there
            too; none recorded as ``{}``.
    """
    out, records = Path(out), Path(records)
    for state, name in ((best, WEIGHTS), (last, LAST)):
        path = out / name
        meta = None
        if name == WEIGHTS:
            meta = {POSTPROCESS: json.dumps(steps_record(postprocess or {}))}
            if threshold is not None:
                meta[THRESHOLD] = repr(threshold)
        tensors = {k: v.detach().cpu().contiguous() for k, v in state.items()}
        path.write_bytes(safetensors_bytes(tensors, meta))
        path.with_suffix(".json").write_text(json.dumps(asdict(spec), indent=2) + "\n")
    for name in RECORDS:
        if (records / name).is_file():
            shutil.copyfile(records / name, out / name)


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> bytes:
    """A safetensors file's bytes, the same for the same tensors and metadata.

    safetensors writes its ``__metadata__`` in the order of a hash map, which differs from one
    process to the next once it holds two keys: the same weights would give other bytes, and
    DVC would see a changed model. The header is written again with the metadata's keys sorted
    (the same JSON, so the same length; safetensors pads a header with spaces).
    """
    from safetensors.torch import save

    data = save(tensors, metadata=metadata)
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size])
    if "__metadata__" in header:
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    if len(text) > size:  # not the JSON safetensors wrote: keep its bytes
        return data
    return data[:8] + text + b" " * (size - len(text)) + data[8 + size :]


def load_bundle(
    path: str | Path, device: str | torch.device = "auto", preprocess: str | Path | None = None
) -> Bundle:
    """Load a trained model and its records, refusing any mismatch.

    Args:
        path: the bundle folder, or a weights file in it (``model.safetensors``,
            ``last.safetensors``; the spec is the ``.json`` beside it), or an ONNX export
            (``.onnx``: run by onnxruntime, torch is not imported).
        device: ``auto``, ``cpu`` or ``cuda``.
        preprocess: a ``preprocess.json`` to use instead of the one in the bundle.

    Raises:
        MedsegError: a file is missing or unreadable, the spec is malformed or does not fit the
            weights, or the model's input channels or classes do not match its records.
    """
    weights = Path(path)
    if weights.suffix.lower() == SUFFIX:
        return _load_onnx(weights, str(device), preprocess)
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
    classes = read_class_names(folder)
    _check_fits(spec, pre, classes, spec_path, f"in {record}", folder / CLASSES)
    convert = _convert_record(folder / CONVERT_RECORD)  # every record checked before building
    meta = _weights_metadata(weights)
    text = meta.get(THRESHOLD)
    threshold = None if text is None else _threshold_value(text, f"{weights}: the threshold")
    steps = _postprocess_value(meta.get(POSTPROCESS, "{}"), spec, classes, weights)
    from medseg.inference.runners import prepare_model
    from medseg.model import build_model, resolve_device

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
    return Bundle(model, spec, pre, classes, dev, convert, threshold, steps)


def _check_fits(
    spec: ModelSpec, pre: PreprocessConfig, classes: list[str], where: Path, pre_from: str,
    classes_from: Path | str,
) -> None:  # fmt: skip
    """Refuse a model whose input channels or classes do not match its records."""
    if spec.in_channels != in_channels(pre.channel):
        raise MedsegError(
            f"{where}: the model takes {spec.in_channels} input channel(s) but its "
            f"preprocessing (preprocess.channel={pre.channel} {pre_from}) gives "
            f"{in_channels(pre.channel)}"
        )
    try:
        LabelSpace.of(spec.classes, classes)
    except ValueError:
        raise MedsegError(
            f"{where}: the model has {spec.classes} output class(es) but {classes_from} "
            f"names {len(classes)} labels ({', '.join(classes)})"
        ) from None


def _load_onnx(path: Path, device: str, preprocess: str | Path | None) -> Bundle:
    """`load_bundle` of an ONNX export: the records from its metadata (`METADATA`)."""
    runner, meta = open_onnx(path, device)
    spec = parse_spec(_metadata(path, meta, "medseg.spec"), f"{path} (medseg.spec)")
    if preprocess is not None:
        pre, pre_from = load_record(preprocess), f"in {preprocess}"
    else:
        pre_raw = _metadata(path, meta, "medseg.preprocess")
        pre = parse(PreprocessConfig, pre_raw, prefix="preprocess.", source=str(path))
        pre_from = "in its metadata"
    classes = check_class_names(_metadata(path, meta, "medseg.classes"), f"{path} (medseg.classes)")
    _check_fits(spec, pre, classes, path, pre_from, "its medseg.classes")
    convert_raw = _metadata(path, meta, "medseg.convert")
    convert = (
        None if convert_raw is None
        else parse(ConvertConfig, convert_raw, prefix="convert.", source=str(path))
    )  # fmt: skip
    # absent ("null") in exports older than threshold auto
    threshold = _threshold_value(meta.get(THRESHOLD, "null"), f"{path}: {THRESHOLD}")
    steps = _postprocess_value(meta.get(POSTPROCESS, "{}"), spec, classes, path)  # absent: older
    used = "cuda" if runner.session.get_providers()[0] == "CUDAExecutionProvider" else "cpu"
    return Bundle(runner, spec, pre, classes, used, convert, threshold, steps)


def _metadata(path: Path, meta: dict[str, str], key: str) -> Any:
    """One JSON entry of an ONNX export's metadata."""
    try:
        return json.loads(meta[key])
    except (KeyError, json.JSONDecodeError) as err:
        raise MedsegError(
            f"{path}: its metadata lacks a readable {key} ({err}); export the model again"
        ) from err


def _weights_metadata(weights: Path) -> dict[str, str]:
    """The safetensors metadata of a weights file (empty where it has none)."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(weights), "pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise MedsegError(f"{weights}: not a readable safetensors weights file ({err})") from err


def _postprocess_value(text: str, spec: ModelSpec, classes: list[str], path: Path) -> Steps:
    """The stored post-processing (`POSTPROCESS`): JSON class label -> operation specs.

    Raises:
        MedsegError: naming ``path``, where it is not JSON or
        `medseg.inference.postprocess.parse_steps`
            refuses it.
    """
    source = f"{path}: {POSTPROCESS} in its metadata"
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as err:
        raise MedsegError(f"{source} is not JSON ({err}); export or train it again") from err
    labels = LabelSpace.of(spec.classes, classes).foreground_labels
    return parse_steps(raw, labels, source)


def _threshold_value(text: str, what: str) -> float | None:
    """A stored threshold: JSON ``null`` or a number in [0, 1] (``repr`` of a float is one).

    Raises:
        MedsegError: ``what`` in its metadata is anything else.
    """
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        value = text
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
        raise MedsegError(f"{what} in its metadata is {shown(value)}; export or train it again")
    return float(value)


def read_spec(path: Path) -> ModelSpec:
    """A model spec from a JSON file, every field checked (`parse_spec`)."""
    return parse_spec(read_json(path, "model spec"), str(path))


def parse_spec(raw: Any, source: str) -> ModelSpec:
    """A model spec from its JSON value, every field type- and range-checked before anything
    is built; ``source`` names it in errors.

    Raises:
        MedsegError: naming ``source`` and the first field that is missing, unknown, of the
            wrong type or out of range.
    """
    want = [f.name for f in fields(ModelSpec)]
    if not isinstance(raw, dict):
        _malformed(source, f"not a JSON object with keys {', '.join(want)}")
    unknown = sorted(k for k in raw if k not in want)
    missing = [k for k in want if k not in raw]
    if unknown or missing:
        what = f"unknown field {shown(unknown[0])}" if unknown else f"missing field {missing[0]}"
        _malformed(source, f"{what}; it has exactly {', '.join(want)}")
    if not isinstance(raw["arch"], str) or raw["arch"] not in ARCHS:
        _malformed(
            source, f"field arch must be one of {', '.join(ARCHS)}, got {shown(raw['arch'])}"
        )
    if not isinstance(raw["encoder"], str) or not _ENCODER.match(raw["encoder"]):
        _malformed(source, f"field encoder must be an encoder name, got {shown(raw['encoder'])}")
    channels = raw["decoder_channels"]
    if (
        not isinstance(channels, list)
        or not 0 < len(channels) <= MAX_DECODER_BLOCKS
        or not all(_small_int(c, MAX_DECODER_WIDTH) for c in channels)
    ):
        _malformed(
            source,
            f"field decoder_channels must be a list of 1 to {MAX_DECODER_BLOCKS} integers in "
            f"1..{MAX_DECODER_WIDTH}, got {shown(channels)}",
        )
    for name, top in (("in_channels", MAX_IN_CHANNELS), ("classes", MAX_CLASSES)):
        if not _small_int(raw[name], top):
            _malformed(
                source, f"field {name} must be an integer in 1..{top}, got {shown(raw[name])}"
            )
    return ModelSpec(**raw)


def _malformed(source: str, detail: str) -> NoReturn:
    raise MedsegError(f"{source}: malformed model spec: {detail}")


_ENCODER = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$")
MAX_IN_CHANNELS = 3  # grey or RGB (preprocess.channel)


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
    raw = read_json(path, "convert record")
    return parse(ConvertConfig, raw, prefix="convert.", source=str(path))
