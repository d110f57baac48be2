"""Groups (patients): decided from DICOM headers, a manifest column or a rule, written as keyed
hashes, and kept on one side of every split (test, validation, crossval folds)."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tifffile
from conftest import write_grey_dicom16
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from medseg.config.sections import ConvertConfig, DataConfig
from medseg.convert.dataset import convert_dataset
from medseg.convert.groups import GroupFacts, decide_group, token
from medseg.errors import MedsegError
from medseg.evaluation.crossval import split_folds
from medseg.io.case_files import CaseFiles
from medseg.io.layouts import _seeded_split, scan_cases
from medseg.planning.fingerprint import fingerprint
from medseg.preprocess.dataset import manifest_groups, split_cases

KEY = bytes.fromhex("0f" * 32)
CFG = ConvertConfig(None, None, workers=1, fov_fallback="whole_image")
# patient ids that must never reach an output: long enough not to occur by chance
PATIENTS = ["MRN-7305-ALPHA", "MRN-1142-BRAVO", "MRN-9917-CHARLIE", "MRN-5521-DELTA"]


@pytest.fixture(autouse=True)
def _key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MEDSEG_ID_KEY", KEY.hex())


def _image(seed: int, size: tuple[int, int] = (24, 20)) -> tuple[np.ndarray, np.ndarray]:
    """A 16-bit grey image and a 0/255 mask with a square in it."""
    rng = np.random.default_rng(seed)
    image = rng.integers(1000, 60000, size, dtype=np.uint16)
    mask = np.zeros(size, np.uint8)
    mask[4:12, 5:13] = 255
    return image, mask


def _dicom_set(root: Path, per_patient: int = 3, study_only: int = 2) -> dict[str, str]:
    """DICOM slices of four patients (``PATIENTS``) and ``study_only`` files with no PatientID
    (one study each) in a ``folders`` layout; file -> patient id (or study uid)."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    who: dict[str, str] = {}
    n = 0
    for patient in PATIENTS:
        study = f"1.2.826.0.1.3680043.8.498.{100 + n}"
        for _ in range(per_patient):
            image, mask = _image(n)
            write_grey_dicom16(
                root / "images" / f"s{n:02d}.dcm", image, PatientID=patient,
                StudyInstanceUID=study, PatientName="Doe^Jane",
            )  # fmt: skip
            Image.fromarray(mask).save(root / "masks" / f"s{n:02d}.png")
            who[f"s{n:02d}"] = patient
            n += 1
    for k in range(study_only):
        image, mask = _image(n)
        study = f"1.2.826.0.1.3680043.8.498.{900 + k}"
        write_grey_dicom16(
            root / "images" / f"s{n:02d}.dcm", image, PatientID="", StudyInstanceUID=study
        )
        Image.fromarray(mask).save(root / "masks" / f"s{n:02d}.png")
        who[f"s{n:02d}"] = study
        n += 1
    return who


def _slice_set(root: Path, patients: int, slices: int, suffix: str = ".png") -> None:
    """``<patient>_<slice>`` PNG (or TIFF) images and masks in a ``folders`` layout."""
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for p in range(patients):
        for s in range(slices):
            image, mask = _image(p * 100 + s)
            name = f"pat{p:02d}_{s:03d}"
            if suffix == ".tif":
                tifffile.imwrite(root / "images" / f"{name}.tif", image)
            else:
                Image.fromarray(image).save(root / "images" / f"{name}.png")
            Image.fromarray(mask).save(root / "masks" / f"{name}.png")


def _sides(manifest: pd.DataFrame) -> dict[str, set[str]]:
    sides: dict[str, set[str]] = {}
    for group, split in zip(manifest["group"], manifest["split"], strict=True):
        sides.setdefault(group, set()).add(split)
    return sides


# -- deciding a group ---------------------------------------------------------------------------


