from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import DRIVE

from medseg.errors import MedsegError
from medseg.io.images import write_png
from medseg.io.layouts import find_cases


def _drive_tree(root: Path, train: list[str], test: list[str]) -> None:
    img = np.zeros((8, 8), np.uint8)
    for folder, nums, suffix in (("training", train, "training"), ("test", test, "test")):
        for sub in ("images", "1st_manual", "mask"):
            (root / folder / sub).mkdir(parents=True, exist_ok=True)
        for n in nums:
            write_png(root / folder / "images" / f"{n}_{suffix}.png", img)
            write_png(root / folder / "1st_manual" / f"{n}_manual1.png", img)
            write_png(root / folder / "mask" / f"{n}_{suffix}_mask.png", img)


def test_drive_pairs_by_number(tmp_path: Path):
    _drive_tree(tmp_path, ["21", "22"], ["01"])
    cases = find_cases(tmp_path, "drive")
    assert [(c.case_id, c.split) for c in cases] == [
        ("21_training", "train"), ("22_training", "train"), ("01_test", "test"),
    ]  # fmt: skip
    assert cases[0].mask.name == "21_manual1.png"
    assert cases[0].fov is not None and cases[0].fov.name == "21_training_mask.png"


def test_missing_mask_names_the_image(tmp_path: Path):
    _drive_tree(tmp_path, ["21"], ["01"])
    (tmp_path / "test" / "1st_manual" / "01_manual1.png").unlink()
    with pytest.raises(MedsegError, match=r"01_test.png: no vessel mask test/1st_manual/01_\*"):
        find_cases(tmp_path, "drive")


def test_missing_fov_is_allowed(tmp_path: Path):
    _drive_tree(tmp_path, ["21"], ["01"])
    (tmp_path / "training" / "mask" / "21_training_mask.png").unlink()
    assert find_cases(tmp_path, "drive")[0].fov is None


def test_bad_roots(tmp_path: Path):
    with pytest.raises(MedsegError, match=r"data\.root: .*absent is not a folder"):
        find_cases(tmp_path / "absent", "drive")
    with pytest.raises(MedsegError, match="not a DRIVE layout"):
        find_cases(tmp_path, "drive")
    (tmp_path / "training" / "images").mkdir(parents=True)
    with pytest.raises(MedsegError, match="no cases found"):
        find_cases(tmp_path, "drive")


@pytest.mark.skipif(not DRIVE.is_dir(), reason="the DRIVE data set is not in ../shared/datasets")
def test_real_drive_folder():
    cases = find_cases(DRIVE, "drive")
    assert sum(c.split == "train" for c in cases) == 20
    assert sum(c.split == "test" for c in cases) == 20
    assert all(c.fov is not None for c in cases)
    first = next(c for c in cases if c.case_id == "01_test")
    assert first.mask.name == "01_manual1.gif"
