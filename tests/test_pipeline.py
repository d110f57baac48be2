"""End to end: the real `dvc repro` on a temporary copy of the repository with tiny params."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import DRIVE, REPO, tiny_params, write_params

STAGES = ("synthesize", "convert", "preprocess", "train", "evaluate")


def _env() -> dict[str, str]:
    env = dict(os.environ)
    # dvc.yaml says `python`: make it this interpreter, with medseg installed
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
    )  # fmt: skip
    return env


def run(cwd: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    proc = subprocess.run(cmd, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran(proc: subprocess.CompletedProcess[str]) -> list[str]:
    return [s for s in STAGES if f"Running stage '{s}'" in proc.stdout]


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repository's pipeline, as its own git + DVC repository, with tiny params."""
    dest = tmp_path / "project"
    dest.mkdir()
    for name in ("dvc.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, dest / name)
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(dest / "params.yaml", tiny_params())
    run(dest, "git", "init", "-q")
    run(dest, "dvc", "init", "-q")
    run(dest, "dvc", "config", "core.analytics", "false")
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "tiny pipeline")
    return dest


def test_repro_caches_and_reruns_only_what_changed(project: Path):
    first = run(project, "dvc", "repro")
    assert ran(first) == list(STAGES)
    metrics = json.loads((project / "results" / "evaluate" / "metrics.json").read_text())
    for name in ("dice", "iou", "accuracy", "sensitivity", "specificity"):
        assert 0.0 <= metrics["test"]["fov"][name] <= 1.0, name
    assert metrics["n_images"] == 2
    overlays = sorted(p.name for p in (project / "results" / "evaluate" / "overlays").iterdir())
    assert overlays == ["01_test.png", "02_test.png"]
    assert (project / "models" / "model.safetensors").is_file()
    assert (project / "results" / "train" / "plots" / "metrics" / "val" / "dice.tsv").is_file()
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "first run")

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
    metrics_diff = run(project, "dvc", "metrics", "diff", "--all", "--json")
    assert "test.fov.dice" in json.loads(metrics_diff.stdout)["results/evaluate/metrics.json"]
    plots = run(project, "dvc", "plots", "show", "-o", "plots_html")
    assert plots.returncode == 0 and (project / "plots_html" / "index.html").is_file()


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


def test_preempted_train_resumes_on_the_next_repro(project: Path):
    """SIGTERM to dvc and its stage (as a spot instance's shutdown does), then `dvc repro` again."""
    params = tiny_params(train={"epochs": 3, "patches_per_epoch": 16})
    write_params(project / "params.yaml", params)
    run(project, "dvc", "repro", "preprocess")
    proc = subprocess.Popen(
        [sys.executable, "-m", "dvc", "repro"], cwd=project, env=_env(), start_new_session=True,
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
    assert list((project / "checkpoints").iterdir()) == []
    curve = project / "results" / "train" / "plots" / "metrics" / "train" / "loss.tsv"
    assert len(curve.read_text().splitlines()) == 1 + 3
    assert json.loads(run(project, "dvc", "status", "--json").stdout) == {}