def test_the_order_column_rule_patient_study_file(tmp_path: Path):
    image = tmp_path / "scans" / "p7_012.png"
    key = lambda: KEY  # noqa: E731
    full = GroupFacts(image, "scans/p7_012.png", "P7", "MRN-1", "1.2.3.4")
    assert decide_group(full, "auto", tmp_path, key) == token("group", "column:P7", KEY)
    no_column = GroupFacts(image, "scans/p7_012.png", "", "MRN-1", "1.2.3.4")
    assert decide_group(no_column, "auto", tmp_path, key) == token("patient", "MRN-1", KEY)
    assert decide_group(no_column, "file", tmp_path, key) == "scans/p7_012.png"
    assert decide_group(no_column, "folder", tmp_path, key) == token("group", "folder:scans", KEY)
    assert decide_group(no_column, r"^(p\d+)_", tmp_path, key) == token("group", "name:p7", KEY)
    study = GroupFacts(image, "scans/p7_012.png", "", " ", "1.2.3.4")
    assert decide_group(study, "auto", tmp_path, key) == token("study", "1.2.3.4", KEY)
    nothing = GroupFacts(image, "scans/p7_012.png")
    assert decide_group(nothing, "auto", tmp_path, key) == "scans/p7_012.png"


def test_a_file_group_never_asks_for_the_key(tmp_path: Path):
    def no_key() -> bytes:
        raise AssertionError("the key was asked for")

    facts = GroupFacts(tmp_path / "a.png", "a.png")
    assert decide_group(facts, "auto", tmp_path, no_key) == "a.png"
    assert decide_group(facts, "file", tmp_path, no_key) == "a.png"


def test_hashes_depend_on_the_key_and_name_their_kind():
    a, b = token("patient", "MRN-1", KEY), token("patient", "MRN-1", bytes(32))
    assert a != b and a.startswith("patient:") and len(a) == len("patient:") + 16
    assert token("patient", "MRN-1", KEY) != token("study", "MRN-1", KEY)


# -- DICOM patients through convert -------------------------------------------------------------


