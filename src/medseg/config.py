"""Typed, strict configuration: one frozen dataclass per ``params.yaml`` section.

Loading rejects unknown sections and keys, missing keys and wrong types, naming the offending
key (``train.lr``) so a typo never silently falls back to a default.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from medseg import names
from medseg.errors import MedsegError, shown
from medseg.inference.postprocess import check_operation
from medseg.io.records import read_json, read_yaml
from medseg.names import (  # importable from here as well, where other modules look for them
    MAX_CLASSES,
    MAX_DECODER_BLOCKS,
    MAX_DECODER_WIDTH,
)
from medseg.strict import parse

__all__ = [
    "ConvertConfig",
    "CrossvalConfig",
    "DataConfig",
    "EvaluateConfig",
    "Params",
    "PreprocessConfig",
    "SynthesizeConfig",
    "TrainConfig",
    "label_map",
    "load_all_params",
    "load_params",
]


@dataclasses.dataclass(frozen=True)
class DataConfig:
    """Where the raw data set lives and how its folders are laid out."""

    root: str
    layout: str
    manifest: str = "manifest.csv"
    test_fraction: float = 0.2
    split_seed: int = 0
    classes: dict[str, Any] | None = None  # class name -> mask value or list of values
    seg: str | None = None  # DICOM SEG file or folder (under root) the masks come from
    group: str = "auto"  # the patient of a case: auto, file, folder or a file-name pattern

    def __post_init__(self) -> None:
        _choice("data.layout", self.layout, names.LAYOUTS)
        _group_rule(self.group)
        if self.classes is not None:
            label_map(self.classes)
        if self.seg is not None and (not isinstance(self.seg, str) or not self.seg.strip()):
            raise MedsegError(
                "params: data.seg must be a DICOM SEG file or folder under data.root, or null"
            )
        if not self.manifest:
            raise MedsegError("params: data.manifest must name the CSV file under data.root")
        if not 0.0 < self.test_fraction < 1.0:
            raise MedsegError(
                f"params: data.test_fraction must be in (0, 1), got {self.test_fraction}"
            )


def _group_rule(value: str) -> None:
    """``data.group``: one of `names.GROUP_RULES`, or a regular expression with one capture
    group (the patient, found in a file name)."""
    if value in names.GROUP_RULES:
        return
    hint = (
        f"params: data.group must be {', '.join(names.GROUP_RULES)} or a regular expression "
        "with one capture group that finds the patient in a file name (e.g. '^(.+)_\\d+')"
    )
    try:
        pattern = re.compile(value)
    except (re.error, TypeError) as err:
        raise MedsegError(f"{hint}; {shown(value)} is not one ({err})") from None
    if pattern.groups != 1:
        raise MedsegError(f"{hint}; {shown(value)} has {pattern.groups} capture groups")


_CLASS_NAME = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")


def label_map(classes: dict[str, Any]) -> dict[int, int]:
    """Mask value -> label (1..K in the order of ``data.classes``); 0 is the background.

    Raises:
        MedsegError: a name that cannot be a metrics key, ``background``, a value that is not a
            positive integer, or a value given to two classes.
    """
    if not classes:
        raise MedsegError("params: data.classes must name at least one class, or be null")
    if len(classes) > 255:
        raise MedsegError(
            f"params: data.classes names {len(classes)} classes; at most 255 (labels are 8 bit)"
        )
    out: dict[int, int] = {}
    for label, (name, values) in enumerate(classes.items(), start=1):
        if not isinstance(name, str) or not _CLASS_NAME.match(name) or name == "background":
            raise MedsegError(
                f"params: data.classes: {str(name)[:40]!r} is not a class name (letters, digits, "
                "_ and -, starting with a letter; 'background' is class 0)"
            )
        for value in values if isinstance(values, list) else [values]:
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 2**16:
                raise MedsegError(
                    f"params: data.classes.{name} must be a mask value (an integer 1..65535) or "
                    f"a list of them, got {str(value)[:40]!r}; 0 is the background"
                )
            if value in out:
                raise MedsegError(f"params: data.classes: mask value {value} is given twice")
            out[value] = label
    return out


@dataclasses.dataclass(frozen=True)
class SynthesizeConfig:
    """The built-in, procedurally generated fundus-like data set."""

    seed: int
    n_train: int
    n_test: int
    height: int
    width: int
    dicom_fraction: float
    vessel_width_max: float
    vessel_width_min: float
    noise: float
    labels: str = "vessels"  # vessels (binary) or vessels_disc (label map: 1 vessel, 2 disc)

    def __post_init__(self) -> None:
        _choice("synthesize.labels", self.labels, names.LABEL_SETS)
        _positive("synthesize.n_train", self.n_train)
        _positive("synthesize.n_test", self.n_test)
        _at_least("synthesize.height", self.height, 32)
        _at_least("synthesize.width", self.width, 32)
        _unit("synthesize.dicom_fraction", self.dicom_fraction)
        _positive("synthesize.vessel_width_min", self.vessel_width_min)
        if self.vessel_width_max < self.vessel_width_min:
            raise MedsegError(
                "params: synthesize.vessel_width_max must be >= synthesize.vessel_width_min"
            )
        _at_least("synthesize.noise", self.noise, 0.0)


@dataclasses.dataclass(frozen=True)
class ConvertConfig:
    """Conversion of every input format to lossless PNG.

    Defaults are those of ``params.yaml``; loading still requires every key in the file.
    """

    window_center: float | None
    window_width: float | None
    max_bit_depth: int = 16
    multiframe: str = "split"
    max_pixels: int = 200_000_000
    allow_burned_in: bool = False
    names: str = "source"
    mask_threshold: float | None = None
    fov_fallback: str = "threshold"
    fov_threshold: float = 0.1
    fov_erode: int = 0
    on_error: str = "fail"
    workers: int | None = 0

    def __post_init__(self) -> None:
        if (self.window_center is None) != (self.window_width is None):
            raise MedsegError(
                "params: convert.window_center and convert.window_width must be set together "
                "(or both null to use the window stored in each DICOM file)"
            )
        if self.window_width is not None:
            _positive("convert.window_width", self.window_width)
        if self.max_bit_depth not in names.BIT_DEPTHS:
            raise MedsegError(
                f"params: convert.max_bit_depth must be 8 or 16, got {shown(self.max_bit_depth)}"
            )
        _choice("convert.multiframe", self.multiframe, names.MULTIFRAMES)
        _positive("convert.max_pixels", self.max_pixels)
        _choice("convert.names", self.names, names.ID_NAMES)
        if self.mask_threshold is not None and not 0.0 < self.mask_threshold < 1.0:
            raise MedsegError(
                f"params: convert.mask_threshold must be in (0, 1) or null, got "
                f"{self.mask_threshold}"
            )
        _choice("convert.fov_fallback", self.fov_fallback, names.FOV_FALLBACKS)
        if not 0.0 < self.fov_threshold < 1.0:
            raise MedsegError(
                f"params: convert.fov_threshold must be in (0, 1), got {self.fov_threshold}"
            )
        _at_least("convert.fov_erode", self.fov_erode, 0)
        _choice("convert.on_error", self.on_error, names.ON_ERRORS)
        if self.workers is not None:
            _at_least("convert.workers", self.workers, 0)


@dataclasses.dataclass(frozen=True)
class PreprocessConfig:
    """Channel choice, optional resizing, normalisation and the train/validation split."""

    channel: str
    val_fraction: float
    seed: int
    contrast: str = "none"
    clahe_clip: float = 0.01
    clahe_tiles: int = 8
    max_side: int | None = None

    def __post_init__(self) -> None:
        _choice("preprocess.channel", self.channel, names.CHANNELS)
        if self.max_side is not None:
            _at_least("preprocess.max_side", self.max_side, 32)
        _choice("preprocess.contrast", self.contrast, names.CONTRASTS)
        if not 0.0 < self.clahe_clip <= 1.0:
            raise MedsegError(
                f"params: preprocess.clahe_clip must be in (0, 1], got {self.clahe_clip}"
            )
        _positive("preprocess.clahe_tiles", self.clahe_tiles)
        if not 0.0 <= self.val_fraction < 1.0:
            raise MedsegError(
                f"params: preprocess.val_fraction must be in [0, 1), got {self.val_fraction}"
            )


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Model, sampling, optimisation and logging of the train stage."""

    arch: str
    encoder: str
    encoder_weights: str | None
    decoder_channels: list[int]
    classes: int
    epochs: int
    patches_per_epoch: int
    batch_size: int
    patch_size: int
    foreground_fraction: float
    lr: float
    weight_decay: float
    bce_weight: float
    amp: bool
    device: str
    seed: int
    loss: str
    cldice_weight: float
    cldice_iters: int
    optimizer: str
    schedule: str
    warmup_epochs: float
    min_lr: float
    poly_power: float
    grad_clip: float
    val_every: int
    aug_dihedral: bool
    aug_prob: float
    aug_rotate: float
    aug_scale: float
    aug_brightness: float
    aug_contrast: float
    aug_gamma: float
    amp_cpu: bool | str
    channels_last: bool
    compile: bool
    workers: int
    sync_batchnorm: bool
    deterministic: bool
    cache: str = "auto"
    # post-processing candidates, tried on the validation cases after training; the ones that
    # raise validation Dice go into the model bundle (medseg.inference.postprocess)
    postprocess: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    budget: float | None = None  # minutes of training the plan buys steps for (epochs: auto)
    step_seconds: float | None = None  # the plan's step time: null measures it (a probe)

    def __post_init__(self) -> None:
        _choice("train.arch", self.arch, names.ARCHS)
        for i, spec in enumerate(self.postprocess):
            check_operation(spec, f"params: train.postprocess[{i}]")
        if not re.fullmatch(names.ENCODER_NAME, self.encoder):
            raise MedsegError(
                f"params: train.encoder must be a segmentation-models-pytorch encoder name "
                f"(letters, digits, _ . -), got {shown(self.encoder)}"
            )
        _choice("train.cache", self.cache, names.CACHES)
        if isinstance(self.amp_cpu, str):
            _choice("train.amp_cpu", self.amp_cpu, (names.AUTO,))
        _at_least("train.classes", self.classes, 1)
        if self.classes > MAX_CLASSES:
            raise MedsegError(
                f"params: train.classes must be <= {MAX_CLASSES}, got {shown(self.classes)}"
            )
        for key in ("epochs", "patches_per_epoch", "batch_size"):
            _positive(f"train.{key}", getattr(self, key))
        _positive("train.lr", self.lr)
        _at_least("train.weight_decay", self.weight_decay, 0.0)
        _unit("train.foreground_fraction", self.foreground_fraction)
        _unit("train.bce_weight", self.bce_weight)
        _multiple_of_32("train.patch_size", self.patch_size)
        if not 0 < len(self.decoder_channels) <= MAX_DECODER_BLOCKS or any(
            not 0 < c <= MAX_DECODER_WIDTH for c in self.decoder_channels
        ):
            raise MedsegError(
                f"params: train.decoder_channels must be a list of 1 to {MAX_DECODER_BLOCKS} "
                f"integers in 1..{MAX_DECODER_WIDTH}"
            )
        _choice("train.device", self.device, names.DEVICES)
        _choice("train.loss", self.loss, names.LOSSES)
        _unit("train.cldice_weight", self.cldice_weight)
        _positive("train.cldice_iters", self.cldice_iters)
        _choice("train.optimizer", self.optimizer, names.OPTIMIZERS)
        _choice("train.schedule", self.schedule, names.SCHEDULES)
        _at_least("train.warmup_epochs", self.warmup_epochs, 0.0)
        _at_least("train.min_lr", self.min_lr, 0.0)
        if self.min_lr > self.lr:
            raise MedsegError(f"params: train.min_lr must be <= train.lr, got {self.min_lr}")
        _positive("train.poly_power", self.poly_power)
        _at_least("train.grad_clip", self.grad_clip, 0.0)
        _positive("train.val_every", self.val_every)
        _unit("train.aug_prob", self.aug_prob)
        if not 0.0 <= self.aug_rotate <= 180.0:
            raise MedsegError(
                f"params: train.aug_rotate must be in [0, 180] degrees, got {self.aug_rotate}"
            )
        if not 0.0 <= self.aug_scale <= 0.5:  # zooming out further needs huge crops
            raise MedsegError(f"params: train.aug_scale must be in [0, 0.5], got {self.aug_scale}")
        for key in ("aug_brightness", "aug_contrast", "aug_gamma"):
            value = getattr(self, key)
            if not 0.0 <= value < 1.0:
                raise MedsegError(f"params: train.{key} must be in [0, 1), got {value}")
        _at_least("train.workers", self.workers, 0)
        for key in ("budget", "step_seconds"):
            value = getattr(self, key)
            if value is not None and not (math.isfinite(value) and value > 0):
                raise MedsegError(f"params: train.{key} must be a number > 0 or null, got {value}")


