"""The ``train`` section's model: each key declared once (`medseg.config.keys.key`), as in
`medseg.config.sections`."""

from __future__ import annotations

import re
from typing import Any, ClassVar, Literal

from medseg import names as lists
from medseg.config.keys import SAME, check_choices, key, section
from medseg.errors import MedsegError, shown
from medseg.inference.postprocess import check_operation
from medseg.names import MAX_CLASSES, MAX_DECODER_BLOCKS, MAX_DECODER_WIDTH


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
