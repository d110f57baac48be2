"""The preprocess stage: model-ready cases (see `medseg.preprocess.transforms`), the train/val
split, written as one case store (a few shard files) per split (read back by
`medseg.preprocess.processed`)."""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from medseg.config import PreprocessConfig
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_dir, write_json
from medseg.io.images import binarize, read_labels, read_raster
from medseg.io.records import read_json
from medseg.io.shards import ShardWriter
from medseg.names import AUTO, CLASSES, CONVERT_RECORD
from medseg.preprocess.processed import (
    RECORD,
    SPLITS,
    read_class_names,
    save_record,
)
from medseg.preprocess.transforms import prepare_image, resize_labels

# The stage's own names, and those the modules reading processed data import from here.
__all__ = ["case_arrays", "preprocess_dataset", "shuffled_groups", "source_groups", "split_cases"]

log = logging.getLogger(__name__)


def split_cases(
    train_ids: list[str],
    val_fraction: float,
    seed: int,
    groups: dict[str, str] | None = None,
) -> set[str]:
    """Choose the validation cases among the training cases, reproducibly.

    Args:
        train_ids: the training case ids.
        val_fraction: share of them for validation.
        seed: the seed of the choice.
        groups: case id -> group (e.g. the source file of the frames of a multi-frame DICOM); the
            cases of one group all go to the same side, so no frame of a validation file is
            trained on. Default: every case is its own group.

    Returns:
        The ids moved to validation: ``round(val_fraction * n)`` groups of the ``n``, at least one
        when ``val_fraction > 0`` and there are two or more groups, never every group.
    """
    group_of, keys = shuffled_groups(train_ids, seed, groups)
    n_val = round(val_fraction * len(keys))
    if val_fraction > 0 and len(keys) >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, len(keys) - 1)
    chosen = set(keys[:n_val])
    return {cid for cid in train_ids if group_of[cid] in chosen}


def shuffled_groups(
    train_ids: list[str], seed: int, groups: dict[str, str] | None = None
) -> tuple[dict[str, str], list[str]]:
    """The groups of the training cases in a seeded random order, for splits that keep a
    group (the frames of one source file) on one side: validation here, the folds of
    `medseg.evaluation.crossval`.

    Args:
        train_ids: the training case ids.
        seed: the seed of the order.
        groups: case id -> group; default: every case is its own group.

    Returns:
        Case id -> group, and the distinct groups shuffled (the same order whatever the order
        of ``train_ids``).
    """
    group_of = groups or {cid: cid for cid in train_ids}
    keys = sorted({group_of[cid] for cid in train_ids})
    return group_of, np.random.default_rng(seed).permutation(keys).tolist()