def test_dicom_patients_stay_on_one_side_and_never_appear_in_clear(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    who = _dicom_set(tmp_path / "raw")
    caplog.set_level(logging.DEBUG)
    out = tmp_path / "out"
    data = DataConfig(str(tmp_path / "raw"), "folders", test_fraction=0.3)
    manifest = convert_dataset(data, CFG, out)
    assert manifest["group"].notna().all() and (manifest["group"] != "").all()
    by_case = dict(zip(manifest["case_id"], manifest["group"], strict=True))
    named = {}
    for patient in PATIENTS:  # one group per patient, numbered (the keyed hash decided it)
        cases = [c for c, p in who.items() if p == patient]
        assert len({by_case[c] for c in cases}) == 1
        named[patient] = by_case[cases[0]]
    assert sorted(named.values()) == [f"patient:{n}" for n in range(1, len(PATIENTS) + 1)]
    studies = [c for c, p in who.items() if p not in PATIENTS]
    assert sorted(by_case[c] for c in studies) == ["study:1", "study:2"]
    assert all(len(sides) == 1 for sides in _sides(manifest).values())
    assert set(manifest["split"]) == {"train", "test"}
    report = pd.read_json(out / "report.json", typ="series")
    assert report["groups"]["from"] == {"patient": 4, "study": 2}
    assert report["groups"]["train"] + report["groups"]["test"] == 6
    # no patient id, name or study UID in any output file's name or bytes, nor in the log
    secrets = [*PATIENTS, "Doe^Jane", *[who[c] for c in studies]]
    for path in out.rglob("*"):
        assert not any(s in str(path) for s in secrets)
        if path.is_file():
            data_bytes = path.read_bytes()
            assert not any(s.encode() in data_bytes for s in secrets), path
    assert not any(s in caplog.text for s in secrets)


def test_the_file_rule_splits_dicom_slices_of_one_patient(tmp_path: Path):
    _dicom_set(tmp_path / "raw", per_patient=6, study_only=0)
    data = DataConfig(str(tmp_path / "raw"), "folders", test_fraction=0.3, group="file")
    manifest = convert_dataset(data, CFG, tmp_path / "out")
    assert (manifest["group"] == manifest["source"]).all()
    assert manifest["group"].nunique() == len(manifest) == 24


def test_every_dicom_of_one_patient_refuses_a_drawn_split(tmp_path: Path):
    root = tmp_path / "raw"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for n in range(4):
        image, mask = _image(n)
        write_grey_dicom16(root / "images" / f"s{n}.dcm", image, PatientID="MRN-7305-ALPHA")
        Image.fromarray(mask).save(root / "masks" / f"s{n}.png")
    data = DataConfig(str(root), "folders", test_fraction=0.3)
    with pytest.raises(MedsegError, match=r"all 4 cases belong to one group .* set data\.group"):
        convert_dataset(data, CFG, tmp_path / "out")
    assert not (tmp_path / "out").exists()


# -- rules for 2D files -------------------------------------------------------------------------


@pytest.mark.parametrize("suffix", [".png", ".tif"])
def test_a_file_name_pattern_groups_slices_by_patient(tmp_path: Path, suffix: str):
    _slice_set(tmp_path / "raw", patients=5, slices=4, suffix=suffix)
    data = DataConfig(str(tmp_path / "raw"), "folders", test_fraction=0.2, group=r"^(.+)_\d+")
    manifest = convert_dataset(data, CFG, tmp_path / "out")
    assert manifest["group"].nunique() == 5
    for p in range(5):
        rows = manifest[manifest["case_id"].str.startswith(f"pat{p:02d}_")]
        assert set(rows["group"]) == {f"group:{p + 1}"}  # numbered by first case id
        assert rows["split"].nunique() == 1
    assert (manifest["split"] == "test").sum() == 4  # one patient: 20% of 20 slices
    assert not manifest["group"].str.contains("pat").any()


def test_a_pattern_that_misses_a_file_stops_convert_naming_it(tmp_path: Path):
    _slice_set(tmp_path / "raw", patients=2, slices=2)
    image, mask = _image(7)
    Image.fromarray(image).save(tmp_path / "raw" / "images" / "scout.png")
    Image.fromarray(mask).save(tmp_path / "raw" / "masks" / "scout.png")
    data = DataConfig(str(tmp_path / "raw"), "folders", group=r"^(.+)_\d+")
    with pytest.raises(MedsegError, match=r"scout\.png: data\.group .* does not find a patient"):
        convert_dataset(data, CFG, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_the_folder_rule_and_a_manifest_patient_column(tmp_path: Path):
    root = tmp_path / "raw"
    lines = ["image,mask,patient"]
    for p in range(4):
        for s in range(3):
            folder = root / f"patient{p}"
            folder.mkdir(parents=True, exist_ok=True)
            image, mask = _image(p * 10 + s)
            Image.fromarray(image).save(folder / f"img{p}{s}.png")
            Image.fromarray(mask).save(folder / f"img{p}{s}_mask.png")
            lines.append(f"patient{p}/img{p}{s}.png,patient{p}/img{p}{s}_mask.png,{'AB'[p % 2]}")
    (root / "list.csv").write_text("\n".join([line.rsplit(",", 1)[0] for line in lines]) + "\n")
    by_folder = convert_dataset(
        DataConfig(str(root), "manifest", "list.csv", 0.25, group="folder"), CFG, tmp_path / "a"
    )
    assert by_folder["group"].nunique() == 4
    assert all(len(sides) == 1 for sides in _sides(by_folder).values())
    # the column wins over the rule: two patients, A and B, one in test
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    by_column = convert_dataset(
        DataConfig(str(root), "manifest", "list.csv", 0.25, group="folder"), CFG, tmp_path / "b"
    )
    assert set(by_column["group"]) == {"group:1", "group:2"}
    assert sorted(by_column.groupby("group")["split"].agg(set).map(tuple)) == [
        ("test",),
        ("train",),
    ]


def test_a_given_split_that_shares_a_patient_is_kept_and_said(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
):
    root = tmp_path / "raw"
    for split in ("train", "test"):
        (root / split / "images").mkdir(parents=True)
        (root / split / "masks").mkdir()
        for s in range(2):
            image, mask = _image(s)
            name = f"pat01_{split}{s}.png"
            Image.fromarray(image).save(root / split / "images" / name)
            Image.fromarray(mask).save(root / split / "masks" / name)
    caplog.set_level(logging.WARNING)
    data = DataConfig(str(root), "folders", group=r"^([a-z]+\d+)_")
    manifest = convert_dataset(data, CFG, tmp_path / "out")
    assert (manifest["split"] == "test").sum() == 2
    assert "1 of 1 groups (patients) have cases in both the train and test split" in caplog.text


@pytest.mark.parametrize(
    ("value", "message"),
    [("(a)(b)", "has 2 capture groups"), ("^\\d+", "has 0 capture groups"), ("(a", "is not one")],
)
def test_a_bad_group_param_names_the_key(value: str, message: str):
    with pytest.raises(MedsegError, match=rf"params: data\.group must be .* {message}"):
        DataConfig("x", "folders", group=value)


# -- the validation split, the folds, the fingerprint -------------------------------------------


def test_validation_refuses_a_single_patient_and_names_the_param():
    with pytest.raises(MedsegError, match=r"m\.csv: all 3 training cases belong to one group"):
        split_cases(["a", "b", "c"], 0.2, 0, dict.fromkeys("abc", "patient:1"), "m.csv")
    assert split_cases(["a", "b", "c"], 0.0, 0, dict.fromkeys("abc", "patient:1")) == set()


def test_the_fingerprint_counts_patients(tmp_path: Path):
    _slice_set(tmp_path / "raw", patients=5, slices=3)
    data = DataConfig(str(tmp_path / "raw"), "folders", test_fraction=0.2, group=r"^(.+)_\d+")
    manifest = convert_dataset(data, CFG, tmp_path / "out")
    fp = fingerprint(tmp_path / "out")
    assert fp["cases"] == (manifest["split"] == "train").sum() == 12
    assert fp["groups"] == 4
    assert manifest_groups(manifest) == dict(
        zip(manifest["case_id"], manifest["group"], strict=True)
    )


# -- no split ever puts a group on two sides (property) -----------------------------------------


@pytest.fixture(scope="module")
def twelve(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("twelve")
    for sub in ("images", "masks"):
        (root / sub).mkdir()
    for n in range(12):
        Image.fromarray(np.full((4, 4), n, np.uint8)).save(root / "images" / f"c{n:02d}.png")
        Image.fromarray(np.full((4, 4), 255, np.uint8)).save(root / "masks" / f"c{n:02d}.png")
    return root


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    assignment=st.lists(st.integers(0, 5), min_size=12, max_size=12),
    test_fraction=st.floats(0.05, 0.95),
    val_fraction=st.floats(0.0, 0.9),
    seed=st.integers(0, 2**16),
    folds=st.integers(2, 4),
)
def test_no_split_puts_a_group_on_two_sides(
    twelve: Path, assignment: list[int], test_fraction: float, val_fraction: float, seed: int,
    folds: int,
):  # fmt: skip
    group_of = {f"c{n:02d}": f"g{g}" for n, g in enumerate(assignment)}
    n_groups = len(set(assignment))
    try:
        scan = scan_cases(
            twelve, "folders", test_fraction=test_fraction, seed=seed,
            group_of=lambda case: group_of[case.case_id],
        )  # fmt: skip
    except MedsegError as err:
        assert n_groups == 1 and "one group" in str(err)
        return
    split = {c.case_id: c.split for c in scan.cases}
    assert {c.case_id: c.group for c in scan.cases} == group_of
    assert _one_side(group_of, split)
    train = [cid for cid, s in split.items() if s == "train"]
    assert train and len(train) < 12  # at least one group on each side
    train_groups = {cid: group_of[cid] for cid in train}
    if len(set(train_groups.values())) == 1 and len(train) > 1 and val_fraction > 0:
        with pytest.raises(MedsegError, match="one group"):
            split_cases(train, val_fraction, seed, train_groups)
    else:
        val = split_cases(train, val_fraction, seed, train_groups)
        assert _one_side(train_groups, {cid: "val" if cid in val else "train" for cid in train})
    if len(set(train_groups.values())) < folds:
        with pytest.raises(MedsegError, match="folds"):
            split_folds(train, folds, seed, train_groups)
        return
    fold_list = split_folds(train, folds, seed, train_groups)
    assert sorted(c for f in fold_list for c in f) == sorted(train)
    assert _one_side(train_groups, {cid: str(k) for k, f in enumerate(fold_list) for cid in f})


def _one_side(group_of: dict[str, str], side: dict[str, str]) -> bool:
    sides: dict[str, set[str]] = {}
    for cid, s in side.items():
        sides.setdefault(group_of[cid], set()).add(s)
    return all(len(s) == 1 for s in sides.values())


@settings(max_examples=100, deadline=None)
@given(
    ids=st.lists(st.text("abcdefgh0123", min_size=1, max_size=6), min_size=2, max_size=40,
                 unique=True),
    fraction=st.floats(0.01, 0.99),
    seed=st.integers(0, 2**32 - 1),
)  # fmt: skip
def test_one_case_per_group_splits_as_before(ids: list[str], fraction: float, seed: int):
    """The splits of earlier versions (every case its own group), re-implemented here."""
    ordered = sorted(ids)
    n_test = min(max(round(fraction * len(ordered)), 1), len(ordered) - 1)
    old_test = {ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))[:n_test]}
    groups = {cid: f"hash-of-{cid[::-1]}" for cid in ids}  # names in another order than ids
    cases = [
        CaseFiles(cid, "", Path(f"{cid}.png"), Path("m"), None, None, group=groups[cid])
        for cid in ids
    ]
    new_test = {c.case_id for c in _seeded_split(cases, fraction, seed) if c.split == "test"}
    assert new_test == old_test
    old_val = set(np.random.default_rng(seed).permutation(ordered)[:n_test].tolist())
    assert split_cases(ids, fraction, seed, groups) == old_val == split_cases(ids, fraction, seed)


