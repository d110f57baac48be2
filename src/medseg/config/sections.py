"""The params models: one frozen section per ``params.yaml`` section, each key declared once
(`medseg.config.keys.key`): type, default, allowed values, bounds and help. The checks, the
messages, ``docs/params.md`` and ``docs/params.schema.json`` are derived from these
declarations (`medseg.config.reference`); the reference's section text is each class's
docstring.

A key's first value is the one the shipped ``params.yaml`` holds (``auto`` for the keys the
plan chooses, `medseg.planning.settings`): the default the reference shows; every key must still
be written in ``params.yaml``. Its ``default=`` is what a record without it means (a model bundle
written before the key existed, `medseg.inference.bundle`) and what code that builds a section
gets.
"""

from __future__ import annotations

import re
from typing import Any, ClassVar

from medseg import names as lists
from medseg.config.evaluate import CrossvalConfig, EvaluateConfig
from medseg.config.keys import SAME, check_choices, key, section
from medseg.config.train import TrainConfig
from medseg.errors import MedsegError, shown

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


def _group_rule(value: str) -> None:
    """``data.group``: one of `medseg.names.GROUP_RULES`, or a regular expression with one
    capture group (the patient, found in a file name)."""
    if value in lists.GROUP_RULES:
        return
    hint = (
        f"params: data.group must be {', '.join(lists.GROUP_RULES)} or a regular expression "
        "with one capture group that finds the patient in a file name (e.g. '^(.+)_\\d+')"
    )
    try:
        pattern = re.compile(value)
    except re.error as err:
        raise MedsegError(f"{hint}; {shown(value)} is not one ({err})") from None
    if pattern.groups != 1:
        raise MedsegError(f"{hint}; {shown(value)} has {pattern.groups} capture groups")


@section
class DataConfig:
    """Where the raw data set lives and how it is laid out; see [layouts.md](layouts.md)."""

    SECTION: ClassVar[str] = "data"

    root: str = key(
        "data/raw/synthetic",
        help=(
            "the data set `convert` reads: the built-in synthetic one, or e.g. `/data/DRIVE`; a "
            "folder outside the repository is tracked by DVC as an external dependency"
        ),
    )
    layout: str = key(
        "drive",
        choices=lists.LAYOUTS,
        help="folder layout under `root`: `drive`, `folders` or `manifest`",
    )
    manifest: str = key(
        "manifest.csv",
        default=SAME,
        help=(
            "layout `manifest`: the CSV under `root` with columns `image, mask[, fov][, mask2][, "
            "split][, case_id][, group or patient]`"
        ),
    )
    test_fraction: float = key(
        0.2,
        default=SAME,
        gt=0,
        lt=1,
        help=(
            "`folders` or `manifest` with no split given: share of cases drawn at random for the "
            "test split, in (0, 1), whole groups (patients) at a time"
        ),
    )
    split_seed: int = key(
        0,
        default=SAME,
        help="seed of that split",
    )
    classes: dict[Any, Any] | None = key(
        None,
        default=SAME,
        help=(
            "`null`: binary masks (two values, the higher one foreground); or class name -> mask "
            "value(s) in label order, e.g. `{liver: 1, kidney: [2, 3]}` ([label "
            "maps](layouts.md#label-maps-and-named-classes))"
        ),
    )
    seg: str | None = key(
        None,
        default=SAME,
        help=(
            "masks from DICOM Segmentation objects: a SEG file or folder under `root`; without "
            "`classes` the segment labels name the classes ([DICOM "
            "SEG](layouts.md#dicom-seg-masks))"
        ),
    )
    group: str = key(
        "auto",
        default=SAME,
        help=(
            "the group (patient) of a case, kept on one side of the test, validation and "
            "crossval splits: `auto` (a manifest `group`/`patient` column, else the DICOM "
            "`PatientID`, else the `StudyInstanceUID`, as keyed hashes, else the file), `file` "
            "(every file its own group), `folder` (the image's folder), or a regular expression "
            "whose one capture group finds the patient in the file name, e.g. `^(.+)_\\d+` for "
            "`<patient>_<slice>.png` ([groups](layouts.md#patients-and-groups))"
        ),
    )

    def __post_init__(self) -> None:
        check_choices(self)
        _group_rule(self.group)
        if self.classes is not None:
            label_map(self.classes)
        if self.seg is not None and not self.seg.strip():
            raise MedsegError(
                "params: data.seg must be a DICOM SEG file or folder under data.root, or null"
            )
        if not self.manifest:
            raise MedsegError("params: data.manifest must name the CSV file under data.root")