@dataclasses.dataclass(frozen=True)
class EvaluateConfig:
    """Whole-image inference and scoring of the test cases."""

    threshold: float | str  # a number, or "auto": the model bundle's best validation threshold
    window: int
    overlap: float
    blending: str
    tta: bool
    batch_size: int
    device: str
    boundary: bool = True  # HD95, ASSD, NSD per case and class (docs/metrics.md)
    boundary_tolerance: float = 1.0  # NSD tolerance, in the boundary unit
    boundary_unit: str = names.AUTO  # auto (mm where every test case has a spacing), px, mm
    lesions: bool | str = names.AUTO  # lesion-wise detection: auto (not for thin structures)

    def __post_init__(self) -> None:
        if isinstance(self.lesions, str):
            _choice("evaluate.lesions", self.lesions, (names.AUTO,))
        if not (math.isfinite(self.boundary_tolerance) and self.boundary_tolerance >= 0):
            raise MedsegError(
                "params: evaluate.boundary_tolerance must be a number >= 0 (in the boundary "
                f"unit), got {self.boundary_tolerance}"
            )
        _choice("evaluate.boundary_unit", self.boundary_unit, names.BOUNDARY_UNITS)
        if isinstance(self.threshold, str):
            _choice("evaluate.threshold", self.threshold, (names.AUTO,))
        else:
            _unit("evaluate.threshold", self.threshold)
        _multiple_of_32("evaluate.window", self.window)
        if not 0.0 <= self.overlap < 1.0:
            raise MedsegError(f"params: evaluate.overlap must be in [0, 1), got {self.overlap}")
        _choice("evaluate.blending", self.blending, names.BLENDINGS)
        _positive("evaluate.batch_size", self.batch_size)
        _choice("evaluate.device", self.device, names.DEVICES)


