"""The fingerprint and the plan on small synthetic converted sets with known answers."""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from conftest import REPO, ran, run, write_params
from scipy import ndimage

from medseg.errors import MedsegError
from medseg.io.images import write_png
from medseg.planning.fingerprint import fingerprint, thin_labels
from medseg.planning.machine import describe
from medseg.planning.plan import format_table, plan
from medseg.planning.probe import probe_step_seconds
from medseg.planning.settings import DVC_PARAMS, KEYS, SETTINGS

FIXED_STEP = {"step_seconds": 0.3, "budget": 2.0}  # a plan with no probe

# every planned train key, as a plan would give them (small)
TINY_TRAIN = {
    "patch_size": 32, "batch_size": 2, "foreground_fraction": 0.5, "loss": "bce_dice",
    "epochs": 1, "patches_per_epoch": 2, "postprocess": [],
}  # fmt: skip

Case = tuple[np.ndarray, np.ndarray]  # image (H, W[, 3]) uint8, mask (H, W) bool


def write_converted(
    root: Path,
    make: Callable[[np.random.Generator], Case],
    n_train: int = 4,
    n_test: int = 2,
    names: tuple[str, ...] = ("background", "foreground"),
) -> Path:
    """A converted data set as the convert stage writes it: PNGs, manifest.csv, classes.json."""
    for sub in ("images", "masks", "fov"):
        (root / sub).mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n_train + n_test):
        split = "train" if i < n_train else "test"
        image, mask = make(rng)
        cid = f"{split}_{i:02d}"
        files = {sub: f"{sub}/{cid}.png" for sub in ("images", "masks", "fov")}
        write_png(root / files["images"], image)
        write_png(root / files["masks"], mask)
        write_png(root / files["fov"], np.ones(mask.shape, bool))
        rows.append(
            {
                "case_id": cid, "split": split, "image": files["images"],
                "mask": files["masks"], "fov": files["fov"], "source": f"{cid}.png",
                "source_format": "png", "bit_depth": 8,
                "channels": 1 if image.ndim == 2 else 3, "height": mask.shape[0],
                "width": mask.shape[1], "fov_source": "whole_image", "mask2": "",
            }
        )  # fmt: skip
    pd.DataFrame(rows).to_csv(root / "manifest.csv", index=False)
    (root / "classes.json").write_text(json.dumps({"names": list(names)}))
    return root


