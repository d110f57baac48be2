"""The plan a data set's fingerprint chooses: every ``auto`` setting, with its reason.

nnU-Net's idea for 2D images of any kind, plus a time budget. Three steps:

1. `medseg.planning.fingerprint.fingerprint` reads the converted **training** cases.
2. `plan` turns the fingerprint into settings by the rules below (each returns its reason);
   a value the user gave explicitly wins, and the plan says so. The number of training steps
   comes from ``train.budget`` and a measured step time (`medseg.planning.probe`, or a fixed
   value: the plan is deterministic given it).
3. `write_plan` writes ``plans.json`` atomically; `format_table` prints it for the log.

Torch-free. Why each rule and what chose its constants: ``docs/plan.md``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from medseg.errors import MedsegError
from medseg.io.atomic import write_json
from medseg.planning.fingerprint import ELONGATED, as_number
from medseg.planning.settings import BY_KEY, KEYS

PLAN_VERSION = 1


# -- the rules' constants (docs/plan.md says what chose each) -----------------------------------
DENSE_RATIO = 0.5  # background thickness / foreground thickness below this: dense tissue
DENSE_OBJECTS = 5  # ... and at least this many objects per case (median)
MIN_DETAIL_PX = 8.0  # the finest structure (thickness) must keep this many pixels after scaling
OBJECT_TARGET_PX = 72.0  # a compact object's median extent after scaling (bench: half-128)
MIN_SCALE_GAIN = 0.9  # scale down only when it shrinks the side by more than 10%
CONTEXT = 1.75  # a compact object spans at most 1/CONTEXT of the patch side
THIN_CONTEXT = 12.0  # thin structures: patch side = this x the 90th percentile thickness
PATCH_MIN, PATCH_MAX = 64, 256
BATCH_PIXELS = 16 * 96 * 96  # pixels per batch: the default 16 x 96^2, tuned on DRIVE
BATCH_MIN, BATCH_MAX = 4, 32
COLOUR_GAIN = 1.15  # rgb when colour separates fg/bg this much better than the best grey channel
DARK_SURROUND = 0.5  # share of the border that is dark: a photograph's black surround
STEPS_PER_EPOCH = 32  # planned steps per epoch at least (an epoch ends in a validation)
VALIDATIONS = 20  # a budgeted run validates about this often: longer runs get longer epochs
TTA_MAX_CASES = 2000  # flip TTA (4x inference) up to this many training cases
TRAIN_SHARE = 0.85  # share of the budget for steps; the rest: validation, start-up, cutting
WINDOW_MAX = 1024
FILL_HOLES_MAX = 0.001  # fill-holes is a candidate when holes hold at most this share of fg

ProbeFn = Callable[[int, int, int], float]


def plan(
    fingerprint: Mapping[str, Any],
    explicit: Mapping[str, Any],
    probe_step_seconds: float | ProbeFn | None,
    budget_minutes: float | None,
) -> dict[str, Any]:
    """Every planned setting, from the fingerprint, with a one-line reason each.

    Args:
        fingerprint: `fingerprint`'s result.
        explicit: dotted param key (one of `medseg.planning.settings.KEYS`, e.g.
            ``"train.patch_size"``) -> the
            value the user set (a param not ``auto``); it wins over the rule, and the rules
            that depend on it (batch from patch, window from scale) use it.
        probe_step_seconds: seconds per training step at the planned patch and batch: a fixed
            number (a param, CI), or a function ``(patch, batch, in_channels) -> seconds``
            called once with the planned values (`probe_step_seconds`); unused when
            ``train.epochs`` is explicit.
        budget_minutes: ``train.budget``, the training time to plan the steps for; unused when
            ``train.epochs`` is explicit.

    Returns:
        ``{"version", "params": {section: {key: value}}, "settings": {key: {"value", "source":
        "plan" | "explicit", "reason"}}, "structure", "budget", "fingerprint"}``, one setting
        per key of `medseg.planning.settings.KEYS`, in that order. ``params`` is what the
        stages read (DVC tracks it as their params); ``budget`` is ``{"minutes",
        "step_seconds", "steps"}``, or None with explicit epochs.

    Raises:
        MedsegError: a budget too small for one epoch, or neither a budget nor explicit epochs.
    """
    fp = fingerprint
    out: dict[str, dict[str, Any]] = {}

    def setting(key: str, rule: Callable[[], tuple[Any, str]]) -> Any:
        assert key in BY_KEY, f"{key} is not in medseg.planning.settings.SETTINGS"
        if key in explicit:
            out[key] = {
                "value": explicit[key],
                "source": "explicit",
                "reason": "explicit in params.yaml",
            }
        else:
            value, reason = rule()
            out[key] = {"value": value, "source": "plan", "reason": reason}
        return out[key]["value"]

    kind = structure(fp)
    setting("convert.fov_fallback", lambda: _fov_rule(fp))
    channel = setting("preprocess.channel", lambda: _channel_rule(fp))
    setting("preprocess.contrast", lambda: _contrast_rule(fp, kind))
    max_side = setting("preprocess.max_side", lambda: _resolution_rule(fp, kind))
    scale = _scale_of(fp, max_side)
    patch = setting("train.patch_size", lambda: _patch_rule(fp, kind, scale))
    batch = setting("train.batch_size", lambda: _batch_rule(int(patch)))
    setting("train.foreground_fraction", lambda: _foreground_rule(fp, kind))
    setting("train.loss", lambda: _loss_rule(kind))
    budget = _steps(
        setting, explicit, probe_step_seconds, budget_minutes, int(patch), int(batch), channel
    )
    setting("train.postprocess", lambda: _postprocess_rule(fp, kind))
    setting("evaluate.window", lambda: _window_rule(fp, scale, int(patch)))
    setting("evaluate.tta", lambda: _tta_rule(fp))
    assert set(out) == set(KEYS), f"the plan set {sorted(out)}, the table has {sorted(KEYS)}"
    params: dict[str, dict[str, Any]] = {}
    for key in KEYS:
        section, name = key.split(".")
        params.setdefault(section, {})[name] = out[key]["value"]
    return {
        "version": PLAN_VERSION,
        "params": params,
        "settings": {key: out[key] for key in KEYS},
        "structure": kind,
        "budget": budget,
        "fingerprint": dict(fp),
    }


def structure(fp: Mapping[str, Any]) -> dict[str, Any]:
    """What the objects are like, from the shapes of the fingerprint.

    Returns:
        ``kind``: ``thin`` (tubular: a class's pixel-weighted median area / thickness^2 over
        `ELONGATED`, e.g. vessels), ``dense`` (compact objects between thin background walls:
        the background's thickness under `DENSE_RATIO` of the objects' and `DENSE_OBJECTS`
        objects a case, e.g. cells in EM) or
        ``compact`` (organs, lesions); ``detail``: the finest thickness to resolve (px, median
        on the medial axis, the background's included); ``extent``: the largest class's
        pixel-weighted median extent (px); ``thickness_p90``: of the thinnest class.
    """
    shapes = fp["shapes"]
    fg = {name: s for name, s in shapes.items() if name != "background" and s.get("present_cases")}
    bg = shapes.get("background", {})
    thin = [n for n, s in fg.items() if s["elongation_pixel_median"] > ELONGATED]
    fg_thick = min(s["thickness_median"] for s in fg.values())
    bg_thick = bg.get("thickness_median") or math.inf
    if thin:
        kind = "thin"
    elif (
        bg_thick < DENSE_RATIO * fg_thick
        and max(s["components_case_median"] for s in fg.values()) >= DENSE_OBJECTS
    ):
        kind = "dense"
    else:
        kind = "compact"
    thinnest = min(fg.values(), key=lambda s: s["thickness_median"])
    return {
        "kind": kind,
        "thin_classes": thin,
        "detail": as_number(min(fg_thick, bg_thick)),
        "extent": as_number(max(s["extent_pixel_median"] for s in fg.values())),
        "thickness_p90": thinnest["thickness_p90"],
    }


def _fov_rule(fp: Mapping[str, Any]) -> tuple[str, str]:
    sources = fp.get("fov_sources") or {}
    dark, fg_dark = fp["border_dark_share"], fp["foreground_dark_share"]
    colour = 3 in fp["channels"] and fp["grey_as_rgb_cases"] < fp["cases"]
    given = " (FOV masks given for every training case: only where one is missing)"
    note = given if sources and set(sources) == {"given"} else ""
    cut = int(fp.get("fov_cut_cases", 0))
    if cut:
        return "whole_image", (
            f"the thresholded FOV leaves out labels in {cut} of {fp['cases']} training cases: "
            "dark regions here are anatomy"
        )
    if colour and dark >= DARK_SURROUND and fg_dark <= 0.01:
        return "threshold", (
            f"a photograph's black surround: {dark:.0%} of the border dark, "
            f"{fg_dark:.1%} of the foreground dark{note}"
        )
    why = "grey data: dark pixels are anatomy" if not colour else f"border {dark:.0%} dark"
    return "whole_image", f"no dark surround to cut ({why}){note}"


def _channel_rule(fp: Mapping[str, Any]) -> tuple[str, str]:
    sep = fp.get("separability")
    if 3 not in fp["channels"]:
        return "gray", "grey images"
    if fp["grey_as_rgb_cases"] == fp["cases"]:
        return "gray", "colour files whose three channels are equal"
    assert sep is not None
    best_grey = max(sep["green"], sep["gray"])
    if sep["rgb"] >= COLOUR_GAIN * best_grey:
        return "rgb", (
            f"colour carries the label: d' {sep['rgb']:.2f} with rgb against "
            f"{best_grey:.2f} for the best grey channel"
        )
    if sep["green"] >= sep["gray"]:
        return "green", (
            f"colour adds little, green separates best (d' green {sep['green']:.2f}, "
            f"gray {sep['gray']:.2f}, rgb {sep['rgb']:.2f})"
        )
    return "gray", (
        f"colour adds little, gray separates best (d' gray {sep['gray']:.2f}, "
        f"green {sep['green']:.2f}, rgb {sep['rgb']:.2f})"
    )


def _contrast_rule(fp: Mapping[str, Any], kind: Mapping[str, Any]) -> tuple[str, str]:
    if kind["kind"] == "thin" and 16 not in fp["bit_depths"]:
        return "clahe", "thin structures against an uneven background: local contrast (CLAHE)"
    if 16 in fp["bit_depths"]:
        return "none", "16-bit data: intensities are calibrated (CT, MR); CLAHE would bend them"
    return "none", f"{kind['kind']} structures: global intensity kept"


def _scale_rule(fp: Mapping[str, Any], kind: Mapping[str, Any]) -> tuple[float, str]:
    """The scale (<= 1) the cases are given to the network at, and why."""
    detail, extent = kind["detail"], kind["extent"]
    lowest = min(1.0, MIN_DETAIL_PX / max(detail, 1e-6))  # finer structures keep >= 8 px
    if kind["kind"] != "compact":
        if lowest >= 1.0:
            return 1.0, f"{kind['kind']} structures {detail:g} px thick: full resolution"
        return 1.0, f"{kind['kind']} structures: full resolution keeps their {detail:g} px detail"
    wanted = OBJECT_TARGET_PX / max(extent, 1e-6)
    scale = min(1.0, max(lowest, wanted))
    if scale >= MIN_SCALE_GAIN:
        return 1.0, f"median object {extent:g} px: fits a patch at full resolution"
    return scale, f"median object {extent:g} px, finest detail {detail:g} px"


def _resolution_rule(fp: Mapping[str, Any], kind: Mapping[str, Any]) -> tuple[int | None, str]:
    scale, why = _scale_rule(fp, kind)
    side = fp["size"]["longer_side_median"]
    if scale >= 1.0:
        return None, why
    max_side = max(32, round(side * scale / 16.0) * 16)
    if max_side >= side:
        return None, why
    return max_side, f"{why}: scaled to {max_side} px ({max_side / side:.2f} of {side:g})"


def _scale_of(fp: Mapping[str, Any], max_side: int | None) -> float:
    side = fp["size"]["longer_side_median"]
    return 1.0 if max_side is None or max_side >= side else max_side / side


def _ceil32(x: float) -> int:
    return math.ceil(x / 32.0) * 32


def _patch_rule(fp: Mapping[str, Any], kind: Mapping[str, Any], scale: float) -> tuple[int, str]:
    side = fp["size"]["longer_side_median"] * scale
    if kind["kind"] == "thin":
        t = kind["thickness_p90"] * scale
        patch = min(
            max(_ceil32(THIN_CONTEXT * t), PATCH_MIN), PATCH_MAX, max(_ceil32(side), PATCH_MIN)
        )
        return patch, f"thin structures up to {t:.3g} px thick (90th pct): {THIN_CONTEXT:g}x that"
    obj = kind["extent"] * scale
    patch = min(max(_ceil32(CONTEXT * obj), PATCH_MIN), PATCH_MAX, max(_ceil32(side), PATCH_MIN))
    where = "at full resolution" if scale >= 1.0 else f"at {scale:.2f} scale"
    return patch, f"median object {obj:.0f} px {where}: patch {patch} gives it context"


def _batch_rule(patch: int) -> tuple[int, str]:
    batch = min(BATCH_MAX, max(BATCH_MIN, round(BATCH_PIXELS / patch**2)))
    return (
        batch,
        f"{BATCH_PIXELS // 1024}k pixels a step (16 x 96^2) at patch {patch}, >= {BATCH_MIN}",
    )


def _foreground_rule(fp: Mapping[str, Any], kind: Mapping[str, Any]) -> tuple[float, str]:
    share = fp["foreground_share"]
    if share >= 0.5:
        return 0.0, f"foreground is the majority ({share:.0%}): uniform centres already hit it"
    if kind["kind"] == "thin":
        return 0.5, f"thin foreground, {share:.1%} of the FOV: half the patches on it"
    return 0.33, f"foreground {share:.1%} of the FOV: a third of the patches on it (nnU-Net)"


def _loss_rule(kind: Mapping[str, Any]) -> tuple[str, str]:
    return "bce_dice", "Dice + cross-entropy (nnU-Net's; medseg's DRIVE default)"


def _steps(
    setting: Callable[[str, Callable[[], tuple[Any, str]]], Any],
    explicit: Mapping[str, Any],
    probe: float | ProbeFn | None,
    budget_minutes: float | None,
    patch: int,
    batch: int,
    channel: str,
) -> dict[str, Any] | None:
    """Set ``train.patches_per_epoch`` and ``train.epochs`` (from explicit epochs, or from the
    budget and the step time); return the budget record (None with explicit epochs)."""
    if "train.epochs" in explicit:
        setting("train.patches_per_epoch", lambda: (
            STEPS_PER_EPOCH * batch, f"{STEPS_PER_EPOCH} steps of {batch} an epoch",
        ))  # fmt: skip
        setting("train.epochs", lambda: (0, ""))  # explicit: the rule is never called
        return None
    if budget_minutes is None:
        raise MedsegError(
            "params: train.epochs is auto, which needs train.budget (minutes of training); "
            "set one of them"
        )
    if probe is None:
        raise MedsegError("params: train.budget needs a step time: a probe or train.step_seconds")
    seconds = float(probe(patch, batch, 3 if channel == "rgb" else 1) if callable(probe) else probe)
    if not (math.isfinite(seconds) and seconds > 0):
        raise MedsegError(f"plan: the step time must be > 0 seconds, got {seconds}")
    usable = budget_minutes * 60.0 * TRAIN_SHARE
    total = int(usable / seconds)
    per_epoch = max(STEPS_PER_EPOCH, total // VALIDATIONS)
    ppe = int(setting("train.patches_per_epoch", lambda: (
        per_epoch * batch,
        f"{per_epoch} steps of {batch} an epoch: about {VALIDATIONS} validations a run, "
        f"each epoch at least {STEPS_PER_EPOCH} steps",
    )))  # fmt: skip
    per_epoch = math.ceil(ppe / batch)
    epochs = total // per_epoch
    if epochs < 1:
        need = per_epoch * seconds / TRAIN_SHARE / 60.0
        raise MedsegError(
            f"params: train.budget {budget_minutes:g} minutes is too small for one epoch "
            f"({per_epoch} steps at {seconds:.3g} s a step on this machine); give at least "
            f"{math.ceil(need * 10) / 10:g}, or set train.epochs"
        )
    steps = epochs * per_epoch
    setting("train.epochs", lambda: (epochs, (
        f"{steps} steps: {budget_minutes:g} min x {TRAIN_SHARE:g} at {seconds:.3g} s a step"
    )))  # fmt: skip
    return {
        "minutes": as_number(budget_minutes),
        "step_seconds": as_number(seconds),
        "steps": steps,
        "patch": patch,
        "batch": batch,
    }


def _window_rule(fp: Mapping[str, Any], scale: float, patch: int) -> tuple[int, str]:
    side = fp["size"]["longer_side_max"] * scale
    window = min(WINDOW_MAX, max(_ceil32(side), patch))
    if window >= side:
        return window, f"one window covers the largest case ({side:.0f} px at the model's scale)"
    return window, f"cases up to {side:.0f} px: windows of {WINDOW_MAX} (memory)"


def _tta_rule(fp: Mapping[str, Any]) -> tuple[bool, str]:
    cases = int(fp["cases"])
    if cases > TTA_MAX_CASES:
        return False, f"{cases} training cases: a large set, inference without the 4x of TTA"
    return True, "flip TTA (nnU-Net's mirroring): 4x inference time, steadier edges"


def _postprocess_rule(
    fp: Mapping[str, Any], kind: Mapping[str, Any]
) -> tuple[list[dict[str, Any]], str]:
    if kind["kind"] == "thin":
        return [], "thin structures: a missed pixel splits a vessel; no post-processing"
    shapes = fp["shapes"]
    fg = [s for n, s in shapes.items() if n != "background" and s.get("present_cases")]
    candidates: list[dict[str, Any]] = []
    why = []
    if all(s["components_case_median"] <= 1 for s in fg):
        candidates.append({"op": "keep_largest"})
        why.append("one object in most cases")
    if all(s["hole_share"] <= FILL_HOLES_MAX for s in fg):
        candidates.append({"op": "fill_holes"})
        why.append("objects without holes")
    smallest = min(s["area_p05"] for s in fg)
    min_size = int(smallest // 4)
    if min_size >= 4:
        candidates.append({"op": "drop_small", "min_size": min_size})
        why.append(f"components under a quarter of the 5th-pct object ({smallest:g} px)")
    if not candidates:
        return [], "none fits (several objects with holes, small ones)"
    return candidates, "tried on validation, kept where Dice rises: " + "; ".join(why)


# == output ====================================================================================


def write_plan(path: str | Path, plan_dict: Mapping[str, Any]) -> None:
    """Write ``plans.json`` atomically (whole or not at all)."""
    write_json(path, plan_dict)


def format_table(plan_dict: Mapping[str, Any]) -> str:
    """The plan as a short Markdown table for the stage log and ``medseg report``."""
    kind = plan_dict.get("structure", {})
    lines = [
        f"plan: {kind.get('kind', '?')} structures, detail {kind.get('detail', '?')} px, "
        f"object extent {kind.get('extent', '?')} px",
        "",
        "| setting | value | from | reason |",
        "| --- | --- | --- | --- |",
    ]
    for key, s in plan_dict["settings"].items():
        value = s["value"]
        if key == "train.postprocess":
            value = ", ".join(_spec_text(c) for c in value) or "none"
        shown = "null" if value is None else str(value)
        lines.append(f"| {key} | {shown} | {s['source']} | {s['reason']} |")
    return "\n".join(lines)


def _spec_text(spec: Mapping[str, Any]) -> str:
    return str(spec["op"]) + (f" {spec['min_size']}" if "min_size" in spec else "")