def preprocess_dataset(
    cfg: PreprocessConfig, converted: str | Path, out: str | Path, fov_fallback: str | None = None
) -> dict:
    """Turn the converted PNGs + manifest into one case store per split (see `medseg.io.shards`:
    ``out/<split>.json`` + ``out/<split>-NNNNN.bin``), ``split.csv``, ``stats.json``,
    ``preprocess.json`` (``cfg``, for `load_record`), ``classes.json``, and the convert
    stage's ``convert.json`` passed on.

    Cases are read, prepared and written one at a time, each at its own size (never padded to
    the largest; resized only with ``preprocess.max_side``, the ground truth then kept at full
    size as well), so memory stays that of one case whatever the data set's size. Each case
    stores ``image``, ``mask``, ``fov``, the FOV and per-class foreground pixel counts per row
    (``fov_rows``, ``fg_rows``: the patch sampler draws centres from them without holding
    pixel lists), and ``mask2`` where the manifest names a second observer.

    Where convert ran with ``fov_fallback: auto`` (it made an FOV by threshold where it could),
    ``fov_fallback`` is the plan's decision: ``whole_image`` replaces those made FOVs by the
    whole image, ``threshold`` keeps them; the ``convert.json`` passed on records the decision
    (`medseg predict` makes a new image's FOV by it).

    Returns:
        The statistics written to ``stats.json``.

    Raises:
        MedsegError: a missing manifest, no training or test cases, a bad case, or a data set
            converted with ``fov_fallback: auto`` and no ``fov_fallback`` decided.
    """
    converted = Path(converted)
    manifest_path = converted / "manifest.csv"
    if not manifest_path.is_file():
        raise MedsegError(f"{manifest_path}: no manifest; run the convert stage first")
    manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    train_ids = manifest.loc[manifest["split"] == "train", "case_id"].tolist()
    if not train_ids:
        raise MedsegError(f"{manifest_path}: no training cases (split == 'train')")
    if not (manifest["split"] == "test").any():
        raise MedsegError(f"{manifest_path}: no test cases (split == 'test')")
    names = read_class_names(converted)
    convert_record = _convert_record(converted, fov_fallback)
    whole = convert_record is not None and convert_record["fov_fallback"] == "whole_image"
    val_ids = split_cases(train_ids, cfg.val_fraction, cfg.seed, source_groups(manifest))
    manifest["split"] = [
        "val" if cid in val_ids else split
        for cid, split in zip(manifest["case_id"], manifest["split"], strict=True)
    ]
    stats: dict = {"channel": cfg.channel, "classes": names, "max_side": cfg.max_side}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            rows = manifest[manifest["split"] == split]
            stats[split] = _write_split(rows, converted, cfg, names, tmp, split, whole)
        manifest[["case_id", "split"]].to_csv(tmp / "split.csv", index=False)
        write_json(tmp / "stats.json", stats)
        save_record(cfg, tmp / RECORD)
        write_json(tmp / CLASSES, {"names": names})
        if convert_record is not None:  # passed on to the model, for predict
            write_json(tmp / CONVERT_RECORD, convert_record)
    log.info("preprocessed %d cases", len(manifest))
    return stats


def source_groups(manifest: pd.DataFrame) -> dict[str, str] | None:
    """Case id -> source file, where some file gave several cases (frames); else None."""
    if "source" not in manifest.columns or not manifest["source"].duplicated().any():
        return None
    return dict(zip(manifest["case_id"], manifest["source"].astype(str), strict=True))


def _convert_record(converted: Path, fov_fallback: str | None) -> dict[str, Any] | None:
    """The convert stage's record, its ``fov_fallback: auto`` replaced by the plan's decision."""
    path = converted / CONVERT_RECORD
    if not path.is_file():
        return None
    record = dict(read_json(path, "convert record"))
    if record.get("fov_fallback") == AUTO:
        if fov_fallback not in ("threshold", "whole_image"):
            raise MedsegError(
                f"{converted}: converted with convert.fov_fallback: auto, which the plan "
                f"decides; give the plan (--plan plans.json), got {fov_fallback!r}"
            )
        record["fov_fallback"] = fov_fallback
    return record


def _write_split(
    rows: pd.DataFrame, converted: Path, cfg: PreprocessConfig, names: list[str], out: Path,
    split: str, whole: bool = False,
) -> dict:  # fmt: skip
    """Prepare and append each case of one split to its shards; return the split's stats.
    ``whole``: FOVs convert made by threshold become the whole image."""
    writer = ShardWriter(out, split)
    n_labels = len(names)
    fg = np.zeros(n_labels, dtype=np.int64)
    inside = resized = pixels = 0
    try:
        for row in rows.itertuples(index=False):
            arrays, meta = _prepare_case(row, converted, cfg, n_labels, whole)
            writer.add(str(row.case_id), arrays, **meta)
            fg[1:] += arrays["fg_rows"].sum(axis=1)
            inside += int(arrays["fov_rows"].sum())
            resized += int("mask_full" in arrays)
            pixels += meta["height"] * meta["width"]
    finally:
        writer.close()
    shares = {
        name: round(float(fg[k]) / inside, 4) if inside else None
        for k, name in enumerate(names)
        if k > 0
    }
    out_stats: dict = {"cases": len(rows), "pixels": pixels, "resized": resized}
    if n_labels == 2:
        out_stats["foreground_fraction_in_fov"] = shares[names[1]]
    else:
        out_stats["class_fraction_in_fov"] = shares
    return out_stats