def test_the_manifest_is_the_same_whatever_the_id_key(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    """The keyed hashes decide which cases share a patient; the manifest names the groups by
    number, so a clone or another machine (another id key) converts the same data to the same
    bytes, and DVC sees the same data set."""
    _dicom_set(tmp_path / "raw")
    data = DataConfig(str(tmp_path / "raw"), "folders", test_fraction=0.3)
    first = convert_dataset(data, CFG, tmp_path / "a")
    monkeypatch.setenv("MEDSEG_ID_KEY", ("1e" * 32))
    convert_dataset(data, CFG, tmp_path / "b")
    a, b = (
        (tmp_path / "a" / "manifest.csv").read_bytes(),
        (tmp_path / "b" / "manifest.csv").read_bytes(),
    )
    assert a == b and first["group"].str.fullmatch(r"(patient|study):\d+").all()


def test_volumes_of_one_patient_stay_together(tmp_path: Path):
    """NIfTI volumes listed in a manifest with a patient column: the volumes of one patient are
    one group in the manifest (not a group each), so validation and folds keep them together."""
    import nibabel as nib

    root = tmp_path / "raw"
    root.mkdir()
    lines = ["image,mask,patient"]
    for n in range(6):
        volume = np.random.default_rng(n).integers(0, 400, (12, 10, 4)).astype(np.int16)
        labels = np.zeros((12, 10, 4), np.uint8)
        labels[3:8, 3:7, 1:3] = 1
        nib.save(nib.Nifti1Image(volume, np.eye(4)), root / f"v{n}.nii.gz")
        nib.save(nib.Nifti1Image(labels, np.eye(4)), root / f"v{n}_seg.nii.gz")
        lines.append(f"v{n}.nii.gz,v{n}_seg.nii.gz,P{n // 2}")
    (root / "list.csv").write_text("\n".join(lines) + "\n")
    data = DataConfig(str(root), "manifest", "list.csv", 0.34)
    manifest = convert_dataset(data, CFG, tmp_path / "out")
    assert manifest["group"].nunique() == 3
    assert all(len(sides) == 1 for sides in _sides(manifest).values())