def vessels(rng: np.random.Generator, side: int = 192) -> Case:
    """Thin dark lines (2-3 px) on an unevenly lit colour background, darker in green."""
    mask = np.zeros((side, side), bool)
    yy, xx = np.mgrid[0:side, 0:side]
    for _ in range(10):
        a, b = rng.uniform(0, side, 2), rng.uniform(0, side, 2)
        d = b - a
        t = np.clip(((yy - a[0]) * d[0] + (xx - a[1]) * d[1]) / (d @ d), 0, 1)
        dist = np.hypot(yy - a[0] - t * d[0], xx - a[1] - t * d[1])
        mask |= dist < rng.uniform(1.0, 1.6)
    light = 0.6 + 0.4 * np.sin(yy / side * 3)[..., None]
    base = np.array([200.0, 120.0, 60.0]) * light
    base[..., 1] -= 50.0 * mask  # vessels: dark in green, hardly in red and blue
    base[..., 0] -= 5.0 * mask
    image = base + rng.normal(0, 6, base.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def blob(rng: np.random.Generator, side: int = 384) -> Case:
    """One large grey disc (radius ~ 0.3 side) on a noisy grey background."""
    yy, xx = np.mgrid[0:side, 0:side]
    c = rng.uniform(0.4, 0.6, 2) * side
    mask = np.hypot(yy - c[0], xx - c[1]) < side * rng.uniform(0.28, 0.32)
    image = 80 + 60 * mask + rng.normal(0, 15, mask.shape)
    return np.clip(image, 0, 255).astype(np.uint8), mask


def hue_lesion(rng: np.random.Generator, side: int = 160) -> Case:
    """A blob that differs from its background in hue only: the same luma, brown on blue-grey."""
    yy, xx = np.mgrid[0:side, 0:side]
    c = rng.uniform(0.35, 0.65, 2) * side
    mask = np.hypot(yy - c[0], xx - c[1]) < side * 0.25
    skin, lesion = np.array([110.0, 130.0, 160.0]), np.array([170.0, 115.0, 90.0])
    lesion *= (skin @ [0.299, 0.587, 0.114]) / (lesion @ [0.299, 0.587, 0.114])  # same luma
    image = np.where(mask[..., None], lesion, skin)
    shade = ndimage.gaussian_filter(rng.normal(0, 25, (side, side)), 3)[..., None]
    image = image + shade + rng.normal(0, 4, image.shape)  # texture shared by the channels
    return np.clip(image, 0, 255).astype(np.uint8), mask


def grey_of(make: Callable[[np.random.Generator], Case]) -> Callable[[np.random.Generator], Case]:
    def grey(rng: np.random.Generator) -> Case:
        image, mask = make(rng)
        return image if image.ndim == 2 else image[..., 1], mask

    return grey


def values(result: dict) -> dict:
    return {k: s["value"] for k, s in result["settings"].items()}


@pytest.fixture(scope="module")
def vessel_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_converted(tmp_path_factory.mktemp("vessels") / "conv", vessels)


@pytest.fixture(scope="module")
def blob_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_converted(tmp_path_factory.mktemp("blob") / "conv", blob)


def test_thin_vessels_small_patches_at_full_resolution(vessel_set: Path) -> None:
    fp = fingerprint(vessel_set)
    assert fp["cases"] == 4 and fp["channels"] == [3]
    shapes = fp["shapes"]["foreground"]
    assert 1.5 <= shapes["thickness_median"] <= 4.0  # lines 2-3 px wide
    result = plan(fp, {}, 0.25, 1.0)
    v = values(result)
    assert result["structure"]["kind"] == "thin"
    assert v["preprocess.max_side"] is None
    assert v["train.patch_size"] <= 96
    assert v["train.foreground_fraction"] == 0.5
    assert v["train.postprocess"] == []
    assert v["preprocess.contrast"] == "clahe"
    # the vessels are dark in green only: green, not rgb and not gray
    assert v["preprocess.channel"] == "green"
    assert set(result["settings"]) == set(KEYS)
    assert all(s["source"] == "plan" and s["reason"] for s in result["settings"].values())


def test_large_blob_downscaled_with_context(blob_set: Path) -> None:
    fp = fingerprint(blob_set)
    fg = fp["shapes"]["foreground"]
    diameter = 2 * 0.3 * 384
    assert abs(fg["extent_pixel_median"] - diameter) < 0.1 * diameter
    assert fg["components_case_median"] == 1
    result = plan(fp, {}, 0.25, 1.0)
    v = values(result)
    assert result["structure"]["kind"] == "compact"
    assert v["preprocess.channel"] == "gray"
    assert v["preprocess.max_side"] is not None and v["preprocess.max_side"] < 384
    scale = v["preprocess.max_side"] / 384
    assert v["train.patch_size"] >= 128
    assert v["train.patch_size"] >= 1.5 * diameter * scale  # the object with context around it
    assert v["train.batch_size"] >= 4
    ops = [c["op"] for c in v["train.postprocess"]]
    assert "keep_largest" in ops and "fill_holes" in ops
    assert f"{fg['extent_pixel_median']:g}" in result["settings"]["preprocess.max_side"]["reason"]


def test_colour_that_carries_the_label_gives_rgb(tmp_path: Path) -> None:
    fp = fingerprint(write_converted(tmp_path / "conv", hue_lesion))
    sep = fp["separability"]
    assert sep["rgb"] > 2 * max(sep["gray"], sep["green"])
    assert values(plan(fp, {}, 0.25, 1.0))["preprocess.channel"] == "rgb"


def test_grey_images_give_gray(tmp_path: Path) -> None:
    fp = fingerprint(write_converted(tmp_path / "conv", grey_of(vessels)))
    assert fp["channels"] == [1]
    assert values(plan(fp, {}, 0.25, 1.0))["preprocess.channel"] == "gray"


def test_label_map_classes_are_sized_each(tmp_path: Path) -> None:
    def vessels_and_disc(rng: np.random.Generator) -> Case:
        image, mask = vessels(rng)
        labels = mask.astype(np.uint8)
        yy, xx = np.mgrid[0 : mask.shape[0], 0 : mask.shape[1]]
        labels[np.hypot(yy - 96, xx - 96) < 40] = 2  # a disc over the vessels
        return image, labels

    names = ("background", "vessel", "disc")
    fp = fingerprint(write_converted(tmp_path / "conv", vessels_and_disc, names=names))
    assert fp["classes"] == list(names) and set(fp["class_share"]) == {"vessel", "disc"}
    disc = fp["shapes"]["disc"]
    assert disc["components_case_median"] == 1 and 70 <= disc["extent_pixel_median"] <= 90
    result = plan(fp, {}, 0.25, 1.0)
    assert result["structure"]["kind"] == "thin"  # the vessels decide: full resolution
    assert result["structure"]["thin_classes"] == ["vessel"]
    assert values(result)["preprocess.max_side"] is None


def test_explicit_values_win_and_the_rules_follow_them(vessel_set: Path) -> None:
    fp = fingerprint(vessel_set)
    explicit = {"train.patch_size": 192, "preprocess.channel": "rgb", "train.loss": "cldice"}
    result = plan(fp, explicit, 0.25, 1.0)
    for key, value in explicit.items():
        s = result["settings"][key]
        assert s == {"value": value, "source": "explicit", "reason": "explicit in params.yaml"}
    # the batch follows the explicit patch: 16 x 96^2 pixels at 192 is 4
    assert result["settings"]["train.batch_size"]["value"] == 4
    assert result["budget"]["patch"] == 192
    assert "explicit" in format_table(result)


def test_explicit_epochs_set_the_steps_without_a_budget(vessel_set: Path) -> None:
    fp = fingerprint(vessel_set)
    result = plan(fp, {"train.epochs": 3, "train.patches_per_epoch": 64}, None, None)
    v = values(result)
    assert v["train.epochs"] == 3
    assert v["train.patches_per_epoch"] == 64
    assert result["budget"] is None
    assert result["params"]["train"]["epochs"] == 3


def test_steps_from_budget_and_step_time(vessel_set: Path) -> None:
    fp = fingerprint(vessel_set)
    result = plan(fp, {}, 0.5, 10.0)
    v = values(result)
    # 1020 steps fit: 20 validations, epochs of 51 steps
    assert result["budget"]["steps"] == int(600 * 0.85 / 0.5) == 20 * 51
    assert (v["train.epochs"], v["train.patches_per_epoch"]) == (20, 51 * v["train.batch_size"])
    # twice the step time, half the steps: 510, in epochs of at least 32 steps (15 of them)
    slow = plan(fp, {}, 1.0, 10.0)
    assert slow["budget"]["steps"] == (int(600 * 0.85) // 32) * 32 == 15 * 32
    assert values(slow)["train.epochs"] == 15
    # an explicit epoch size sets the steps per epoch: 992 steps of ceil(100 / batch)
    per_epoch = math.ceil(100 / v["train.batch_size"])
    odd = values(plan(fp, {"train.patches_per_epoch": 100}, 0.5, 10.0))
    assert odd["train.epochs"] == int(600 * 0.85 / 0.5) // per_epoch


def test_probe_function_is_called_with_the_planned_patch_and_batch(vessel_set: Path) -> None:
    fp = fingerprint(vessel_set)
    calls = []

    def probe(patch: int, batch: int, channels: int) -> float:
        calls.append((patch, batch, channels))
        return 0.2

    result = plan(fp, {"preprocess.channel": "rgb"}, probe, 1.0)
    v = values(result)
    assert calls == [(v["train.patch_size"], v["train.batch_size"], 3)]
    assert result["budget"]["step_seconds"] == 0.2


def test_deterministic(vessel_set: Path, tmp_path: Path) -> None:
    path = _params_file(tmp_path, train={"step_seconds": 0.3, "budget": 2.0})
    _run_plan_stage(path, vessel_set, tmp_path / "a.json")
    _run_plan_stage(path, vessel_set, tmp_path / "b.json")
    assert (tmp_path / "a.json").read_bytes() == (tmp_path / "b.json").read_bytes()
    written = json.loads((tmp_path / "a.json").read_text())
    assert written["settings"] == plan(fingerprint(vessel_set), {}, 0.3, 2.0)["settings"]


def test_test_cases_are_never_read(vessel_set: Path, tmp_path: Path) -> None:
    before = fingerprint(vessel_set)
    copy = tmp_path / "conv"
    shutil.copytree(vessel_set, copy)
    manifest = pd.read_csv(copy / "manifest.csv", dtype=str, keep_default_na=False)
    tests = manifest[manifest["split"] == "test"]
    assert len(tests) == 2
    for row in tests.itertuples():
        (copy / row.image).write_bytes(b"not an image")  # would raise if opened
        (copy / row.mask).unlink()
        (copy / row.fov).unlink()
    assert fingerprint(copy) == before


def test_more_cases_than_max_cases_are_sampled(vessel_set: Path) -> None:
    fp = fingerprint(vessel_set, max_cases=2)
    assert fp["cases"] == 4 and fp["cases_read"] == 2
    assert fingerprint(vessel_set, max_cases=2) == fp


def test_fewer_than_two_training_cases_is_one_error(tmp_path: Path) -> None:
    conv = write_converted(tmp_path / "conv", vessels, n_train=1)
    with pytest.raises(MedsegError, match=r"manifest\.csv: 1 training case\(s\)"):
        _run_plan_stage(_params_file(tmp_path, train=FIXED_STEP), conv, tmp_path / "plans.json")
    assert not (tmp_path / "plans.json").exists()


def test_no_foreground_is_one_error(tmp_path: Path) -> None:
    def empty(rng: np.random.Generator) -> Case:
        image, mask = blob(rng, 64)
        return image, np.zeros_like(mask)

    conv = write_converted(tmp_path / "conv", empty)
    with pytest.raises(MedsegError, match=r"masks: no foreground in any of the 4 training"):
        _run_plan_stage(_params_file(tmp_path, train=FIXED_STEP), conv, tmp_path / "plans.json")
    assert not (tmp_path / "plans.json").exists()


def test_budget_too_small_for_one_epoch(vessel_set: Path) -> None:
    fp = fingerprint(vessel_set)
    with pytest.raises(MedsegError, match=r"train\.budget 0\.1 minutes is too small"):
        plan(fp, {}, 1.0, 0.1)
    with pytest.raises(MedsegError, match=r"train\.epochs is auto, which needs train\.budget"):
        plan(fp, {}, 1.0, None)


def test_table_has_every_setting(vessel_set: Path) -> None:
    table = format_table(plan(fingerprint(vessel_set), {}, 0.3, 2.0))
    for key in KEYS:
        assert f"| {key} |" in table


def test_probe_times_real_steps() -> None:
    from medseg.config import load_params
    from medseg.config.sections import TrainConfig

    cfg = load_params(REPO / "params.yaml", TrainConfig, {"params": {"train": TINY_TRAIN}})
    small = dataclasses.replace(
        cfg, patch_size=32, batch_size=2, decoder_channels=[16, 8, 8, 8, 8], device="cpu",
        amp_cpu=False,
    )  # fmt: skip
    probe = probe_step_seconds(small, 3, steps=1, warmup=1)
    assert math.isfinite(probe.seconds) and 0.0 < probe.seconds < 60.0
    assert probe.threads >= 1 and probe.other_cores >= 0.0


def test_thin_labels_are_the_tubular_classes_of_the_masks():
    yy, xx = np.mgrid[:128, :128]
    masks = []
    for shift in (0, 7):
        mask = np.zeros((128, 128), np.uint8)
        for row in range(10 + shift, 120, 24):  # label 1: long 2-pixel lines (vessels)
            mask[row : row + 2, 5:123] = 1
        mask[(yy - 64 - shift) ** 2 + (xx - 80) ** 2 < 15**2] = 2  # label 2: a disc (an organ)
        masks.append(mask)
    assert thin_labels(masks, [1, 2]) == {1}
    assert thin_labels(masks[:1], [2]) == set()
    assert thin_labels([np.zeros((8, 8), np.uint8)], [1]) == set()  # absent: not thin


# == the plan in the pipeline: params, the stage ==================================================


def _params_file(tmp_path: Path, **sections: dict) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for section, values in sections.items():
        params[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


def test_auto_keys_need_the_plan_and_take_its_values(tmp_path: Path) -> None:
    from medseg.config import load_all_params, load_params
    from medseg.config.sections import PreprocessConfig, TrainConfig

    path = _params_file(tmp_path, train={"batch_size": 6})
    load_all_params(path)  # the whole file checks without a plan
    with pytest.raises(MedsegError, match=r"train\.patch_size, .* are auto, which the plan"):
        load_params(path, TrainConfig)
    plan_dict = {"params": {"train": {**TINY_TRAIN, "patch_size": 64, "batch_size": 3}}}
    cfg = load_params(path, TrainConfig, plan_dict)
    assert cfg.patch_size == 64  # auto: the plan's
    assert cfg.batch_size == 6  # explicit: params.yaml's, whatever the plan says
    with pytest.raises(MedsegError, match=r"no value for preprocess\.channel"):
        load_params(path, PreprocessConfig, plan_dict)
    bad = {"params": {"train": {**TINY_TRAIN, "patch_size": 50}}}
    with pytest.raises(MedsegError, match=r"train\.patch_size must be .* come from plans\.json"):
        load_params(path, TrainConfig, bad)


def train_batch(plan_dict: dict) -> int:
    return int(plan_dict["params"]["train"]["batch_size"])


def _run_plan_stage(params: Path, converted: Path, out: Path, machine: Path | None = None) -> None:
    """The plan stage's main, with this machine's record (the machine stage's) unless given."""
    import importlib.util

    from medseg.io.atomic import write_json
    from medseg.planning.machine import describe

    if machine is None:
        machine = out.parent / "machine.json"
        write_json(machine, describe())
    spec = importlib.util.spec_from_file_location("plan_stage", REPO / "stages" / "plan.py")
    assert spec and spec.loader
    stage = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(stage)
    argv = ["--params", str(params), "--converted", str(converted), "--out", str(out)]
    stage.main([*argv, "--machine", str(machine)])


def test_stage_writes_the_plan_the_stages_read(vessel_set: Path, tmp_path: Path) -> None:
    from medseg.config import load_params
    from medseg.config.sections import EvaluateConfig, PreprocessConfig, TrainConfig

    path = _params_file(
        tmp_path,
        train={"budget": 1.0, "step_seconds": 0.25, "patch_size": 64},
        preprocess={"contrast": "none"},
    )
    out = tmp_path / "plans.json"
    _run_plan_stage(path, vessel_set, out)
    written = json.loads(out.read_text())
    settings = written["settings"]
    assert settings["train.patch_size"]["source"] == "explicit"
    assert settings["preprocess.contrast"]["source"] == "explicit"
    assert settings["preprocess.channel"]["source"] == "plan"
    per_epoch = written["params"]["train"]["patches_per_epoch"] // train_batch(written)
    assert written["budget"]["steps"] == written["params"]["train"]["epochs"] * per_epoch
    train = load_params(path, TrainConfig, out)
    assert (train.patch_size, train.epochs) == (64, written["params"]["train"]["epochs"])
    assert train.batch_size == settings["train.batch_size"]["value"]
    pre = load_params(path, PreprocessConfig, out)
    assert (pre.channel, pre.contrast) == (settings["preprocess.channel"]["value"], "none")
    assert load_params(path, EvaluateConfig, out).window == settings["evaluate.window"]["value"]


def test_stage_refuses_a_budget_too_small_and_writes_nothing(
    vessel_set: Path, tmp_path: Path
) -> None:
    path = _params_file(tmp_path, train={"budget": 0.01, "step_seconds": 1.0})
    out = tmp_path / "plans.json"
    with pytest.raises(MedsegError, match=r"train\.budget 0\.01 minutes is too small"):
        _run_plan_stage(path, vessel_set, out)
    assert not out.exists()


def test_stage_keeps_the_measured_step_while_the_step_is_the_same(
    vessel_set: Path, tmp_path: Path
) -> None:
    small = {"decoder_channels": [16, 8, 8, 8, 8], "patch_size": 32, "batch_size": 2}
    path = _params_file(tmp_path, train={**small, "budget": 5.0, "amp_cpu": False})
    out = tmp_path / "plans.json"
    _run_plan_stage(path, vessel_set, out)
    first = json.loads(out.read_text())["budget"]
    assert first["probe"]["step"] == [2, first["probe"]["step"][1], 32]
    assert first["step_seconds"] > 0
    # a rerun (new data, new code) keeps the measured step time: the same steps are planned
    first["step_seconds"] = 0.125  # marks the kept value
    whole = json.loads(out.read_text())
    whole["budget"] = first
    out.write_text(json.dumps(whole))
    _run_plan_stage(path, vessel_set, out)
    assert json.loads(out.read_text())["budget"]["step_seconds"] == 0.125
    # the same step on another machine (the machine stage's record differs) is measured again
    other = tmp_path / "other-machine.json"
    other.write_text(json.dumps({**describe(), "cpu": "another CPU", "gpus": ["a GPU"]}))
    _run_plan_stage(path, vessel_set, out, machine=other)
    moved = json.loads(out.read_text())["budget"]
    assert moved["step_seconds"] != 0.125 and moved["probe"]["machine"]["cpu"] == "another CPU"
    # another step (a larger patch) is measured again
    path = _params_file(
        tmp_path, train={**small, "patch_size": 64, "budget": 5.0, "amp_cpu": False}
    )
    _run_plan_stage(path, vessel_set, out)
    again = json.loads(out.read_text())["budget"]
    assert again["probe"]["step"][2] == 64 and again["step_seconds"] != 0.125


def test_a_probe_beside_a_busy_process_warns_and_is_not_kept(
    vessel_set: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    small = {"decoder_channels": [16, 8, 8, 8, 8], "patch_size": 32, "batch_size": 2}
    path = _params_file(tmp_path, train={**small, "budget": 5.0, "amp_cpu": False})
    out = tmp_path / "plans.json"
    spinner = subprocess.Popen([sys.executable, "-c", "while True:\n    pass\n"])
    try:
        time.sleep(0.5)
        _run_plan_stage(path, vessel_set, out)
    finally:
        spinner.kill()
        spinner.wait()
    budget = json.loads(out.read_text())["budget"]
    assert budget["probe"]["busy"] > 0.5 and budget["step_seconds"] > 0
    assert "other processes kept" in caplog.text and "measures again" in caplog.text
    # the next run does not keep the busy figure, although the step is the same
    budget["step_seconds"] = 0.125
    whole = json.loads(out.read_text())
    whole["budget"] = budget
    out.write_text(json.dumps(whole))
    _run_plan_stage(path, vessel_set, out)
    assert json.loads(out.read_text())["budget"]["step_seconds"] != 0.125


# == end to end: dvc repro with auto ==============================================================


def test_dvc_repro_with_auto_plans_and_the_stages_follow(reproduced: Path) -> None:
    """The session's pipeline leaves channel, contrast, resolution, foreground share, loss,
    post-processing, TTA, FOV fallback and threshold to the plan: what the stages used is what
    plans.json says, and `medseg report` shows the plan."""
    from medseg.review.report import compare, to_markdown

    written = json.loads((reproduced / "plans.json").read_text())
    settings = written["settings"]
    assert settings["preprocess.channel"]["source"] == "plan"
    assert settings["train.patch_size"] == {
        "value": 32, "source": "explicit", "reason": "explicit in params.yaml",
    }  # fmt: skip
    record = json.loads((reproduced / "models" / "preprocess.json").read_text())
    assert record["channel"] == settings["preprocess.channel"]["value"]
    assert record["contrast"] == settings["preprocess.contrast"]["value"]
    convert = json.loads((reproduced / "models" / "convert.json").read_text())
    assert convert["fov_fallback"] == settings["convert.fov_fallback"]["value"] != "auto"
    text = to_markdown(compare(reproduced, base="main"))
    assert "### Plan" in text and "| train.patch_size | 32 | explicit |" in text


def test_an_explicit_value_overrides_the_plan_through_dvc(reproduced: Path) -> None:
    planned = json.loads((reproduced / "plans.json").read_text())["params"]["preprocess"]
    other = "gray" if planned["channel"] != "gray" else "rgb"
    params = yaml.safe_load((reproduced / "params.yaml").read_text())
    params["preprocess"]["channel"] = other
    write_params(reproduced / "params.yaml", params)
    proc = run(reproduced, "dvc", "repro")
    assert ran(proc) == ["plan", "preprocess", "train", "evaluate"]
    setting = json.loads((reproduced / "plans.json").read_text())["settings"]["preprocess.channel"]
    assert setting == {"value": other, "source": "explicit", "reason": "explicit in params.yaml"}
    record = json.loads((reproduced / "models" / "preprocess.json").read_text())
    assert record["channel"] == other
    diff = run(reproduced, "dvc", "params", "diff", "--json").stdout
    assert '"params.preprocess.channel"' in diff  # review sees what the plan's output changed


def test_the_table_of_planned_settings_is_the_one_declaration() -> None:
    """Each planned key is declared once (`medseg.planning.settings`): its rule is a function of
    the plan module, its key a params key with a stand-in that validates, and the plan stage's
    DVC params in dvc.yaml are exactly the table's keys and what the probe measures, so a key
    set explicitly, re-planned, then set back to auto reruns the plan."""
    import medseg.planning.plan as plan_module
    from medseg.config import load_all_params

    for setting in SETTINGS:
        assert callable(getattr(plan_module, setting.rule, None)), setting
    stage = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]["plan"]
    assert tuple(stage["params"]) == DVC_PARAMS
    params = load_all_params(REPO / "params.yaml")  # every auto key by its stand-in
    for setting in SETTINGS:
        section = getattr(params, setting.section)
        value = getattr(section, setting.name)
        raw = yaml.safe_load((REPO / "params.yaml").read_text())[setting.section][setting.name]
        if raw == "auto" and not setting.before_plan:
            assert value == setting.stand_in, setting.key


def test_a_key_outside_the_table_is_refused(vessel_set: Path) -> None:
    """The rules set exactly the table's keys: a key the plan would set but the table does not
    declare stops the plan (a programming error, caught by this test, not by a user)."""
    import medseg.planning.plan as plan_module

    fp = fingerprint(vessel_set)
    original = plan_module.KEYS
    try:
        plan_module.KEYS = (*original, "train.lr")
        with pytest.raises(AssertionError, match="the table has"):
            plan(fp, {}, 0.3, 2.0)
    finally:
        plan_module.KEYS = original


def test_the_machine_record_is_stable_names_the_cpu_and_imports_no_torch(tmp_path: Path) -> None:
    """The machine stage's record: the same twice on one machine (so nothing after it reruns),
    the CPU model and speed flags read from cpuinfo, and no torch import (it runs on every
    `dvc repro`)."""
    assert describe() == describe()
    info = tmp_path / "cpuinfo"
    info.write_text(
        "processor\t: 0\nmodel name\t: Some CPU @ 2.0GHz\n"
        "flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 amx_bf16 hypervisor\n\n"
        "processor\t: 1\nmodel name\t: Some CPU @ 2.0GHz\nflags\t\t: fpu\n"
    )
    record = describe(info)
    assert record["cpu"] == "Some CPU @ 2.0GHz"
    assert record["cpu_flags"] == ["avx2", "fma", "avx512f", "avx512_bf16", "amx_bf16"]
    code = "import sys; from medseg.planning.machine import describe; describe(); "
    code += "print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


class _Run:
    """What the step-time check reads of a trainer: its params and the epoch's clock."""

    def __init__(self, seconds: float, steps: int, batch: int = 4) -> None:
        self.cfg = type("Cfg", (), {"batch_size": batch})()
        self.clock = {"start": 100.0, "end": 100.0 + seconds * steps, "images": steps * batch}
        self.epoch, self.history = 1, []

    def best(self) -> dict[str, float]:
        return {}


@pytest.mark.parametrize(("seconds", "warned"), [(0.1, False), (0.19, False), (0.25, True),
                                                 (0.04, True)])  # fmt: skip
def test_train_warns_when_its_step_time_is_twice_the_plans_either_way(
    seconds: float, warned: bool, caplog: pytest.LogCaptureFixture
) -> None:
    from medseg.training.callbacks import StepTimeCheck

    check = StepTimeCheck(planned=0.1)
    with caplog.at_level(logging.INFO):
        check.on_epoch_end(_Run(seconds, 50), {})
        check.on_epoch_end(_Run(10 * seconds, 50), {})  # the first epoch only
    assert check.measured == pytest.approx(seconds)
    assert [r.levelname for r in caplog.records] == ["WARNING" if warned else "INFO"]
    assert "the plan bought its steps at 0.1 s" in caplog.text