def _prepare_case(
    row: Any, converted: Path, cfg: PreprocessConfig, n_labels: int, whole: bool = False
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read, check and prepare one manifest row; every check before anything is written."""
    image_path = converted / str(row.image)
    fov_full = binarize(read_raster(converted / str(row.fov)))
    if whole and getattr(row, "fov_source", "") == "threshold":
        fov_full = np.ones_like(fov_full)
    truth = read_labels(converted / str(row.mask), n_labels)
    image = read_raster(image_path)
    for what, arr, name in (("mask", truth, row.mask), ("FOV mask", fov_full, row.fov)):
        if arr.shape != image.shape[:2]:
            raise MedsegError(
                f"{converted / str(name)}: {what} is {arr.shape[1]}x{arr.shape[0]} but its image "
                f"{image_path} is {image.shape[1]}x{image.shape[0]} (width x height); they must "
                "match"
            )
    if not fov_full.any():
        raise MedsegError(f"{converted / str(row.fov)}: the field-of-view mask is empty")
    x, fov = prepare_image(image, fov_full, cfg, image_path)
    arrays = case_arrays(x, resize_labels(truth, fov.shape, n_labels), fov, n_labels)
    if fov.shape != fov_full.shape:
        arrays["mask_full"] = truth
        arrays["fov_full"] = fov_full.astype(np.uint8)
    mask2_name = str(getattr(row, "mask2", "") or "").strip()
    if mask2_name:
        mask2 = read_labels(converted / mask2_name, n_labels)
        if mask2.shape != truth.shape:
            raise MedsegError(
                f"{converted / mask2_name}: second observer's mask is "
                f"{mask2.shape[1]}x{mask2.shape[0]}, its image {truth.shape[1]}x{truth.shape[0]}; "
                "they must match"
            )
        arrays["mask2"] = mask2
    meta: dict[str, Any] = {
        "height": int(fov.shape[0]),
        "width": int(fov.shape[1]),
        "full_height": int(fov_full.shape[0]),
        "full_width": int(fov_full.shape[1]),
    }
    spacing = [float(getattr(row, f"spacing_{axis}", "nan") or "nan") for axis in ("row", "col")]
    if all(math.isfinite(v) and v > 0 for v in spacing):
        meta["spacing"] = spacing  # mm at full size (the ground truth's): boundary distances
    return arrays, meta


def case_arrays(
    image: np.ndarray, mask: np.ndarray, fov: np.ndarray, n_labels: int
) -> dict[str, np.ndarray]:
    """The arrays a case store keeps of one prepared case.

    Args:
        image: (C, h, w) float32 model input.
        mask: (h, w) integer labels, in [0, n_labels).
        fov: (h, w) bool.
        n_labels: labels, background included (2: binary).

    Returns:
        ``image``, ``mask`` (uint8), ``fov`` (uint8 0/1), ``fov_rows`` ((h,) int32 FOV pixels
        per row) and ``fg_rows`` ((n_labels - 1, h) int32 pixels of each foreground label
        inside the FOV per row).
    """
    fov = fov.astype(bool, copy=False)
    return {
        "image": np.asarray(image, dtype=np.float32),
        "mask": mask.astype(np.uint8, copy=False),
        "fov": fov.astype(np.uint8),
        "fov_rows": fov.sum(axis=1, dtype=np.int32),
        "fg_rows": np.stack(
            [((mask == k) & fov).sum(axis=1, dtype=np.int32) for k in range(1, n_labels)]
        ),
    }