@dataclasses.dataclass(frozen=True)
class CrossvalConfig:
    """The opt-in k-fold cross-validation (``crossval/dvc.yaml``): folds of the training cases."""

    folds: list[int]  # [0, 1, ..., k-1]: one train stage per fold (DVC's foreach needs a list)
    seed: int

    def __post_init__(self) -> None:
        if len(self.folds) < 2 or self.folds != list(range(len(self.folds))):
            raise MedsegError(
                f"params: crossval.folds must be [0, 1, ..., k-1] with k >= 2 (one train stage "
                f"per fold), got {self.folds}"
            )


@dataclasses.dataclass(frozen=True)
class Params:
    """The whole ``params.yaml``: one field per section."""

    data: DataConfig
    synthesize: SynthesizeConfig
    convert: ConvertConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    crossval: CrossvalConfig


T = TypeVar("T")


def load_params(
    path: str | Path, section: type[T], plan: str | Path | Mapping[str, Any] | None = None
) -> T:
    """Load and validate the whole params file, then return one section of it.

    The whole file is checked, not only the section asked for, so that a typo anywhere stops
    the first stage that runs instead of the one that reads it. A planned key (`names.PLANNED`)
    set to ``auto`` takes its value from the plan (``plans.json``, written by the plan stage).

    Args:
        path: the ``params.yaml`` file.
        section: the section's dataclass, e.g. ``TrainConfig``.
        plan: the plan (its ``plans.json`` path, or the loaded dict); needed when the section
            has a key set to ``auto``.

    Returns:
        The validated, frozen section, every ``auto`` replaced by the plan's value.

    Raises:
        MedsegError: the file is missing or unreadable, a key is unknown, missing or of the
            wrong type, or a key of the section is ``auto`` and no plan gives it.
    """
    params, unresolved = _load(Path(path), plan)
    for field in dataclasses.fields(Params):
        value = getattr(params, field.name)
        if isinstance(value, section):
            waiting = [key for key in unresolved if key.startswith(f"{field.name}.")]
            if waiting and plan is not None:
                raise MedsegError(
                    f"{plan if not isinstance(plan, Mapping) else names.PLAN_FILE}: no value "
                    f"for {', '.join(waiting)}, which {path} sets to auto; run the plan stage "
                    "again (dvc repro)"
                )
            if waiting:
                raise MedsegError(
                    f"params: {', '.join(waiting)} {'is' if len(waiting) == 1 else 'are'} auto, "
                    f"which the plan stage chooses; run `dvc repro` (it writes "
                    f"{names.PLAN_FILE}), or set {'it' if len(waiting) == 1 else 'them'} in "
                    f"{path}"
                )
            return value
    raise TypeError(f"{section.__name__} is not a section of params.yaml")


