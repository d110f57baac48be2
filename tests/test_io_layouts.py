from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from conftest import DRIVE

from medseg.errors import MedsegError
from medseg.io.case_files import CaseFiles
from medseg.io.images import write_png
from medseg.io.layouts import scan_cases


def find_cases(
    root: Path, layout: str, test_fraction: float = 0.2, seed: int = 0
) -> list[CaseFiles]:
    """The cases `scan_cases` finds, raising its first problem (as convert does under
    ``on_error: fail``)."""
    scan = scan_cases(root, layout, test_fraction=test_fraction, seed=seed)
    if scan.problems:
        raise MedsegError(scan.problems[0].reason)
    return scan.cases


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


def test_drive_second_observer_is_picked_up(tmp_path: Path):
    _drive_tree(tmp_path, ["21"], ["01", "02"])
    (tmp_path / "test" / "2nd_manual").mkdir()
    write_png(tmp_path / "test" / "2nd_manual" / "01_manual2.png", np.zeros((8, 8), np.uint8))
    cases = {c.case_id: c for c in find_cases(tmp_path, "drive")}
    assert cases["01_test"].mask2 is not None and cases["01_test"].mask2.name == "01_manual2.png"
    assert cases["02_test"].mask2 is None and cases["21_training"].mask2 is None


def _folders_tree(base: Path, stems: list[str], fov: bool = False) -> None:
    img = np.zeros((8, 8), np.uint8)
    for sub in ("images", "masks") + (("fov",) if fov else ()):
        (base / sub).mkdir(parents=True, exist_ok=True)
        for stem in stems:
            write_png(base / sub / f"{stem}.png", img)


def test_folders_flat_gets_a_seeded_split(tmp_path: Path):
    stems = [f"case{i:02d}" for i in range(10)]
    _folders_tree(tmp_path, stems)
    cases = find_cases(tmp_path, "folders", test_fraction=0.3, seed=1)
    assert sorted(c.case_id for c in cases) == stems
    test = [c.case_id for c in cases if c.split == "test"]
    assert len(test) == 3
    assert [c.case_id for c in cases if c.split == "test"] == [
        c.case_id for c in find_cases(tmp_path, "folders", test_fraction=0.3, seed=1)
        if c.split == "test"
    ]  # fmt: skip
    other = find_cases(tmp_path, "folders", test_fraction=0.3, seed=2)
    assert {c.case_id for c in other if c.split == "test"} != set(test)
    assert all(c.fov is None for c in cases)


def test_folders_split_from_subfolders_and_fov(tmp_path: Path):
    _folders_tree(tmp_path / "training", ["a", "b"], fov=True)
    _folders_tree(tmp_path / "test", ["c"])
    cases = find_cases(tmp_path, "folders")
    assert [(c.case_id, c.split) for c in cases] == [("a", "train"), ("b", "train"), ("c", "test")]
    assert cases[0].fov is not None and cases[2].fov is None


def test_folders_problems(tmp_path: Path):
    _folders_tree(tmp_path, ["a", "b"])
    (tmp_path / "masks" / "b.png").unlink()
    scan = scan_cases(tmp_path, "folders")
    assert [c.case_id for c in scan.cases] == ["a"]
    assert scan.problems[0].reason.endswith(
        "b.png: no mask " + tmp_path.name + "/masks/b.* for this image"
    )
    write_png(tmp_path / "masks" / "a.gif", np.zeros((8, 8), np.uint8))
    with pytest.raises(MedsegError, match=r"holds two files for the key a \(a\.gif and a\.png\)"):
        scan_cases(tmp_path, "folders")
    with pytest.raises(MedsegError, match="not a folders layout"):
        find_cases(tmp_path / "masks", "folders")


def _manifest(root: Path, text: str) -> None:
    (root / "manifest.csv").write_text(text)


