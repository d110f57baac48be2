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
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field

from medseg import names as lists
from medseg.config.keys import SAME, check_choices, key, section
from medseg.errors import MedsegError, shown
from medseg.inference.postprocess import check_operation
from medseg.names import MAX_CLASSES, MAX_DECODER_BLOCKS, MAX_DECODER_WIDTH

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
class TrainConfig:
    """Model, sampling, optimisation and logging of the train stage; see [training.md](training.md).
    `batch_size` and `patches_per_epoch` count the global batch: under `torchrun` each process takes
    its share.
    """

    SECTION: ClassVar[str] = "train"

    arch: str = key(
        "unet",
        choices=lists.ARCHS,
        help=(
            "smp architecture: `unet`, `unetplusplus`, `manet`, `linknet`, `fpn`, `pspnet`, "
            "`deeplabv3`, `deeplabv3plus`, `pan`, `upernet`, `segformer`"
        ),
    )
    encoder: str = key(
        "resnet18",
        help="any smp encoder",
    )
    encoder_weights: str | None = key(
        None,
        help=(
            "`null` trains from scratch offline; a named weight (`imagenet`) is downloaded once "
            "and needs network (a clear error offline)"
        ),
    )
    decoder_channels: list[int] = key(
        [128, 64, 32, 16, 8],
        help=(
            "`unet`, `unetplusplus`, `manet`: one width per decoder block (the length sets the "
            "encoder depth); `fpn` (a multiple of 32), `deeplabv3`, `deeplabv3plus`, `pan`, "
            "`upernet`, `segformer`: the first entry is the decoder width; `linknet`, `pspnet`: "
            "not used"
        ),
    )
    classes: int = key(
        1,
        ge=1,
        le=MAX_CLASSES,
        help=(
            "1: sigmoid, masks 0/1; more: softmax and cross-entropy, masks hold class indices "
            "(background + the classes named in `data.classes`), validation scores any class "
            "against background"
        ),
    )
    epochs: int = key(
        "auto",
        gt=0,
        help="training epochs; `auto`: [the plan](plan.md) chooses it",
    )
    patches_per_epoch: int = key(
        "auto",
        gt=0,
        help="random patches per epoch (global); `auto`: [the plan](plan.md) chooses it",
    )
    batch_size: int = key(
        "auto",
        gt=0,
        help="patches per step (global); `auto`: [the plan](plan.md) chooses it",
    )
    patch_size: int = key(
        "auto",
        gt=0,
        multiple_of=32,
        help="patch side in pixels, a multiple of 32; `auto`: [the plan](plan.md) chooses it",
    )
    foreground_fraction: float = key(
        "auto",
        ge=0,
        le=1,
        help=(
            "share of patches centred on a foreground pixel (a class chosen among those present, "
            "then one of its pixels); `auto`: [the plan](plan.md) chooses it"
        ),
    )
    lr: float = key(
        0.002,
        gt=0,
        help="peak learning rate",
    )
    weight_decay: float = key(
        0.0,
        ge=0.0,
        help="weight decay; none on biases and norm weights",
    )
    bce_weight: float = key(
        0.5,
        ge=0,
        le=1,
        help="`bce_dice` loss: `w * BCE + (1 - w) * (1 - Dice)`",
    )
    amp: bool = key(
        True,
        help=(
            "mixed precision on CUDA (bf16 where supported, fp16 with a gradient scaler otherwise)"
        ),
    )
    device: str = key(
        "auto",
        choices=lists.DEVICES,
        help=(
            "`auto` (CUDA when present, else Apple MPS when present, else CPU), `cpu`, `cuda` or "
            "`mps` (MPS untested on real hardware: [gpu.md](gpu.md))"
        ),
    )
    seed: int = key(
        0,
        help="seed of initialisation, patch sampling and augmentation",
    )
    loss: str = key(
        "auto",
        choices=lists.LOSSES,
        help=(
            "`bce` (cross-entropy when `classes` > 1), `dice`, `bce_dice`, `cldice`; counted "
            "inside the FOV; `auto`: [the plan](plan.md) chooses it"
        ),
    )
    cldice_weight: float = key(
        0.0,
        ge=0,
        le=1,
        help=(
            "adds clDice (soft-skeleton Dice, for vessel connectivity): `(1 - w) * loss + w * "
            "clDice`; 0: off"
        ),
    )
    cldice_iters: int = key(
        3,
        gt=0,
        help="soft-skeleton iterations, about the widest vessel radius in pixels",
    )
    optimizer: str = key(
        "adamw",
        choices=lists.OPTIMIZERS,
        help="`adam` or `adamw` (decoupled weight decay)",
    )
    schedule: str = key(
        "cosine",
        choices=lists.SCHEDULES,
        help="after the warm-up, stepped every iteration: `constant`, `cosine` or `poly`",
    )
    warmup_epochs: float = key(
        1.0,
        ge=0.0,
        help="linear warm-up from 0 to `lr`, in epochs (fractions allowed; 0: none)",
    )
    min_lr: float = key(
        0.0,
        ge=0.0,
        help="where `cosine` and `poly` end",
    )
    poly_power: float = key(
        0.9,
        gt=0,
        help="`poly`: `lr * (1 - t) ** power`",
    )
    grad_clip: float = key(
        1.0,
        ge=0.0,
        help="largest global gradient norm; `0` turns clipping off",
    )
    val_every: int = key(
        1,
        gt=0,
        help="validate on whole images every N epochs and after the last",
    )
    aug_dihedral: bool = key(
        True,
        help="the 8 flips and 90-degree rotations of the square",
    )
    aug_prob: float = key(
        0.5,
        ge=0,
        le=1,
        help="chance per patch of each of: rotation + zoom, brightness, contrast, gamma",
    )
    aug_rotate: float = key(
        15.0,
        ge=0,
        le=180,
        unit="degrees",
        help=(
            "rotation in degrees, uniform in `[-x, x]`; one `grid_sample` on the batch, masks and "
            "FOV resampled with the image"
        ),
    )
    aug_scale: float = key(
        0.1,
        ge=0,
        le=0.5,
        help="zoom factor uniform in `[1 - x, 1 + x]`, x <= 0.5",
    )
    aug_brightness: float = key(
        0.1,
        ge=0,
        lt=1,
        help=(
            "shift in `[-x, x]`, in units of the image's standard deviation inside the FOV; "
            "outside the FOV stays 0"
        ),
    )
    aug_contrast: float = key(
        0.1,
        ge=0,
        lt=1,
        help="intensities times a factor in `[1 - x, 1 + x]`",
    )
    aug_gamma: float = key(
        0.2,
        ge=0,
        lt=1,
        help="gamma in `[1 - x, 1 + x]` on the patch rescaled to [0, 1]",
    )
    amp_cpu: bool | Literal["auto"] = key(
        "auto",
        help=(
            "bf16 autocast on CPU as well: `auto` turns it on where the CPU has AVX-512 bf16 or "
            "AMX (read from /proc/cpuinfo; elsewhere bf16 is emulated and about 13x slower than "
            "fp32), `true`, `false`; validation Dice at equal steps: "
            "[benchmarks.md](benchmarks.md#bf16-on-cpu)"
        ),
    )
    channels_last: bool = key(
        True,
        help="channels-last memory layout (faster convolutions)",
    )
    compile: bool = key(
        False,
        help="`torch.compile` the network (costs a compile at the start)",
    )
    workers: int = key(
        0,
        ge=0,
        help=(
            "DataLoader processes that cut patches (pinned memory on CUDA); 0 cuts them in the "
            "main process, which is fastest on a small CPU"
        ),
    )
    sync_batchnorm: bool = key(
        True,
        help="under `torchrun`: batch norm over the global batch",
    )
    deterministic: bool = key(
        False,
        help=(
            "the same weights bit for bit, whatever the machine's load. CUDA: deterministic "
            "algorithms (slower; the few operations without a deterministic CUDA kernel, e.g. "
            "bilinear upsampling in FPN/DeepLab/PSPNet, warn). CPU: `false` trains on one thread "
            "per core that other processes leave free (measured at the start; the thread count "
            "changes the last bits of the weights), `true` keeps torch's threads, several times "
            "slower beside a busy process ([benchmarks](benchmarks.md#a-busy-machine))"
        ),
    )
    cache: str = key(
        "auto",
        default=SAME,
        choices=lists.CACHES,
        help=(
            "training cases: `ram` (read once), `none` (memory-mapped), `device` (on the GPU, "
            "patches cut there by index arithmetic; [gpu.md](gpu.md)), `auto` (on CUDA `device` "
            "when the split takes at most a quarter of the GPU's free memory; else in RAM when it "
            "takes at most 1 GiB and a quarter of the free memory); the result is the same bit "
            "for bit"
        ),
    )
    postprocess: list[dict[str, Any]] = key(
        "auto",
        default=[],
        help=(
            "post-processing candidates, tried in order after training on the validation cases "
            "(predicted with the best weights at the ground truth's resolution): `{op: "
            "keep_largest}`, `{op: fill_holes}`, `{op: drop_small, min_size: <pixels of the "
            "converted images>}`; per class, each is kept only where it raises the pooled "
            "validation Dice, and what is kept goes into the bundle, which every predictor then "
            "applies ([predict.md](predict.md#the-model-bundle)); `[]`: none; `auto`: [the "
            "plan](plan.md) chooses the candidates (none for thin structures)"
        ),
    )
    budget: float | None = key(
        3,
        default=None,
        gt=0,
        help=(
            "minutes of training that `epochs: auto` buys: the plan measures a training step on "
            "this machine and fixes the steps in `plans.json` (the demo: 3; a real data set: 10 "
            "or more); unused with explicit `epochs`"
        ),
    )
    step_seconds: float | None = key(
        None,
        default=SAME,
        gt=0,
        help=(
            "the step time the plan plans the budget with: `null` measures it (a short probe when "
            "the plan stage runs); a number fixes it, which makes the plan the same on every "
            "machine (CI)"
        ),
    )

    def __post_init__(self) -> None:
        check_choices(self)
        for i, spec in enumerate(self.postprocess):
            check_operation(spec, f"params: train.postprocess[{i}]")
        if not re.fullmatch(lists.ENCODER_NAME, self.encoder):
            raise MedsegError(
                f"params: train.encoder must be a segmentation-models-pytorch encoder name "
                f"(letters, digits, _ . -), got {shown(self.encoder)}"
            )
        if not 0 < len(self.decoder_channels) <= MAX_DECODER_BLOCKS or any(
            not 0 < c <= MAX_DECODER_WIDTH for c in self.decoder_channels
        ):
            raise MedsegError(
                f"params: train.decoder_channels must be a list of 1 to {MAX_DECODER_BLOCKS} "
                f"integers in 1..{MAX_DECODER_WIDTH}"
            )
        if self.min_lr > self.lr:
            raise MedsegError(f"params: train.min_lr must be <= train.lr, got {self.min_lr}")