def load_all_params(path: str | Path, plan: str | Path | Mapping[str, Any] | None = None) -> Params:
    """Load and validate every section of a params file. See `load_params`; a key left
    ``auto`` without a plan is checked as if the plan had given it a valid value."""
    return _load(Path(path), plan)[0]


def planned_values(raw: Any) -> dict[str, Any]:
    """The planned keys (`names.PLANNED`) of a raw params mapping that are not ``auto``:
    dotted key -> value. The plan stage records them as explicit."""
    out: dict[str, Any] = {}
    for name, keys in names.PLANNED.items():
        section = raw.get(name) if isinstance(raw, Mapping) else None
        for key in keys:
            if isinstance(section, Mapping) and key in section and section[key] != names.AUTO:
                out[f"{name}.{key}"] = section[key]
    return out


# what an ``auto`` key stands in for while a file is checked without a plan (never used)
_STAND_INS: dict[str, Any] = {
    "preprocess.channel": "gray",
    "preprocess.contrast": "none",
    "preprocess.max_side": None,
    "train.patch_size": 96,
    "train.batch_size": 16,
    "train.foreground_fraction": 0.5,
    "train.loss": "bce_dice",
    "train.epochs": 1,
    "train.patches_per_epoch": 1,
    "train.postprocess": [],
    "evaluate.window": 1024,
    "evaluate.tta": False,
}