def test_manifest_layout(tmp_path: Path):
    _folders_tree(tmp_path / "data", ["x", "y", "z"])
    _manifest(
        tmp_path,
        "image,mask,split,case_id\n"
        "data/images/x.png,data/masks/x.png,train,first\n"
        "data/images/y.png, data/masks/y.png ,Training,\n"
        "./data/images/z.png,data/masks/../masks/z.png,test,third\n",
    )
    cases = find_cases(tmp_path, "manifest")
    assert [(c.case_id, c.split, c.mask.name) for c in cases] == [
        ("first", "train", "x.png"), ("y", "train", "y.png"), ("third", "test", "z.png"),
    ]  # fmt: skip


def test_manifest_without_split_is_split_by_seed(tmp_path: Path):
    _folders_tree(tmp_path, ["a", "b", "c", "d", "e"])
    rows = "".join(f"images/{s}.png,masks/{s}.png\n" for s in "abcde")
    _manifest(tmp_path, "image,mask\n" + rows)
    cases = find_cases(tmp_path, "manifest", test_fraction=0.4, seed=0)
    assert sum(c.split == "test" for c in cases) == 2 and len(cases) == 5


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,mask\nimages/a.png,masks/no.png\n", r"line 2, column mask: masks/no\.png does not"),
        ("image,mask\n../outside.png,masks/a.png\n", r"column image: \.\./outside\.png is outside"),
        ("image,mask\n/etc/hostname,masks/a.png\n", r"/etc/hostname is outside data\.root"),
        ("image,mask,split\nimages/a.png,masks/a.png,val\n", "split 'val' is not one of train"),
        ("image,mask,case_id\nimages/a.png,masks/a.png,a/b\n", "case_id 'a/b' may only hold"),
        ("image,mask\nimages/a.png,\n", "the mask column is empty"),
    ],
)  # fmt: skip
def test_manifest_row_problems_name_the_line(tmp_path: Path, text: str, message: str):
    _folders_tree(tmp_path, ["a"])
    (tmp_path / "outside.png").touch()
    _manifest(tmp_path, text)
    scan = scan_cases(tmp_path, "manifest")
    assert scan.cases == [] and len(scan.problems) == 1
    assert re.search(message, scan.problems[0].reason), scan.problems[0].reason
    assert scan.problems[0].reason.startswith(str(tmp_path / "manifest.csv"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("image,maks\na,b\n", "missing column 'mask'"),
        ("image,mask,weight\na,b,1\n", "unknown column 'weight'"),
        ("", "not a readable CSV"),
        ("image,mask\n", "no cases found in the manifest layout"),
    ],
)
def test_manifest_file_problems(tmp_path: Path, text: str, message: str):
    _manifest(tmp_path, text)
    with pytest.raises(MedsegError, match=message):
        scan_cases(tmp_path, "manifest")
    with pytest.raises(MedsegError, match=r"nothing\.csv: manifest not found"):
        scan_cases(tmp_path, "manifest", manifest="nothing.csv")


@pytest.mark.skipif(not DRIVE.is_dir(), reason="the DRIVE data set is not in ../shared/datasets")
def test_real_drive_second_observer():
    cases = find_cases(DRIVE, "drive")
    assert sum(c.mask2 is not None for c in cases) == 20
    assert all(c.mask2 is not None for c in cases if c.split == "test")


# --- nnunet ---------------------------------------------------------------------------------

HIPPO = Path(__file__).resolve().parents[1].parent / "shared" / "datasets" / "HIPPO_MSD"


def _nnunet_tree(root: Path, ending: str = ".png", channels: int = 1, test_labels: bool = True):
    """A small nnU-Net raw data set: dataset.json, imagesTr (+ channel suffixes), labelsTr,
    imagesTs and (optionally) labelsTs."""
    import json

    names = {str(c): f"ch{c}" for c in range(channels)}
    desc = {"channel_names": names, "labels": {"background": 0, "left atrium": 1, "scar": 2},
            "file_ending": ending, "numTraining": 3}  # fmt: skip
    (root).mkdir(parents=True, exist_ok=True)
    (root / "dataset.json").write_text(json.dumps(desc))
    img = np.zeros((8, 8), np.uint8)
    for images, labels, ids in (("imagesTr", "labelsTr", "abc"), ("imagesTs", "labelsTs", "xy")):
        (root / images).mkdir()
        if labels == "labelsTr" or test_labels:
            (root / labels).mkdir()
        for case in ids:
            for c in range(channels):
                write_png(root / images / f"case{case}_{c:04d}{ending}", img)
            if labels == "labelsTr" or test_labels:
                write_png(root / labels / f"case{case}{ending}", img)


