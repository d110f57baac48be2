"""bench/gpu.sh's harness on a CPU: its table survives what a GPU run can throw at it."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tarfile
from datetime import datetime
from pathlib import Path

import pytest
import yaml
from conftest import REPO

SUMMARY = REPO / "bench" / "gpu_summary.py"
STAMP = REPO / "bench" / "gpu_stamp.py"
T0 = 1_800_000_000.0  # the stages' clock, time.time() seconds


def _table(work: Path) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, str(SUMMARY), str(work), "--out", str(work / "summary.md")],
        capture_output=True, text=True, timeout=60, check=True,
    )  # fmt: skip
    rows = [
        line.strip("|").split("|") for line in proc.stdout.splitlines() if line.startswith("| ")
    ]
    assert (work / "summary.md").read_text().strip() == proc.stdout.strip()
    return {name.strip(): value.strip() for name, value in rows[1:]}


def _smi_stamp(t: float) -> str:
    return datetime.fromtimestamp(t).strftime("%Y/%m/%d %H:%M:%S.%f")[:-3]


def _clock(epoch: int, start: float, end: float) -> str:
    clock = {
        "epoch": epoch, "start": start, "end": end, "val_end": end + 1.0, "images": 800,
        "plan_s": 0.01, "checkpoint_s": 0.002, "first_step_end": T0 + 12.0,
        "peak_allocated_gib": 1.5 + epoch, "peak_reserved_gib": 3.0,
    }  # fmt: skip
    return f"medseg.training.loop: epoch clock {json.dumps(clock)}\n"


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """A finished run's folder: train 3 epochs (T0+10..T0+80), evaluate, params."""
    (tmp_path / "params.yaml").write_text(
        yaml.safe_dump({"train": {"epochs": 3, "patch_size": 128}})
    )
    (tmp_path / "times.tsv").write_text(
        f"smoke\t{T0}\t{T0 + 5}\t0\ntrain\t{T0 + 5}\t\t\ntrain\t{T0 + 5}\t{T0 + 85}\t0\n"
        f"evaluate\t{T0 + 85}\t{T0 + 95}\t0\n"
    )
    epochs = [(T0 + 10, T0 + 30), (T0 + 31, T0 + 51), (T0 + 52, T0 + 62)]
    (tmp_path / "train.log").write_text(
        "start-up noise\n" + "".join(_clock(e + 1, a, b) for e, (a, b) in enumerate(epochs))
    )
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "metrics.json").write_text('{"best_val_dice": 0.8123, "best_epoch": 3}')
    (tmp_path / "evaluate").mkdir()
    metrics = {"threshold": 0.5, "test": {"fov": {"dice": 0.8311, "auc_roc": 0.9822}}}
    (tmp_path / "evaluate" / "metrics.json").write_text(json.dumps(metrics))
    return tmp_path


def test_busy_share_counts_only_numeric_samples_inside_epochs_2_to_n(work: Path):
    samples = [
        (T0 + 20, "10, 100.5, 1000, 5"),  # epoch 1 (start-up, compile): left out
        (T0 + 35, "90, 500.0, 1980, 5"),
        (T0 + 40, "[N/A], [N/A], [N/A], [N/A]"),
        (T0 + 45, "100, [Not Supported], 1980, 5"),
        (T0 + 51.5, "0, 80.0, 345, 5"),  # validation between epochs: left out
        (T0 + 60, "80, 400.0, 1900, 5"),
        (T0 + 70, "0, 70.0, 345, 5"),  # after the last epoch: left out
    ]
    lines = [f"{_smi_stamp(t)}, {v}" for t, v in samples]
    (work / "smi.csv").write_text("\n".join(["Failed to query", *lines, "2026/12/0"]) + "\n")
    table = _table(work)
    assert table["GPU busy inside epochs 2..N (%)"] == "90.0"  # (90 + 100 + 80) / 3
    assert table["GPU power inside epochs 2..N (W)"] == "450"  # (500 + 400) / 2
    assert table["SM clock inside epochs 2..N (MHz)"] == "1953"
    assert table["GPU busy over the whole train stage (%)"] == "46.7"  # all 6 numeric ones
    assert table["images/s, median of epochs 2..N"] == "60.0"  # 800 / 20 and 800 / 10
    assert table["images/s end to end (all patches / train stage)"] == "30.0"  # 2400 / 80
    assert table["time to first step (s): start-up + compile"] == "7.0"
    assert table["epochs done / planned"] == "3 / 3"
    assert table["peak GPU memory allocated / reserved (GiB)"] == "4.50 / 3.00"
    assert table["train stage wall time"] == "80.0 s, ok"
    assert table["test F1 = Dice (FOV)"] == "0.8311" and table["test AUC (FOV)"] == "0.9822"
    assert table["best val Dice (epoch)"] == "0.8123 (3)"


