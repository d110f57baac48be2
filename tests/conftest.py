"""Shared fixtures: tiny, fast params and the paths of the repository."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pydicom
import pytest
import yaml
from pydicom.data import get_testdata_file

# medseg is imported inside the helpers below: HF_HUB_OFFLINE must be set before
# segmentation_models_pytorch (huggingface_hub) is first imported
if TYPE_CHECKING:
    from medseg.io.shards import CaseStore
    from medseg.spec import ModelSpec

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download during tests

REPO = Path(__file__).resolve().parents[1]
DRIVE = REPO.parent / "shared" / "datasets" / "DRIVE"

# The real params.yaml, shrunk: tiny images, few cases, one short epoch.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "synthesize": {"n_train": 4, "n_test": 2, "height": 72, "width": 68},
    "train": {
        "decoder_channels": [32, 16, 16, 8, 8],
        "epochs": 1,
        "patches_per_epoch": 8,
        "batch_size": 4,
        "patch_size": 32,
        # the tests compare weights bit for bit across runs: the same threads whatever else
        # runs on the machine (`medseg.training.precision.cpu_threads`)
        "deterministic": True,
    },
    "evaluate": {"window": 64},
}


# The values the planned keys had before the plan chose them: the tests of anything but the plan
# pin them, so that their params load without a plans.json (`tiny_params`).
PINNED: dict[str, dict[str, Any]] = {
    "convert": {"fov_fallback": "threshold"},
    "preprocess": {"channel": "green", "contrast": "none", "max_side": None},
    "train": {"foreground_fraction": 0.5, "loss": "bce_dice", "postprocess": []},
    "evaluate": {"threshold": 0.5, "tta": False},
}


def tiny_params(auto: bool = False, **changes: dict[str, Any]) -> dict[str, Any]:
    """The repository's params.yaml with `PINNED` (unless ``auto``: the plan chooses what
    `TINY_OVERRIDES` leaves ``auto``), `TINY_OVERRIDES` and then ``changes`` applied."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for overrides in ({} if auto else PINNED, TINY_OVERRIDES, changes):
        for section, values in overrides.items():
            params[section].update(copy.deepcopy(values))
    return params


def write_grey_dicom16(path: Path, image: np.ndarray, **fields: Any) -> None:
    """Save a (H, W) uint16 image as an unsigned 16-bit grey DICOM with no window, built on
    pydicom's real MR_small.dcm; ``fields`` set further attributes (e.g. PatientName)."""
    ds = pydicom.dcmread(get_testdata_file("MR_small.dcm"))
    del ds.WindowCenter, ds.WindowWidth
    ds.Rows, ds.Columns = image.shape
    ds.PixelRepresentation, ds.BitsStored, ds.HighBit = 0, 16, 15
    ds.PixelData = image.astype(np.uint16).tobytes()
    for keyword, value in fields.items():
        setattr(ds, keyword, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path)


def make_store(
    folder: Path,
    images: list[np.ndarray] | np.ndarray,
    masks: list[np.ndarray] | np.ndarray,
    fovs: list[np.ndarray] | np.ndarray | None = None,
    split: str = "train",
    n_labels: int = 2,
    ram: bool = False,
    masks2: list[np.ndarray | None] | None = None,
    ids: list[str] | None = None,
) -> CaseStore:
    """A case store of the given cases, written as the preprocess stage writes one.

    Args:
        images: per case (C, h, w) float32; masks: (h, w) labels; fovs: (h, w), default all;
        masks2: per case a second observer's (h, w) labels or None; ids: default ``case<i>``.
    """
    from medseg.io.shards import CaseStore, ShardWriter
    from medseg.preprocess.dataset import case_arrays

    folder.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(folder, split)
    for i, (image, mask) in enumerate(zip(images, masks, strict=True)):
        fov = np.ones(mask.shape, bool) if fovs is None else np.asarray(fovs[i]) > 0
        h, w = mask.shape
        meta = {"height": h, "width": w, "full_height": h, "full_width": w}
        arrays = case_arrays(image, mask, fov, n_labels)
        if masks2 is not None and masks2[i] is not None:
            arrays["mask2"] = np.asarray(masks2[i], np.uint8)
        writer.add(ids[i] if ids else f"case{i}", arrays, **meta)
    writer.close()
    return CaseStore.open(folder, split, ram=ram)


def make_bundle(
    folder: Path,
    spec: ModelSpec,
    channel: str = "green",
    names: list[str] | None = None,
    seed: int = 0,
    threshold: float | None = None,
    postprocess: dict[int, list[dict[str, object]]] | None = None,
) -> Path:
    """A model bundle with random weights, as the train stage writes one (``threshold``,
    ``postprocess``: the validation threshold and post-processing kept in the weights'
    metadata); returns ``folder``."""
    import torch

    from medseg.config.sections import PreprocessConfig
    from medseg.inference.bundle import save_bundle
    from medseg.model import build_model
    from medseg.names import CLASSES
    from medseg.preprocess.processed import RECORD, save_record

    torch.manual_seed(seed)
    state = build_model(spec).state_dict()
    records = folder.parent / f".{folder.name}-records"
    records.mkdir(parents=True, exist_ok=True)
    save_record(PreprocessConfig(channel=channel, val_fraction=0.2, seed=0), records / RECORD)
    if names is not None:
        (records / CLASSES).write_text(json.dumps({"names": names}))
    folder.mkdir(parents=True, exist_ok=True)
    save_bundle(folder, state, state, spec, records, threshold, postprocess)
    return folder