def test_nnunet_pairs_channels_and_labels_and_names_classes(tmp_path: Path):
    from medseg.io.nnunet import nnunet_dataset

    _nnunet_tree(tmp_path, channels=2)
    cases = find_cases(tmp_path, "nnunet")
    assert [(c.case_id, c.split) for c in cases] == [
        ("casea", "train"), ("caseb", "train"), ("casec", "train"),
        ("casex", "test"), ("casey", "test"),
    ]  # fmt: skip
    assert cases[0].image.name == "casea_0000.png" and cases[0].mask.name == "casea.png"
    assert [p.name for p in cases[0].channels] == ["casea_0001.png"]
    desc = nnunet_dataset(tmp_path)
    assert desc.classes == {"left_atrium": 1, "scar": 2}  # as data.classes takes names
    assert desc.channels == ["ch0", "ch1"] and desc.file_ending == ".png"


def test_nnunet_without_test_labels_splits_the_training_cases(tmp_path: Path):
    _nnunet_tree(tmp_path, test_labels=False)
    cases = find_cases(tmp_path, "nnunet", test_fraction=0.34)
    assert sorted(c.case_id for c in cases) == ["casea", "caseb", "casec"]
    assert sum(c.split == "test" for c in cases) == 1


def test_nnunet_missing_channel_and_label_are_problems_naming_the_case(tmp_path: Path):
    _nnunet_tree(tmp_path, channels=2)
    (tmp_path / "imagesTr" / "caseb_0001.png").unlink()
    (tmp_path / "labelsTr" / "casec.png").unlink()
    scan = scan_cases(tmp_path, "nnunet")
    reasons = [p.reason for p in scan.problems]
    assert any(re.search(r"imagesTr/caseb: missing caseb_0001.png; dataset.json names 2", r)
               for r in reasons)  # fmt: skip
    assert any(r.endswith("casec_0000.png: no label labelsTr/casec.png for this image")
               for r in reasons)  # fmt: skip
    assert [c.case_id for c in scan.cases] == ["casea", "casex", "casey"]


def test_nnunet_dataset_json_naming_missing_files_is_one_error(tmp_path: Path):
    import json

    _nnunet_tree(tmp_path)
    desc = json.loads((tmp_path / "dataset.json").read_text())
    desc["training"] = [
        {"image": "./imagesTr/casea.png", "label": "./labelsTr/casea.png"},
        {"image": "./imagesTr/gone.png", "label": "./labelsTr/gone.png"},
    ]
    (tmp_path / "dataset.json").write_text(json.dumps(desc))
    with pytest.raises(MedsegError, match=r"dataset.json: names 2 file\(s\) that are missing, "
                       r"the first ./imagesTr/gone.png"):  # fmt: skip
        scan_cases(tmp_path, "nnunet")
    (tmp_path / "dataset.json").unlink()
    with pytest.raises(MedsegError, match=r"dataset.json: not found; the nnunet layout needs"):
        scan_cases(tmp_path, "nnunet")


@pytest.mark.skipif(not HIPPO.is_dir(), reason="../shared/datasets/HIPPO_MSD is not here")
def test_nnunet_reads_the_decathlon_hippocampus():
    from medseg.io.nnunet import nnunet_dataset

    cases = find_cases(HIPPO, "nnunet")
    assert len(cases) == 260 and sum(c.split == "test" for c in cases) == 78
    assert all(c.image.name.endswith(".nii.gz") and not c.channels for c in cases)
    assert {c.modality for c in cases} == {"MR"}
    assert nnunet_dataset(HIPPO).classes == {"Anterior": 1, "Posterior": 2}