@section
class SynthesizeConfig:
    """The built-in, procedurally generated fundus-like data set (only used while `data.root`
    points at `data/raw/synthetic`).
    """

    SECTION: ClassVar[str] = "synthesize"

    seed: int = key(
        0,
        help=(
            "seed of the whole data set; each case has its own generator seeded with `(seed, case "
            "index)`"
        ),
    )
    n_train: int = key(
        20,
        gt=0,
        help="training cases",
    )
    n_test: int = key(
        10,
        gt=0,
        help="test cases",
    )
    height: int = key(
        440,
        ge=32,
        help="image height in pixels (at least 32)",
    )
    width: int = key(
        424,
        ge=32,
        help="image width in pixels (at least 32)",
    )
    dicom_fraction: float = key(
        0.25,
        ge=0,
        le=1,
        help="share of cases written as DICOM (ophthalmic photography, RGB) instead of TIFF",
    )
    vessel_width_max: float = key(
        8.0,
        help="vessel width in pixels at the optic disc",
    )
    vessel_width_min: float = key(
        1.0,
        gt=0,
        help="vessel width in pixels at the tips",
    )
    noise: float = key(
        0.03,
        ge=0.0,
        help="sensor noise sigma, on a 0..1 scale",
    )
    labels: str = key(
        "vessels",
        default=SAME,
        choices=lists.LABEL_SETS,
        help=(
            "`vessels` (binary masks) or `vessels_disc` (label maps: 1 vessel, 2 optic disc, the "
            "whole disc)"
        ),
    )

    def __post_init__(self) -> None:
        check_choices(self)
        if self.vessel_width_max < self.vessel_width_min:
            raise MedsegError(
                "params: synthesize.vessel_width_max must be >= synthesize.vessel_width_min"
            )