def write_params(path: Path, params: dict[str, Any]) -> Path:
    """Write a params dict as YAML to ``path``; return ``path``."""
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A tiny params.yaml in a temporary folder."""
    return write_params(tmp_path / "params.yaml", tiny_params())


# --- Temporary git + DVC copies of the pipeline, shared by the end-to-end tests ---------------

STAGES = ("synthesize", "convert", "plan", "preprocess", "train", "evaluate")
FIRST_REPRO = "first_repro.stdout"  # beside the session's reproduced project: its first output


def dvc_env(**extra: str) -> dict[str, str]:
    """The environment for `git`/`dvc` subprocesses: this interpreter first, a fixed author."""
    env = dict(os.environ)
    # dvc.yaml says `python`: make it this interpreter, with medseg installed
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["HF_HUB_OFFLINE"] = "1"
    env.update(
        GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
        GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
    )  # fmt: skip
    env.update(extra)
    return env


def run(
    cwd: Path, *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run ``git ...``, ``dvc ...`` (this interpreter's DVC) or any command in ``cwd``."""
    cmd = [sys.executable, "-m", "dvc", *args[1:]] if args[0] == "dvc" else list(args)
    proc = subprocess.run(
        cmd, cwd=cwd, env=env or dvc_env(), capture_output=True, text=True, timeout=900
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


def ran(proc: subprocess.CompletedProcess[str]) -> list[str]:
    """The stages a `dvc repro` or `dvc exp run` ran, in order."""
    return [s for s in STAGES if f"Running stage '{s}'" in proc.stdout]


def _other_dvc_files() -> list[str]:
    """Every other file of the repository that DVC collects (a ``dvc.yaml`` or ``.dvc`` file
    below the root), so that a project is what DVC sees in a fresh clone."""
    listed = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split()  # fmt: skip
    return [
        name for name in listed
        if "/" in name and (name.endswith("/dvc.yaml") or name.endswith(".dvc"))
        and (REPO / name).is_file()
    ]  # fmt: skip


def make_project(dest: Path, params: dict[str, Any] | None = None) -> Path:
    """Copy the repository's pipeline into ``dest`` as its own git + DVC repository, committed.

    It gets every file DVC collects in a clone of the repository, the repository's own
    ``.dvc/config`` (so its default remote, a folder next to the
    project, is the one users get), ``.dvc/.gitignore`` (which keeps ``config.local`` with its
    credentials out of git), the custom plot templates in ``.dvc/plots``
    and ``params`` (default: `tiny_params`, what it leaves ``auto`` chosen by the plan stage).
    """
    dest.mkdir(parents=True)
    for name in ("dvc.yaml", ".dvcignore", ".gitignore", *_other_dvc_files()):
        (dest / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / name, dest / name)
    for name in ("stages", "src"):
        shutil.copytree(REPO / name, dest / name, ignore=shutil.ignore_patterns("__pycache__"))
    write_params(dest / "params.yaml", params or tiny_params(auto=True))
    run(dest, "git", "init", "-q", "-b", "main")
    run(dest, "dvc", "init", "-q")
    for name in ("config", ".gitignore"):  # the committed ones, not `dvc init`'s
        shutil.copy(REPO / ".dvc" / name, dest / ".dvc" / name)
    shutil.copytree(REPO / ".dvc" / "plots", dest / ".dvc" / "plots")  # custom plot templates
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "tiny pipeline")
    return dest


@pytest.fixture
def project(tmp_path: Path) -> Path:
    """A copy of the repository's pipeline, as its own git + DVC repository, with tiny params."""
    return make_project(tmp_path / "project")


@pytest.fixture(scope="session")
def _reproduced(tmp_path_factory: pytest.TempPathFactory) -> Path:
    dest = make_project(tmp_path_factory.mktemp("reproduced") / "project")
    first = run(dest, "dvc", "repro")
    (dest.parent / FIRST_REPRO).write_text(first.stdout)  # what the first run ran
    run(dest, "git", "add", "-A")
    run(dest, "git", "commit", "-qm", "tiny run")
    return dest


@pytest.fixture
def reproduced(_reproduced: Path, tmp_path: Path) -> Path:
    """`project` after one committed `dvc repro`: every output in the workspace and its cache.

    The pipeline runs once per session; each test gets its own copy, at ``tmp_path/project``.
    """

    def skip_dvc_tmp(folder: str, names: list[str]) -> list[str]:
        return ["tmp"] if Path(folder).name == ".dvc" else []

    return Path(shutil.copytree(_reproduced, tmp_path / "project", ignore=skip_dvc_tmp))


@pytest.fixture(scope="session")
def processed(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny synthetic data set through synthesize, convert and preprocess: a case store."""
    from medseg.config import load_params
    from medseg.config.sections import ConvertConfig, DataConfig, PreprocessConfig, SynthesizeConfig
    from medseg.convert.dataset import convert_dataset
    from medseg.preprocess.dataset import preprocess_dataset
    from medseg.synthetic import write_dataset

    tmp = tmp_path_factory.mktemp("processed")
    params = write_params(tmp / "params.yaml", tiny_params())
    write_dataset(load_params(params, SynthesizeConfig), tmp / "raw")
    convert_dataset(DataConfig(str(tmp / "raw"), "drive"), ConvertConfig(None, None), tmp / "conv")
    preprocess_dataset(load_params(params, PreprocessConfig), tmp / "conv", tmp / "proc")
    return tmp / "proc"