def test_a_killed_train_stage_and_no_nvidia_smi_still_give_the_table(work: Path):
    (work / "times.tsv").write_text(
        f"smoke\t{T0}\t{T0 + 5}\t0\ntrain\t{T0 + 5}\t{T0 + 40}\t124\n"
        f"baseline-ram-w0\t{T0 + 41}\t\t\n"
    )
    (work / "train.log").write_text(_clock(1, T0 + 10, T0 + 30) + "half a li")
    (work / "baseline-ram-w0.log").write_text("")
    shutil.rmtree(work / "train")
    shutil.rmtree(work / "evaluate")
    table = _table(work)
    assert table["train stage wall time"] == "35.0 s, stopped by its time limit"
    assert table["epochs done / planned"] == "1 / 3"
    assert table["images/s, median of epochs 2..N"] == "40.0"  # epoch 1 alone
    assert table["GPU busy inside epochs 2..N (%)"] == "- (no nvidia-smi samples)"
    assert table["evaluate stage wall time"] == "not run"
    assert table["test F1 = Dice (FOV)"].startswith("- (KeyError")
    assert table["baseline ram-w0"] == "- (did not finish (the command was cut off))"


def test_nothing_ran_at_all(tmp_path: Path):
    table = _table(tmp_path)
    assert table["smoke run (1 short epoch, evaluate 2 images)"] == "not run"
    assert table["epochs done / planned"] == "0 / ?"


def _gpu_folder(tmp_path: Path) -> Path:
    """A .gpu folder as bench/gpu_prepare.sh leaves it (empty data), stamped for this tree."""
    gpu = tmp_path / "gpu"
    (gpu / "whl").mkdir(parents=True)
    (gpu / "processed").mkdir()
    with tarfile.open(gpu / "processed.tar.gz", "w:gz") as tar:
        tar.add(gpu / "processed", arcname="processed")
    shutil.rmtree(gpu / "processed")
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    (gpu / "params.yaml").write_text(yaml.safe_dump(params))
    subprocess.run(
        [sys.executable, str(STAMP), "write", "--gpu", str(gpu), "--root", str(REPO)],
        check=True, capture_output=True, timeout=60,
    )  # fmt: skip
    return gpu