@section
class ConvertConfig:
    """Every input format to lossless PNG plus `manifest.csv`; see [layouts.md](layouts.md)."""

    SECTION: ClassVar[str] = "convert"

    window_center: float | None = key(
        None,
        help=(
            "a DICOM VOI window centre for every file instead of each file's own; set together "
            "with `window_width`"
        ),
    )
    window_width: float | None = key(
        None,
        gt=0,
        help="the matching window width (> 0)",
    )
    max_bit_depth: int = key(
        16,
        default=SAME,
        choices=lists.BIT_DEPTHS,
        help=(
            "`16` keeps 16-bit data as 16-bit PNG (16-bit RGB too; 8-bit stays 8); `8` reduces "
            "all to 8 bit"
        ),
    )
    multiframe: str = key(
        "split",
        default=SAME,
        choices=lists.MULTIFRAMES,
        help=(
            "a multi-frame DICOM or multi-page TIFF becomes cases `<id>_f1`, `<id>_f2`, ... "
            "(masks need as many frames; an FOV mask may have one); `refuse` stops on it"
        ),
    )
    max_pixels: int = key(
        200_000_000,
        default=SAME,
        gt=0,
        help=(
            "rows x columns x frames x samples allowed, read from the header before anything is "
            "decoded"
        ),
    )
    allow_burned_in: bool = key(
        False,
        default=SAME,
        help=(
            "DICOM files marked `BurnedInAnnotation = YES` (patient data written into the pixels) "
            "are refused unless `true`"
        ),
    )
    names: str = key(
        "source",
        default=SAME,
        choices=lists.ID_NAMES,
        help=(
            "case ids from file names and the source path in the manifest; `hash` uses a keyed "
            "hash of the path instead ([patient "
            "data](robustness.md#patient-data-params-and-model-files)) (for scanner exports whose "
            "file or folder names hold UIDs or names: a path part that looks like a DICOM UID is "
            "refused under `source`)"
        ),
    )
    mask_threshold: float | None = key(
        None,
        default=SAME,
        gt=0,
        lt=1,
        help=(
            "masks must be binary (0/1, 0/255, ...; label maps and lossy JPEG masks are refused); "
            "a share such as `0.5` thresholds them"
        ),
    )
    fov_fallback: str = key(
        "auto",
        default="threshold",
        choices=lists.FOV_FALLBACKS,
        help=(
            "where no FOV mask is given: made from the image (brightest channel above "
            "`fov_threshold` of full scale, 5x5 median, largest region, holes filled, `fov_erode` "
            "pixels off the rim), or `whole_image` ([which fits which "
            "modality](layouts.md#which-settings-fit-which-modality)); `auto`: convert makes the "
            "FOV by threshold where that keeps the labels (else the whole image), and [the "
            "plan](plan.md) decides whether preprocess uses it (a photograph's black surround) or "
            "the whole image"
        ),
    )
    fov_threshold: float = key(
        0.1,
        default=SAME,
        gt=0,
        lt=1,
        help=(
            "FOV where the smoothed brightest channel exceeds this share of full scale, in (0, 1)"
        ),
    )
    fov_erode: int = key(
        0,
        default=SAME,
        ge=0,
        help="pixels shaved off the rim of an FOV made from the image",
    )
    on_error: str = key(
        "fail",
        default=SAME,
        choices=lists.ON_ERRORS,
        help=(
            "a bad file stops the run with one line naming it, and no output is left; `skip` "
            "leaves the case out and lists it in `data/converted/skipped.csv` (counts in "
            "`report.json`); no usable case at all is still an error"
        ),
    )
    workers: int | None = key(
        0,
        default=SAME,
        ge=0,
        help="conversion processes; `0` or `null` uses every core",
    )

    def __post_init__(self) -> None:
        if (self.window_center is None) != (self.window_width is None):
            raise MedsegError(
                "params: convert.window_center and convert.window_width must be set together "
                "(or both null to use the window stored in each DICOM file)"
            )
        check_choices(self)


@section
class PreprocessConfig:
    """Channel choice, optional resizing, normalisation and the train/validation split."""

    SECTION: ClassVar[str] = "preprocess"

    channel: str = key(
        "auto",
        choices=lists.CHANNELS,
        help=(
            "`green` (fundus vessel contrast), `gray`, or `rgb` (3 channels: dermoscopy, "
            "endoscopy, histology, colour DICOM; a grey image is refused); `auto`: [the "
            "plan](plan.md) chooses it"
        ),
    )
    val_fraction: float = key(
        0.2,
        ge=0,
        lt=1,
        help=(
            "share of training cases held out to pick the best epoch, in [0, 1) (whole groups: "
            "a patient's cases, the frames of one multi-frame file, stay together)"
        ),
    )
    seed: int = key(
        0,
        help="seed of the validation split",
    )
    contrast: str = key(
        "auto",
        default="none",
        choices=lists.CONTRASTS,
        help=(
            "`none` or `clahe` (contrast-limited adaptive histogram equalisation, which lifts "
            "faint vessels); `auto`: [the plan](plan.md) chooses it"
        ),
    )
    clahe_clip: float = key(
        0.01,
        default=SAME,
        gt=0,
        le=1,
        help="CLAHE clip limit, a share of each tile's histogram, in (0, 1]",
    )
    clahe_tiles: int = key(
        8,
        default=SAME,
        gt=0,
        help="CLAHE tiles per image side",
    )
    max_side: int | None = key(
        "auto",
        default=None,
        ge=32,
        help=(
            "`null`: every case at its own size; N (at least 32): scale down the cases whose "
            "longer side exceeds N (area averaging; masks by an area-weighted vote); the ground "
            "truth stays at full size for scoring; `auto`: [the plan](plan.md) chooses it"
        ),
    )

    def __post_init__(self) -> None:
        check_choices(self)


@section
class Params:
    """The whole ``params.yaml``: one field per section."""

    data: DataConfig
    synthesize: SynthesizeConfig
    convert: ConvertConfig
    preprocess: PreprocessConfig
    train: TrainConfig
    evaluate: EvaluateConfig
    crossval: CrossvalConfig