@section
class EvaluateConfig:
    """Whole-image inference and scoring of the test cases; see [metrics.md](metrics.md). `medseg
    predict` takes the same settings as options whose defaults are these values.
    """

    SECTION: ClassVar[str] = "evaluate"

    threshold: Annotated[float, Field(ge=0, le=1)] | Literal["auto"] = key(
        "auto",
        help=(
            "a pixel is foreground when its probability >= threshold; `auto`: the threshold with "
            "the best Dice on the validation split, found by the train stage for the best weights "
            "and stored in their metadata (binary models; several classes take the most probable "
            "class)"
        ),
    )
    window: int = key(
        "auto",
        gt=0,
        multiple_of=32,
        help=(
            "sliding-window side (a multiple of 32); a DRIVE image fits in one window; `auto`: "
            "[the plan](plan.md) chooses it"
        ),
    )
    overlap: float = key(
        0.25,
        ge=0,
        lt=1,
        help="share of a window shared with its neighbour, in [0, 1)",
    )
    blending: str = key(
        "gaussian",
        choices=lists.BLENDINGS,
        help="`gaussian` (window centres weigh more) or `constant` (plain mean)",
    )
    tta: bool = key(
        "auto",
        help=(
            "average over horizontal, vertical and both flips (4x the time); `auto`: [the "
            "plan](plan.md) chooses it"
        ),
    )
    batch_size: int = key(
        4,
        gt=0,
        help="windows per forward pass",
    )
    device: str = key(
        "auto",
        choices=lists.DEVICES,
        help=(
            "`auto` (CUDA when present, else Apple MPS when present, else CPU), `cpu`, `cuda` or "
            "`mps` (MPS untested on real hardware: [gpu.md](gpu.md))"
        ),
    )
    boundary: bool = key(
        True,
        default=SAME,
        help=(
            "HD95, ASSD and NSD per case and class, inside the FOV "
            "([metrics.md](metrics.md#boundary-and-lesion-metrics))"
        ),
    )
    boundary_tolerance: float = key(
        1.0,
        default=SAME,
        ge=0,
        help="the NSD tolerance, in the boundary unit (>= 0)",
    )
    boundary_unit: str = key(
        "auto",
        default=SAME,
        choices=lists.BOUNDARY_UNITS,
        help=(
            "`auto`: mm where every test case has a pixel spacing (DICOM), else pixels; `px`; "
            "`mm` (an error when a test case has no spacing)"
        ),
    )
    lesions: bool | Literal["auto"] = key(
        "auto",
        default=SAME,
        help=(
            "lesion-wise detection and panoptic quality per class; `auto`: every class but the "
            "thin (tubular) structures of the training masks, where a broken vessel would count "
            "as many lesions"
        ),
    )

    def __post_init__(self) -> None:
        check_choices(self)


@section
class CrossvalConfig:
    """The opt-in k-fold cross-validation (`medseg crossval`); see [crossval.md](crossval.md).
    The folds train with the `train` section.
    """

    SECTION: ClassVar[str] = "crossval"

    folds: list[int] = key(
        [0, 1, 2, 3, 4],
        help="fold numbers 0..k-1: k folds of the train + val cases, one model each",
    )
    seed: int = key(
        0,
        help="seed of the assignment of cases (whole groups: patients or files) to folds",
    )

    def __post_init__(self) -> None:
        if len(self.folds) < 2 or self.folds != list(range(len(self.folds))):
            raise MedsegError(
                f"params: crossval.folds must be [0, 1, ..., k-1] with k >= 2 (one train stage "
                f"per fold), got {self.folds}"
            )


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
