"""k-fold cross-validation, as nnU-Net does it: the training cases in k folds, one model per fold
(each validated on its own fold), and the folds' ensemble on the test cases.

The pipeline is ``crossval/dvc.yaml`` (opt-in, see ``docs/crossval.md``):

1. `write_folds` splits the training cases (preprocess's ``train`` and ``val`` splits together)
   into folds, keeping the frames of one source file in one fold, and writes one folder per fold
   that the train stage reads like ``data/processed``: ``train.json`` and ``val.json`` are views
   into preprocess's shards (`medseg.io.shards.write_view`), so no array is copied.
2. The train stage (`medseg.training.loop.fit`) runs once per fold on that folder.
3. `ensemble_folds` predicts each test case with the folds' ensemble (one
   `medseg.inference.predictor.Predictor` with a runner per fold, as evaluate predicts with one),
   and scores every fold and the ensemble (the mean of their probabilities) with evaluate's
   `ScoreTally`.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from medseg.config import CrossvalConfig, EvaluateConfig
from medseg.errors import MedsegError
from medseg.evaluation.evaluate import check_classes, open_test, shape_scoring
from medseg.inference.bundle import RECORDS, load_bundle
from medseg.inference.predictor import Predictor
from medseg.inference.window import WindowSettings
from medseg.io.atomic import atomic_dir, write_json, write_text
from medseg.io.images import write_png
from medseg.io.shards import CaseStore, write_view
from medseg.labels import to_uint16
from medseg.preprocess.dataset import shuffled_groups, source_groups
from medseg.preprocess.processed import Case, open_split, read_case
from medseg.scoring.tally import PRECISION, ScoreTally, SecondObserver, build_metrics

log = logging.getLogger(__name__)

ENSEMBLE = "ensemble"  # the ensemble's key in metrics.json and its probabilities folder


def fold_name(k: int) -> str:
    """The folder (and metrics key) of fold ``k``: ``fold<k>``, as ``crossval/dvc.yaml`` names
    it."""
    return f"fold{k}"


def split_folds(
    train_ids: list[str], k: int, seed: int, groups: dict[str, str] | None = None
) -> list[list[str]]:
    """The training cases in ``k`` disjoint folds that cover them all, reproducibly.

    The groups (source files) come in the seeded order of
    `medseg.preprocess.dataset.shuffled_groups`, the one the validation split uses; each goes whole
    to the fold with the fewest cases so far (the first such fold on a tie), so with one case per
    group the folds differ in size by at most one case.

    Args:
        train_ids: the training case ids.
        k: the number of folds, >= 2.
        seed: the seed of the order.
        groups: case id -> group (e.g. the source file of the frames of a multi-frame DICOM);
            default: every case is its own group.

    Returns:
        ``k`` lists of case ids, each sorted.

    Raises:
        MedsegError: fewer groups than folds.
    """
    group_of, keys = shuffled_groups(train_ids, seed, groups)
    if len(keys) < k:
        raise MedsegError(
            f"params: crossval.folds asks for {k} folds but the training cases come from "
            f"{len(keys)} source file(s); use at most {len(keys)} folds"
        )
    members: dict[str, list[str]] = {}
    for cid in train_ids:
        members.setdefault(group_of[cid], []).append(cid)
    folds: list[list[str]] = [[] for _ in range(k)]
    for key in keys:
        smallest = min(range(k), key=lambda j: len(folds[j]))
        folds[smallest].extend(members[key])
    return [sorted(fold) for fold in folds]


def write_folds(
    cfg: CrossvalConfig, data_dir: str | Path, manifest: str | Path, out: str | Path,
    table: str | Path,
) -> pd.DataFrame:  # fmt: skip
    """Split the training cases of ``data_dir`` into folds; write one data folder per fold.

    ``out/fold<k>/`` holds ``train.json`` (the cases of the other folds) and ``val.json`` (fold
    ``k``'s cases), views into the shards of ``data_dir``, and the records ``data_dir`` has
    (preprocess, convert, classes), so that `medseg.training.loop.fit` takes it as its data folder.
    ``out`` appears whole or not at all.

    Args:
        cfg: the crossval params (the folds and the seed).
        data_dir: the preprocess stage's output; its ``train`` and ``val`` cases are the
            training cases, its ``test`` cases are left out.
        manifest: the convert stage's ``manifest.csv``, whose ``source`` column groups the
            frames of one file.
        out: the folder of the fold folders.
        table: a CSV written with one row per training case: ``case_id``, ``fold``.

    Returns:
        That table.
    """
    data_dir, out = Path(data_dir), Path(out)
    cases = [(store, i) for store in _training_stores(data_dir) for i in store]
    ids = [store.ids[i] for store, i in cases]
    folds = split_folds(ids, len(cfg.folds), cfg.seed, _groups(manifest, ids))
    fold_of = {cid: k for k, fold in enumerate(folds) for cid in fold}
    with atomic_dir(out) as tmp:
        for k in cfg.folds:
            folder = tmp / fold_name(k)
            folder.mkdir()
            final = out / fold_name(k)
            inside = [case for case, cid in zip(cases, ids, strict=True) if fold_of[cid] == k]
            rest = [case for case, cid in zip(cases, ids, strict=True) if fold_of[cid] != k]
            write_view(folder, "train", rest, final=final)
            write_view(folder, "val", inside, final=final)
            for name in RECORDS:
                if (data_dir / name).is_file():
                    shutil.copyfile(data_dir / name, folder / name)
    rows = pd.DataFrame({"case_id": ids, "fold": [fold_of[cid] for cid in ids]})
    rows = rows.sort_values(["fold", "case_id"], ignore_index=True)
    write_text(table, rows.to_csv(index=False))
    log.info("%d training cases in %d folds of %s", len(ids), len(folds), [len(f) for f in folds])
    return rows


def _training_stores(data_dir: Path) -> list[CaseStore]:
    """Preprocess's ``train`` and ``val`` splits: every case that is not a test case."""
    stores = [open_split(data_dir, split) for split in ("train", "val")]
    if not sum(len(store) for store in stores):
        raise MedsegError(f"{data_dir}: no training cases to split into folds")
    return stores


def _groups(manifest: str | Path, ids: list[str]) -> dict[str, str] | None:
    """Case id -> source file from the convert manifest (None when every file gave one case)."""
    path = Path(manifest)
    if not path.is_file():
        raise MedsegError(f"{path}: no manifest; run the convert stage first")
    groups = source_groups(pd.read_csv(path, dtype=str, keep_default_na=False))
    return None if groups is None else {cid: groups.get(cid, cid) for cid in ids}


def ensemble_folds(
    cfg: EvaluateConfig, data_dir: str | Path, models: Sequence[str | Path], out: str | Path
) -> dict:
    """Score every fold's model and their ensemble on the ``test`` split of ``data_dir``.

    Each test case is predicted by the ensemble, a `medseg.inference.predictor.Predictor` with one
    runner per fold and the evaluate params: each fold's probabilities are scored at the fold's
    threshold, their mean at the ensemble's (under ``threshold: auto``, each fold its own
    validation threshold, the ensemble their mean: `medseg.inference.predictor.resolve_threshold`),
    and with its post-processing (each fold its own; the ensemble the folds' where they all chose
    the same, else none: `medseg.inference.predictor.shared_postprocess`). Every model and the
    ensemble are scored as the evaluate stage scores one (`medseg.scoring.tally.ScoreTally`).
    Cases are done one at a time, so memory stays that of one case and the models. Writes into
    ``out`` (whole or not at all):

    - ``metrics.json``: ``{"ensemble": ..., "fold0": ..., ...}``, each block the content of
      evaluate's ``metrics.json`` (the second observer, where there is one, under ``ensemble``);
    - ``per_image.csv``: the ensemble's scores per test image;
    - ``probabilities/<fold<k> or ensemble>/<case>.png``: the foreground probability, 16 bit
      (probability x 65535, rounded), so the mean can be checked against the folds'.

    Args:
        cfg: the evaluate params.
        data_dir: the preprocess stage's output.
        models: the folds' model bundles, in fold order.
        out: the output folder.

    Returns:
        The metrics written to ``metrics.json``.
    """
    if not models:
        raise MedsegError("crossval: no fold models to ensemble")
    bundles = []
    for path in models:
        bundles.append(load_bundle(path, cfg.device))
        check_classes(bundles[-1].classes, data_dir, path)
    test = open_test(data_dir)
    settings = WindowSettings.from_config(cfg)
    ensemble = Predictor.from_bundles(bundles, settings, cfg.threshold)
    space = ensemble.labels
    folds = [fold_name(k) for k in range(len(bundles))]
    names = [ENSEMBLE, *folds]
    shapes, spacings = shape_scoring(cfg, data_dir, test, space)
    tallies = {name: ScoreTally(space.channels, list(space.names), shapes=shapes) for name in names}
    second = SecondObserver(space.channels)
    # each fold segments as its own predictor would (threshold, post-processing), the ensemble
    # as ``ensemble``; the probabilities are computed once, by ``ensemble``
    alone = [Predictor.from_bundles([bundle], settings, cfg.threshold) for bundle in bundles]
    segmenters = {ENSEMBLE: ensemble, **dict(zip(folds, alone, strict=True))}
    thresholds = {name: predictor.threshold for name, predictor in segmenters.items()}
    with atomic_dir(out) as tmp:
        for name in names:
            (tmp / "probabilities" / name).mkdir(parents=True)
        for i in test:
            case = read_case(test, i)
            _ensemble_case(case, segmenters, tallies, tmp, spacings[i])
            if case.mask2 is not None:
                second.add(case.truth, case.mask2, case.truth_fov)
            test.release(i)
        metrics = {
            name: build_metrics(
                tallies[name],
                second.summary() if name == ENSEMBLE else None,
                thresholds[name],
            )
            for name in names
        }
        write_json(tmp / "metrics.json", metrics)
        tallies[ENSEMBLE].per_image().round(PRECISION).to_csv(tmp / "per_image.csv", index=False)
    log.info(
        "test (FOV, pooled) dice: ensemble %s, folds %s",
        metrics[ENSEMBLE]["test"]["fov"]["dice"],
        [metrics[name]["test"]["fov"]["dice"] for name in folds],
    )
    return metrics


def _ensemble_case(
    case: Case, segmenters: dict[str, Predictor], tallies: dict[str, ScoreTally], out: Path,
    spacing: tuple[float, float] | None,
) -> None:  # fmt: skip
    """Predict one case with every fold's model, then with their mean; score and save each
    segmented by its predictor (``segmenters``, by fold name and `ENSEMBLE`, whose runners give
    the folds' probabilities)."""
    ensemble, inside = segmenters[ENSEMBLE], case.truth_fov
    space = ensemble.labels
    members = ensemble.member_probabilities(case.image, case.fov, out_fov=inside)
    folds = [name for name in tallies if name != ENSEMBLE]
    for name, probs in [*zip(folds, members, strict=True), (ENSEMBLE, ensemble.mean(members))]:
        pred = segmenters[name].segment(probs, inside)
        tallies[name].add(case.case_id, probs, pred, case.truth, inside, spacing)
        path = out / "probabilities" / name / f"{case.case_id}.png"
        write_png(path, to_uint16(space.foreground(probs)))