def _load(path: Path, plan: str | Path | Mapping[str, Any] | None) -> tuple[Params, list[str]]:
    """Parse ``path`` with every ``auto`` planned key replaced by the plan's value (or, where the
    plan gives none, a stand-in, listed as unresolved)."""
    raw = read_yaml(path)
    chosen = _plan_params(plan) if plan is not None else None
    unresolved: list[str] = []
    planned: list[str] = []
    if isinstance(raw, dict):
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
        for name, keys in names.PLANNED.items():
            section = raw.get(name)
            if not isinstance(section, dict):
                continue
            for key in keys:
                if section.get(key) != names.AUTO:
                    continue
                dotted = f"{name}.{key}"
                if chosen is None or key not in chosen.get(name, {}):
                    section[key] = _STAND_INS[dotted]
                    unresolved.append(dotted)
                else:
                    section[key] = chosen[name][key]
                    planned.append(dotted)
    try:
        return parse(Params, raw, prefix="", source=str(path)), unresolved
    except MedsegError as err:
        if not planned:
            raise
        source = plan if not isinstance(plan, Mapping) else names.PLAN_FILE
        raise MedsegError(
            f"{err} (the values of {', '.join(planned)}, auto in {path}, come from {source}: "
            "run the plan stage again, or set them)"
        ) from None


def plan_value(plan: str | Path | Mapping[str, Any], key: str) -> Any:
    """One value the plan chose: ``key`` dotted (``convert.fov_fallback``).

    Raises:
        MedsegError: the plan is unreadable or has no such value.
    """
    section, name = key.split(".")
    chosen = _plan_params(plan).get(section, {})
    if name not in chosen:
        raise MedsegError(f"{plan}: the plan has no {key}; run the plan stage again (dvc repro)")
    return chosen[name]


def _plan_params(plan: str | Path | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``params`` part of a plan: section -> key -> value."""
    source = str(plan) if not isinstance(plan, Mapping) else names.PLAN_FILE
    loaded = read_json(Path(plan), "plan") if not isinstance(plan, Mapping) else plan
    chosen = loaded.get("params") if isinstance(loaded, Mapping) else None
    if not isinstance(chosen, Mapping) or not all(isinstance(v, Mapping) for v in chosen.values()):
        raise MedsegError(
            f"{source}: not a plan (no 'params' section of section -> key -> value); run the "
            "plan stage again (dvc repro)"
        )
    return {str(k): dict(v) for k, v in chosen.items()}


def _choice(key: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise MedsegError(f"params: {key} must be one of {', '.join(choices)}; got {shown(value)}")


def _positive(key: str, value: float) -> None:
    if value <= 0:
        raise MedsegError(f"params: {key} must be > 0, got {shown(value)}")


def _at_least(key: str, value: float, low: float) -> None:
    if value < low:
        raise MedsegError(f"params: {key} must be >= {low}, got {shown(value)}")


def _multiple_of_32(key: str, value: int) -> None:
    """The UNet halves the size five times, so inputs must divide by 32."""
    if value <= 0 or value % 32:
        raise MedsegError(f"params: {key} must be a positive multiple of 32, got {shown(value)}")


def _unit(key: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise MedsegError(f"params: {key} must be in [0, 1], got {shown(value)}")
