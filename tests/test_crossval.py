"""k-fold cross-validation: the fold split, the fold folders `fit` trains on, the ensemble, and
the opt-in pipeline crossval/dvc.yaml run by the real `dvc repro`."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import REPO, STAGES, make_bundle, make_project, make_store, run, tiny_params
from PIL import Image

from medseg.cli import main, write_crossval_pipeline
from medseg.config.evaluate import CrossvalConfig, EvaluateConfig
from medseg.config.keys import parse
from medseg.config.sections import PreprocessConfig
from medseg.config.train import TrainConfig
from medseg.errors import MedsegError
from medseg.evaluation.crossval import ensemble_folds, split_folds, write_folds
from medseg.evaluation.evaluate import evaluate_model
from medseg.io.shards import CaseStore
from medseg.names import CLASSES
from medseg.preprocess.dataset import split_cases
from medseg.preprocess.processed import RECORD, save_record
from medseg.spec import ModelSpec
from medseg.training.loop import fit

CFG = EvaluateConfig(
    threshold=0.5, window=64, overlap=0.25, blending="gaussian", tta=False, batch_size=2,
    device="cpu",
)  # fmt: skip


def test_folds_are_disjoint_cover_the_cases_and_differ_by_one_case_at_most():
    ids = [f"c{i:02d}" for i in range(11)]
    folds = split_folds(ids, 3, seed=0)
    assert sorted(len(f) for f in folds) == [3, 4, 4]
    assert sorted(c for f in folds for c in f) == ids  # each case in exactly one fold
    assert split_folds(list(reversed(ids)), 3, seed=0) == folds  # the order given is irrelevant
    assert split_folds(ids, 3, seed=1) != folds


def test_folds_follow_the_validation_split_order_and_keep_the_frames_of_a_file_together():
    ids = ["a_f0", "a_f1", "a_f2", "b", "c_f0", "c_f1", "d", "e"]
    groups = {cid: cid.split("_")[0] for cid in ids}
    for seed in range(5):
        folds = split_folds(ids, 2, seed, groups)
        for fold in folds:
            assert {groups[c] for c in fold}.isdisjoint(
                {groups[c] for other in folds if other is not fold for c in other}
            )
        # the first group of the shared seeded order: the one validation would take first
        first = split_cases(ids, 0.2, seed, groups)
        assert first <= set(folds[0])
    with pytest.raises(
        MedsegError, match=r"crossval.folds asks for 6 folds .* 5 group\(s\) \(patients"
    ):
        split_folds(ids, 6, 0, groups)


def _processed(folder: Path) -> Path:
    """A preprocess output: 5 training cases (train + val; a_f0 and a_f1 frames of one file),
    2 test cases, the records, and the convert manifest beside it."""
    rng = np.random.default_rng(0)

    def cases(n: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
        masks = [(rng.random((64, 64)) < 0.3).astype(np.uint8) for _ in range(n)]
        images = [(m + rng.normal(0, 0.5, m.shape))[None].astype(np.float32) for m in masks]
        return images, masks

    splits = {"train": ["a_f0", "a_f1", "b"], "val": ["c", "d"], "test": ["t0", "t1"]}
    for split, ids in splits.items():
        make_store(folder, *cases(len(ids)), split=split, ids=ids)
    save_record(PreprocessConfig(channel="green", val_fraction=0.2, seed=0), folder / RECORD)
    (folder / CLASSES).write_text(json.dumps({"names": ["background", "foreground"]}))
    manifest = pd.DataFrame(
        {"case_id": [c for ids in splits.values() for c in ids],
         "source": ["a.dcm", "a.dcm", "b.tif", "c.tif", "d.tif", "t0.tif", "t1.tif"]}
    )  # fmt: skip
    manifest.to_csv(folder.parent / "manifest.csv", index=False)
    return folder


def test_fit_trains_on_a_fold_folder_of_views(tmp_path: Path):
    data = _processed(tmp_path / "processed")
    cfg = CrossvalConfig(folds=[0, 1], seed=0)
    manifest, folds = tmp_path / "manifest.csv", tmp_path / "folds"
    table = write_folds(cfg, data, manifest, folds, tmp_path / "f.csv")
    assert table.equals(pd.read_csv(tmp_path / "f.csv"))
    assert sorted(table["case_id"]) == ["a_f0", "a_f1", "b", "c", "d"]  # no test case
    sources = [CaseStore.open(data, split) for split in ("train", "val")]
    source = {store.ids[i]: store.get(i, "image") for store in sources for i in store}
    for k in cfg.folds:
        folder = tmp_path / "folds" / f"fold{k}"
        val, train = CaseStore.open(folder, "val"), CaseStore.open(folder, "train")
        assert sorted(val.ids) == sorted(table.loc[table["fold"] == k, "case_id"])
        assert sorted(train.ids) == sorted(table.loc[table["fold"] != k, "case_id"])
        assert ("a_f0" in val.ids) == ("a_f1" in val.ids)
        assert not list(folder.glob("*.bin"))  # views: no pixel copied
        for store in (val, train):
            for i in store:
                assert np.array_equal(store.get(i, "image"), source[store.ids[i]])
    # the normal training function takes a fold folder as its data
    train_params = tiny_params()["train"]
    summary = fit(
        parse(TrainConfig, train_params, "train."), tmp_path / "folds" / "fold1",
        tmp_path / "models", tmp_path / "logs",
    )  # fmt: skip
    assert summary["best_epoch"] == 1 and 0.0 <= summary["best_val_dice"] <= 1.0
    bundle = tmp_path / "models"
    assert (bundle / "model.safetensors").is_file()
    assert (bundle / RECORD).read_bytes() == (data / RECORD).read_bytes()


def _png(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path)).astype(np.float64)


def test_the_ensemble_averages_the_folds_probabilities(tmp_path: Path):
    data = _processed(tmp_path / "processed")
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)
    models = [make_bundle(tmp_path / f"models/fold{k}", spec, seed=k) for k in range(2)]
    out = tmp_path / "ensemble"
    metrics = ensemble_folds(CFG, data, models, out)
    assert json.loads((out / "metrics.json").read_text()) == metrics
    assert list(metrics) == ["ensemble", "fold0", "fold1"]
    # a fold is scored exactly as the evaluate stage scores its model
    assert metrics["fold0"] == evaluate_model(CFG, data, models[0], tmp_path / "evaluate")
    probs = out / "probabilities"
    for case in ("t0", "t1"):
        folds = [_png(probs / f"fold{k}" / f"{case}.png") for k in range(2)]
        ensemble = _png(probs / "ensemble" / f"{case}.png")
        assert np.abs(ensemble - (folds[0] + folds[1]) / 2).max() <= 1.0  # 16-bit rounding
        assert np.abs(ensemble - folds[0]).max() > 100  # the folds do differ
    assert list(pd.read_csv(out / "per_image.csv")["case_id"]) == ["t0", "t1"]
    # the ensemble of one model twice is that model, scored the same way
    twice = ensemble_folds(CFG, data, [models[0]] * 2, tmp_path / "twice")
    assert twice["ensemble"] == metrics["fold0"]
    # a model trained on other classes than the data's is refused, nothing written
    (data / CLASSES).write_text(json.dumps({"names": ["background", "liver"]}))
    with pytest.raises(MedsegError, match="fold0: the model was trained on the classes"):
        ensemble_folds(CFG, data, models, tmp_path / "refused")
    assert not (tmp_path / "refused").exists()


def test_threshold_auto_takes_each_folds_threshold_and_their_mean_for_the_ensemble(
    tmp_path: Path,
):
    data = _processed(tmp_path / "processed")
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)
    models = [
        make_bundle(tmp_path / f"models/fold{k}", spec, seed=k, threshold=t)
        for k, t in enumerate((0.3, 0.6))
    ]
    auto = dataclasses.replace(CFG, threshold="auto")
    metrics = ensemble_folds(auto, data, models, tmp_path / "auto")
    assert [metrics[n]["threshold"] for n in ("fold0", "fold1", "ensemble")] == [0.3, 0.6, 0.45]
    for k, t in enumerate((0.3, 0.6)):  # each fold as the evaluate stage scores it at its own
        fixed = dataclasses.replace(CFG, threshold=t)
        assert metrics[f"fold{k}"] == evaluate_model(fixed, data, models[k], tmp_path / f"e{k}")
    fixed = ensemble_folds(dataclasses.replace(CFG, threshold=0.45), data, models, tmp_path / "f")
    assert metrics["ensemble"] == fixed["ensemble"]


@pytest.mark.slow  # seven stage processes (each imports torch): about a minute on two cores
def test_crossval_pipeline_end_to_end(tmp_path: Path):
    project = make_project(tmp_path / "project", tiny_params(crossval={"folds": [0, 1]}))
    assert not (project / "crossval").exists()  # opt-in: absent until asked for
    out = run(project, "medseg", "crossval").stdout  # writes crossval/dvc.yaml, runs it
    assert (project / "crossval" / "dvc.yaml").is_file()
    run(project, "git", "add", "-A")
    run(project, "git", "commit", "-qm", "crossval")
    cv = [f"crossval/dvc.yaml:{s}" for s in ("folds", "train@0", "train@1", "ensemble")]
    ran = [s for s in (*STAGES, *cv) if f"Running stage '{s}'" in out]
    assert ran == ["synthesize", "convert", "plan", "preprocess", *cv]  # not train, evaluate
    # the default `dvc repro` stays what it was: the top pipeline only (a dry run stops at
    # evaluate, whose models it cannot hash before train has run)
    dry = run(project, "dvc", "repro", "--dry", check=False)
    assert "Running stage 'train'" in dry.stdout
    assert "crossval/dvc.yaml" not in dry.stdout + dry.stderr

    shown = json.loads(run(project, "dvc", "metrics", "show", "--json").stdout)
    files = shown[""]["data"]
    for k in range(2):
        fold = files[f"crossval/results/fold{k}/train/metrics.json"]["data"]
        assert 0.0 <= fold["best_val_dice"] <= 1.0
    ensemble = files["crossval/results/ensemble/metrics.json"]["data"]
    for name in ("ensemble", "fold0", "fold1"):
        assert 0.0 <= ensemble[name]["test"]["fov"]["dice"] <= 1.0
        assert ensemble[name]["n_images"] == 2

    # the folds: disjoint, covering exactly the training (train + val) cases
    split = pd.read_csv(project / "data" / "processed" / "split.csv")
    folds = pd.read_csv(project / "crossval" / "results" / "folds.csv")
    assert folds["case_id"].is_unique
    assert sorted(folds["case_id"]) == sorted(split.loc[split["split"] != "test", "case_id"])
    assert sorted(folds["fold"].unique()) == [0, 1]
    for k in range(2):
        val = CaseStore.open(project / "crossval" / "folds" / f"fold{k}", "val")
        assert sorted(val.ids) == sorted(folds.loc[folds["fold"] == k, "case_id"])

    # the ensemble's probabilities are the mean of the folds' (16-bit PNGs)
    probs = project / "crossval" / "results" / "ensemble" / "probabilities"
    mean = (_png(probs / "fold0" / "01_test.png") + _png(probs / "fold1" / "01_test.png")) / 2
    assert np.abs(_png(probs / "ensemble" / "01_test.png") - mean).max() <= 1.0

    again = run(project, "dvc", "repro", "crossval/dvc.yaml").stdout
    assert "Running stage" not in again


def test_medseg_crossval_writes_the_pipeline_on_demand(tmp_path: Path, capsys):
    (tmp_path / "dvc.yaml").write_text("stages: {}\n")
    path = write_crossval_pipeline(tmp_path)
    assert path == tmp_path / "crossval" / "dvc.yaml"
    assert path.read_text() == (REPO / "src" / "medseg" / "crossval_dvc.yaml").read_text()
    assert write_crossval_pipeline(tmp_path) == path  # the same file: kept, no error
    path.write_text(path.read_text() + "# edited\n")
    with pytest.raises(MedsegError, match=r"crossval/dvc.yaml differs .* --force"):
        write_crossval_pipeline(tmp_path)
    assert path.read_text().endswith("# edited\n")  # nothing of the user's is lost
    with pytest.raises(SystemExit) as stop:
        main(["crossval", "--repo", str(tmp_path), "--force", "--write-only"])
    assert stop.value.code == 0
    assert "wrote" in capsys.readouterr().out
    assert not path.read_text().endswith("# edited\n")


def test_medseg_crossval_outside_a_repository_is_one_clear_error(tmp_path: Path, capsys):
    with pytest.raises(SystemExit) as stop:
        main(["crossval", "--repo", str(tmp_path), "--write-only"])
    assert stop.value.code != 0
    assert "no dvc.yaml here" in capsys.readouterr().err
    assert not (tmp_path / "crossval").exists()


def test_other_commands_still_refuse_unknown_arguments(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["check-params", "params.yaml", "--bogus"])
    assert stop.value.code == 2
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err


def test_each_fold_post_processes_as_evaluate_does_and_the_ensemble_only_when_they_agree(
    tmp_path: Path,
):
    data = _processed(tmp_path / "processed")
    spec = ModelSpec("unet", "resnet18", [16, 8, 8, 8, 8], in_channels=1, classes=1)
    largest = {1: [{"op": "keep_largest"}]}
    plain = [make_bundle(tmp_path / f"plain/fold{k}", spec, seed=k) for k in range(2)]
    mixed = [
        make_bundle(tmp_path / f"mixed/fold{k}", spec, seed=k, postprocess=steps)
        for k, steps in enumerate((largest, None))
    ]
    raw = ensemble_folds(CFG, data, plain, tmp_path / "raw")
    metrics = ensemble_folds(CFG, data, mixed, tmp_path / "mixed-out")
    assert metrics["fold0"] == evaluate_model(CFG, data, mixed[0], tmp_path / "evaluate")
    assert metrics["fold0"] != raw["fold0"]  # keep_largest changed fold 0's masks
    assert metrics["fold1"] == raw["fold1"] and metrics["ensemble"] == raw["ensemble"]
