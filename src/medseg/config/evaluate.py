"""The ``evaluate`` and ``crossval`` sections' models: each key declared once
(`medseg.config.keys.key`), as in `medseg.config.sections`."""

from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import Field

from medseg import names as lists
from medseg.config.keys import SAME, check_choices, key, section
from medseg.errors import MedsegError


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
