"""End to end: the real `dvc repro` on a temporary copy of the repository with tiny params."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import (
    DRIVE,
    FIRST_REPRO,
    STAGES,
    dvc_env,
    ran,
    run,
    tiny_params,
    write_params,
)
from PIL import Image


def test_repro_caches_and_reruns_only_what_changed(_reproduced: Path, reproduced: Path):
    # the session's one `dvc repro` of a fresh project ran every stage; a copy of it goes on
    first = (_reproduced.parent / FIRST_REPRO).read_text()
    assert [s for s in STAGES if f"Running stage '{s}'" in first] == list(STAGES)
    project = reproduced
    metrics = json.loads((project / "results" / "evaluate" / "metrics.json").read_text())
    for name in ("dice", "iou", "accuracy", "sensitivity", "specificity", "mcc", "auc_pr"):
        assert metrics["test"]["fov"][name] is None or -1.0 <= metrics["test"]["fov"][name] <= 1.0
    # vessels: boundary distances, no lesion counts (thin structures)
    blocks = {"fov", "fov_per_image_mean", "fov_per_image_std", "whole_image", "boundary"}
    assert set(metrics["test"]) == blocks
    assert metrics["boundary_unit"] == "px"  # the synthetic DICOM cases have no spacing
    assert metrics["n_images"] == 2
    overlays = sorted(p.name for p in (project / "results" / "evaluate" / "overlays").iterdir())
    assert overlays == ["01_test.png", "02_test.png"]
    assert (project / "models" / "model.safetensors").is_file()
    assert (project / "results" / "train" / "plots" / "metrics" / "val" / "dice.tsv").is_file()
    again = run(project, "dvc", "repro")
    assert ran(again) == []
    status = run(project, "dvc", "status", "--json")
    assert json.loads(status.stdout) == {}

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["train"]["lr"] = 0.02
    write_params(project / "params.yaml", params)
    changed = run(project, "dvc", "repro")
    assert ran(changed) == ["train", "evaluate"]
    diff = json.loads(run(project, "dvc", "params", "diff", "--json").stdout)
    assert diff["params.yaml"]["train.lr"]["new"] == 0.02
    # a real edit of the losses module reruns train and no stage before it (the README says
    # so); this edit leaves the weights as they were, so evaluate stays cached
    losses = project / "src" / "medseg" / "training" / "losses.py"
    losses.write_text(losses.read_text() + "\n# an edit\n")
    edited = run(project, "dvc", "repro")
    assert ran(edited) == ["plan", "train"], edited.stdout
    metrics_diff = run(project, "dvc", "metrics", "diff", "--all", "--json")
    diffed = json.loads(metrics_diff.stdout)["results/evaluate/metrics.json"]
    assert {"test.fov.dice", "test.boundary.hd95.mean", "test.boundary.nsd.p05"} <= set(diffed)
    plots = run(project, "dvc", "plots", "show", "-o", "plots_html")
    assert plots.returncode == 0 and (project / "plots_html" / "index.html").is_file()
    _check_evaluate_plots(project)
    _check_predict_matches_evaluate(project)


def _check_evaluate_plots(project: Path) -> None:
    """`dvc plots show` renders every evaluate plot: curves, confusion matrix, images."""
    shown = json.loads(run(project, "dvc", "plots", "show", "--json").stdout)
    assert not shown.get("errors")
    data = shown["data"]
    for name in ("roc.csv", "pr.csv", "confusion.csv"):
        (plot,) = data[f"results/evaluate/{name}"]
        assert plot["type"] == "vega" and plot["content"]["data"]["values"]
    confusion = data["results/evaluate/confusion.csv"][0]["content"]
    assert len(confusion["data"]["values"]) == 4  # one row per cell, not per pixel
    assert "pixel_count" in json.dumps(confusion["spec"])  # our template, not DVC's counting one
    pr = data["results/evaluate/pr.csv"][0]["content"]
    assert pr["encoding"]["x"]["field"] == "recall" and len(pr["data"]["values"]) == 201
    for sub in ("overlays", "probabilities"):
        for case in ("01_test", "02_test"):
            (image,) = data[f"results/evaluate/{sub}/{case}.png"]
            assert image["type"] == "image"
    html = (project / "plots_html" / "index.html").read_text()
    assert "confusion.csv" in html and "probabilities" in html


def _check_predict_matches_evaluate(project: Path) -> None:
    """`medseg predict` with only the models folder, on the raw test files, gives the
    probabilities `evaluate` gave."""
    assert (project / "models" / "preprocess.json").read_bytes() == (
        project / "data" / "processed" / "preprocess.json"
    ).read_bytes()
    test = project / "data" / "raw" / "synthetic" / "test"
    proc = run(
        project, sys.executable, "-c", "from medseg.cli import main; main()", "predict",
        "--model", "models/model.safetensors",  # its preprocess.json lies beside it
        "--out", "predicted", str(test / "images"), "--fov", str(test / "mask"),
        "--probabilities", "--window", "64",
    )  # fmt: skip
    assert "wrote 2 mask(s)" in proc.stdout
    for case in ("01_test", "02_test"):
        mine = np.asarray(Image.open(project / "predicted" / "probabilities" / f"{case}.png"))
        theirs = np.asarray(Image.open(project / "results/evaluate/probabilities" / f"{case}.png"))
        assert mine.shape == theirs.shape
        assert np.abs(mine.astype(np.float64) / 65535 * 255 - theirs).max() <= 0.51


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": {"lrr": 0.1}}, "unknown key train.lrr"),
        ({"train": {"epochs": "two"}}, "train.epochs must be of type int"),
        ({"train": {"encoder": "resnet19"}}, "train.encoder 'resnet19'"),
    ],
)
def test_bad_params_stop_with_one_clear_line(project: Path, changes: dict, message: str):
    write_params(project / "params.yaml", tiny_params(**changes))
    proc = run(project, "dvc", "repro", check=False)
    assert proc.returncode != 0
    output = proc.stdout + proc.stderr
    assert message in output
    assert "Traceback" not in output
    if "encoder" not in changes.get("train", {}):
        # the whole file is checked by the first stage, before any work
        assert not (project / "data").exists()
    assert not (project / "models").exists()


def test_missing_data_root_names_the_path(project: Path):
    write_params(project / "params.yaml", tiny_params(data={"root": "no/such/folder"}))
    proc = run(project, "dvc", "repro", "convert", "--single-item", check=False)
    assert proc.returncode != 0
    assert "no/such/folder" in proc.stdout + proc.stderr
    assert not (project / "data" / "converted").exists()


@pytest.mark.slow
@pytest.mark.skipif(not DRIVE.is_dir(), reason="the DRIVE data set is not in ../shared/datasets")
def test_drive_end_to_end(project: Path):
    """DRIVE through the real pipeline, briefly trained: a sanity floor, not a target."""
    params = tiny_params(
        data={"root": str(DRIVE)},
        train={"epochs": 2, "patches_per_epoch": 256, "batch_size": 16, "patch_size": 96},
        evaluate={"window": 512},
    )
    write_params(project / "params.yaml", params)
    run(project, "dvc", "repro")
    metrics = json.loads((project / "results" / "evaluate" / "metrics.json").read_text())
    assert metrics["n_images"] == 20
    assert metrics["test"]["fov"]["dice"] > 0.5
    assert metrics["test"]["fov"]["auc_roc"] > 0.85


@pytest.mark.slow  # a fresh pipeline run; resume after SIGTERM: test_training.py
def test_preempted_train_resumes_on_the_next_repro(project: Path):
    """SIGTERM to dvc and its stage (as a spot instance's shutdown does), then `dvc repro` again."""
    params = tiny_params(train={"epochs": 3, "patches_per_epoch": 16})
    write_params(project / "params.yaml", params)
    run(project, "dvc", "repro", "preprocess")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, env=dvc_env(), start_new_session=True,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    checkpoint = project / "checkpoints" / "checkpoint.pt"
    deadline = time.monotonic() + 600
    while not checkpoint.exists() and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    assert "stopped by SIGTERM" in out
    assert checkpoint.is_file()

    again = run(project, "dvc", "repro")
    assert "resuming from" in again.stdout + again.stderr
    assert ran(again) == ["train", "evaluate"]
    assert [p.name for p in (project / "checkpoints").iterdir()] == ["README.txt"]
    curve = project / "results" / "train" / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(curve.read_text().splitlines()) == 1 + 3
    assert json.loads(run(project, "dvc", "status", "--json").stdout) == {}


@pytest.mark.slow  # a fresh pipeline run; label maps are tested stage by stage elsewhere
def test_label_maps_with_named_classes_through_the_dag(project: Path):
    """The multi-class synthetic variant (1 vessel, 2 optic disc) with data.classes naming
    both: convert keeps the label maps, train uses softmax over 3 labels, metrics name each
    class, `dvc metrics diff` reads them, predict writes label maps."""
    params = tiny_params(
        synthesize={"labels": "vessels_disc"},
        data={"classes": {"vessel": 1, "disc": 2}},
        train={"classes": 3, "epochs": 2},
    )
    write_params(project / "params.yaml", params)
    assert ran(run(project, "dvc", "repro")) == list(STAGES)
    classes = json.loads((project / "data" / "converted" / "classes.json").read_text())
    assert classes == {"names": ["background", "vessel", "disc"]}
    mask = np.asarray(Image.open(next((project / "data" / "converted" / "masks").iterdir())))
    assert set(np.unique(mask)) == {0, 1, 2}
    metrics = json.loads((project / "results" / "evaluate" / "metrics.json").read_text())
    assert set(metrics["test"]["classes"]) == {"vessel", "disc"}
    for name in ("vessel", "disc"):
        assert 0.0 <= metrics["test"]["classes"][name]["fov"]["dice"] <= 1.0
    conf = (project / "results" / "evaluate" / "confusion.csv").read_text()
    assert "disc" in conf and "vessel" in conf
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "multi-class run")
    params["train"]["lr"] = 0.01
    write_params(project / "params.yaml", params)
    assert ran(run(project, "dvc", "repro")) == ["train", "evaluate"]
    diff = json.loads(run(project, "dvc", "metrics", "diff", "--all", "--json").stdout)
    keys = diff["results/evaluate/metrics.json"]
    assert "test.classes.disc.fov.dice" in keys and "test.classes.vessel.fov.auc_roc" in keys
    image = next((project / "data" / "raw" / "synthetic" / "test" / "images").glob("*.tif"))
    run(project, "medseg", "predict", "--model", "models", "--out", "pred", str(image))
    assert set(np.unique(np.asarray(Image.open(project / "pred" / f"{image.stem}.png")))) <= {
        0, 1, 2,
    }  # fmt: skip