def _gpu_sh(gpu: Path, *args: str) -> subprocess.CompletedProcess:
    env = {"PATH": "/usr/bin:/bin", "GPU_DIR": str(gpu), "PYTHON": sys.executable}
    return subprocess.run(
        ["bash", str(REPO / "bench" / "gpu.sh"), *args],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip


def test_gpu_sh_refuses_a_preprocess_override(tmp_path: Path):
    """The data were preprocessed where .gpu was built: such an override must not be ignored."""
    proc = _gpu_sh(_gpu_folder(tmp_path), "preprocess.contrast=clahe", "train.epochs=1")
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert "preprocess.contrast is fixed by the data in .gpu" in proc.stdout
    assert "bench/gpu_prepare.sh" in proc.stdout
    assert "| smoke run (1 short epoch, evaluate 2 images) | not run |" in proc.stdout  # a table
    assert proc.stdout.splitlines()[-1].startswith("gpu.sh: stopped (exit 2) before training")


def test_gpu_sh_refuses_a_stale_or_half_carried_folder_in_one_line(tmp_path: Path):
    gpu = _gpu_folder(tmp_path)
    stamp = json.loads((gpu / "stamp.json").read_text())
    (gpu / "stamp.json").write_text(json.dumps({**stamp, "source_sha256": "0" * 64}))
    proc = _gpu_sh(gpu)
    assert proc.returncode == 2 and proc.stdout == "", proc.stdout  # nothing ran
    assert (
        proc.stderr.count("\n") == 1 and "is stale: built from source 000000000000" in proc.stderr
    )
    assert "bash bench/gpu_prepare.sh" in proc.stderr

    (gpu / "stamp.json").write_text(json.dumps(stamp))
    data = (gpu / "processed.tar.gz").read_bytes()
    (gpu / "processed.tar.gz").write_bytes(data[: len(data) // 2])  # a carry cut short
    proc = _gpu_sh(gpu)
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"processed.tar.gz has {len(data) // 2} bytes, the stamp {len(data)}" in proc.stderr
    (gpu / "stamp.json").unlink()
    assert "stamp.json is missing; run bench/gpu_prepare.sh" in _gpu_sh(gpu).stderr


def test_the_source_hash_follows_the_code_not_the_caches(tmp_path: Path):
    root, gpu = tmp_path / "tree", tmp_path / "tree" / ".gpu"
    for rel in ("src/medseg/a.py", "stages/train.py", "bench/gpu.sh", "params.yaml"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(f"# {rel}\n")
    (root / "bench" / "other.py").write_text("# not the GPU run's\n")
    gpu.mkdir()
    (gpu / "params.yaml").write_text("train: {}\n")

    def stamp(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(STAMP), action, "--gpu", str(gpu), "--root", str(root)],
            capture_output=True, text=True, timeout=60,
        )  # fmt: skip

    assert stamp("write").returncode == 0
    (root / "src" / "medseg" / "__pycache__").mkdir()
    (root / "src" / "medseg" / "__pycache__" / "a.cpython-312.pyc").write_bytes(b"cache")
    (root / "bench" / "other.py").write_text("# changed, but not the GPU run's\n")
    assert stamp("check").returncode == 0
    (root / "stages" / "train.py").write_text("# changed\n")
    proc = stamp("check")
    assert proc.returncode == 2 and "is stale" in proc.stderr


def test_fit_caps_the_epochs_to_the_train_stage_time(tmp_path: Path):
    """By the smoke run's measures: 10 s an epoch, 4 s a validation, 20 s of start-up."""
    smoke = {"image_s": 0.01, "plan_s_per_image": 0.0, "val_s_per_case": 1.0,
             "run_val_cases": 4, "other_s": 20.0}  # fmt: skip
    (tmp_path / "smoke.json").write_text(json.dumps(smoke))
    params = tmp_path / "params.yaml"

    def fit(seconds: int, compile: bool = False) -> tuple[int, str]:
        train = {"patches_per_epoch": 1000, "epochs": 40, "val_every": 5, "compile": compile}
        params.write_text(yaml.safe_dump({"train": train}))
        proc = subprocess.run(
            [sys.executable, str(REPO / "bench" / "gpu_smoke.py"), "fit",
             str(tmp_path / "smoke.json"), str(params), str(seconds)],
            capture_output=True, text=True, timeout=60, check=True,
        )  # fmt: skip
        return yaml.safe_load(params.read_text())["train"]["epochs"], proc.stdout

    # 20 + 10 (margin) + 1.3 * (10 n + 4 ceil(n / 5)) <= 150: n = 8 (1.3 * 88), not 9 (1.3 * 98)
    epochs, said = fit(150)
    assert epochs == 8 and said.startswith("train.epochs 40 -> 8")
    assert fit(1000)[0] == 40
    epochs, said = fit(240, compile=True)  # 90 s kept for the compile the smoke run left out
    assert epochs == 8 and "90 s kept to compile" in said
