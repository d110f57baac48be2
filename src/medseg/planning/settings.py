"""The planned settings: every params key the plan stage may choose, declared once.

Everything else is derived from `SETTINGS`: the keys a user may leave ``auto`` and where the
stages find them (`AUTO_KEYS`), what stands in for them while a params file is checked without
a plan (`STAND_INS`), the plan's table order (`KEYS`), and the plan stage's DVC params
(`DVC_PARAMS`, which ``tests/test_plan.py`` checks against ``dvc.yaml``). The rule that
chooses each value is the function of `medseg.planning.plan` named in `Setting.rule`.

Import-free, so that the params schema (`medseg.config`) reads it without loading the plan.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Setting:
    """One planned params key.

    Attributes:
        key: the dotted params key, ``section.name``.
        rule: the function of `medseg.planning.plan` that chooses its value and says why.
        stand_in: what ``auto`` stands for while a params file is checked without a plan
            (``medseg check-params``, the plan stage's own whole-file check); never used to run.
        before_plan: the key's stage runs before the plan (convert): it treats ``auto`` as a
            value of its own, and the stages after the plan read the plan's decision.
    """

    key: str
    rule: str
    stand_in: Any
    before_plan: bool = False

    @property
    def section(self) -> str:
        return self.key.split(".")[0]

    @property
    def name(self) -> str:
        return self.key.split(".")[1]


SETTINGS = (
    Setting("convert.fov_fallback", "_fov_rule", "threshold", before_plan=True),
    Setting("preprocess.channel", "_channel_rule", "gray"),
    Setting("preprocess.contrast", "_contrast_rule", "none"),
    Setting("preprocess.max_side", "_resolution_rule", None),
    Setting("train.patch_size", "_patch_rule", 96),
    Setting("train.batch_size", "_batch_rule", 16),
    Setting("train.foreground_fraction", "_foreground_rule", 0.5),
    Setting("train.loss", "_loss_rule", "bce_dice"),
    Setting("train.patches_per_epoch", "_steps", 1),
    Setting("train.epochs", "_steps", 1),
    Setting("train.postprocess", "_postprocess_rule", []),
    Setting("evaluate.window", "_window_rule", 1024),
    Setting("evaluate.tta", "_tta_rule", False),
)

KEYS = tuple(s.key for s in SETTINGS)
BY_KEY = {s.key: s for s in SETTINGS}
STAND_INS = {s.key: s.stand_in for s in SETTINGS}

# What the step-time probe builds and measures besides the planned keys: a change reruns the
# plan, which measures again where the step changed (`medseg.planning.probe.probe_key`).
PROBE_PARAMS = (
    "train.budget",
    "train.step_seconds",
    "train.arch",
    "train.encoder",
    "train.decoder_channels",
    "train.classes",
    "train.optimizer",
    "train.amp_cpu",
    "train.channels_last",
    "train.device",
)
DVC_PARAMS = (*KEYS, *PROBE_PARAMS)  # the plan stage's `params:` in dvc.yaml, in this order
