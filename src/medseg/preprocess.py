"""Model-ready cases: channel choice, optional resizing, FOV-aware normalisation, the train/val
split, written as one case store (a few shard files) per split."""

from __future__ import annotations

import dataclasses
import logging
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from skimage import exposure

from medseg.config import (
    CLASSES,
    CONVERT_RECORD,
    MAX_CLASSES,
    PreprocessConfig,
    parse,
    read_json,
)
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_dir, write_json
from medseg.io.images import binarize, read_raster
from medseg.io.shards import CaseStore, ShardWriter

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RECORD = "preprocess.json"  # the preprocess params, for `medseg predict` on new images
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


def select_channel(image: np.ndarray, channel: str, path: str | Path = "image") -> np.ndarray:
    """The model's input channels of an image, as float32 in [0, 1].

    Args:
        image: (H, W) or (H, W, 3), uint8 or uint16.
        channel: ``green`` (the vessel-contrast channel of a fundus photograph; a grey image is
            used as it is), ``gray`` (luma of an RGB image) or ``rgb`` (all three channels:
            dermoscopy, endoscopy, histology; the image must be colour).
        path: the image's file, for messages.

    Returns:
        (C, H, W) float32: C = 3 for ``rgb``, else 1.

    Raises:
        MedsegError: ``rgb`` asked of a grey image.
    """
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    x = image.astype(np.float32) / scale
    if channel == "rgb":
        if x.ndim != 3 or x.shape[2] != 3:
            raise MedsegError(
                f"{path}: a grey image, but preprocess.channel is rgb (3 colour channels); "
                "use preprocess.channel: gray for grey data sets"
            )
        return np.ascontiguousarray(x.transpose(2, 0, 1))
    if x.ndim == 2:
        return x[None]
    if channel == "green":
        return np.ascontiguousarray(x[None, ..., 1])
    return (x @ _LUMA)[None]


def in_channels(channel: str) -> int:
    """Input channels of the model for ``preprocess.channel``."""
    return 3 if channel == "rgb" else 1


def normalize_in_fov(x: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Per channel: zero mean, unit variance using only FOV pixels; 0 outside the FOV.

    Args:
        x: (C, H, W) or (H, W) float32 image.
        fov: (H, W) bool field of view (at least one pixel).

    Returns:
        float32 of the shape of ``x``. A constant FOV gives zeros, never NaN.
    """
    flat = x[None] if x.ndim == 2 else x
    out = np.empty(flat.shape, dtype=np.float32)
    for c, channel in enumerate(flat):
        inside = channel[fov].astype(np.float64)
        std = float(inside.std())
        out[c] = (channel - float(inside.mean())) / (std if std > 1e-6 else 1.0)
        out[c][~fov] = 0.0
    return out[0] if x.ndim == 2 else out


def model_size(height: int, width: int, max_side: int | None) -> tuple[int, int]:
    """The size a case is given to the model: its own, or scaled down to ``max_side``."""
    if max_side is None or max(height, width) <= max_side:
        return height, width
    scale = max_side / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def resize_image(x: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """(C, H, W) float32 to (C, h, w): area averaging down (no aliasing), bilinear up."""
    if x.shape[-2:] == size:
        return x
    import torch  # here, not at the top: an ONNX model predicts without torch
    import torch.nn.functional as F

    t = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))[None]
    down = size[0] <= x.shape[-2] and size[1] <= x.shape[-1]
    if down:
        out = F.interpolate(t, size=size, mode="area")
    else:
        out = F.interpolate(t, size=size, mode="bilinear", align_corners=False)
    return out[0].numpy()


def resize_labels(labels: np.ndarray, size: tuple[int, int], n_labels: int) -> np.ndarray:
    """(H, W) integer labels to (h, w) uint8: each pixel takes the label covering most of it
    (area-weighted vote), so a resized mask keeps the classes' areas."""
    if labels.shape == size:
        return labels.astype(np.uint8, copy=False)
    onehot = np.stack([labels == k for k in range(n_labels)]).astype(np.float32)
    return resize_image(onehot, size).argmax(axis=0).astype(np.uint8)


def _check_channel_has_content(
    image: np.ndarray, chosen: np.ndarray, fov: np.ndarray, channel: str, path: str | Path
) -> None:
    """Refuse a colour image whose chosen channel is flat inside the FOV while its colours are
    not (a stain or fluorescence in red or blue only): the network would see a blank input."""
    inside = chosen[fov]
    if inside.size and inside.min() == inside.max():
        colours = image[fov]
        if (colours.max(axis=0) != colours.min(axis=0)).any():
            raise MedsegError(
                f"{path}: its {channel} channel is constant inside the field of view but its "
                "colour channels are not; set preprocess.channel: rgb (or gray)"
            )


def prepare_image(
    image: np.ndarray, fov: np.ndarray, cfg: PreprocessConfig, path: str | Path = "image"
) -> tuple[np.ndarray, np.ndarray]:
    """The model input for one image: the same steps for the pipeline and ``medseg predict``.

    Steps: (1) the channels of ``preprocess.channel``; (2) optionally CLAHE, per channel, at
    full resolution; (3) scaled down to ``preprocess.max_side`` where the user asks for it;
    (4) zero mean and unit variance inside the FOV, 0 outside.

    Args:
        image: (H, W) or (H, W, 3) uint8 or uint16, as the readers of `medseg.io` return it.
        fov: (H, W) bool field of view (at least one pixel).
        cfg: the preprocess params the model was trained with.
        path: the image's file, for messages.

    Returns:
        (C, h, w) float32 input and its (h, w) bool FOV, unpadded; (h, w) = (H, W) unless
        resized.
    """
    x = select_channel(image, cfg.channel, path)
    if image.ndim == 3 and cfg.channel != "rgb":
        _check_channel_has_content(image, x[0], fov, cfg.channel, path)
    if cfg.contrast == "clahe":
        x = np.stack([clahe(c, cfg.clahe_clip, cfg.clahe_tiles) for c in x])
    size = model_size(fov.shape[0], fov.shape[1], cfg.max_side)
    if size != fov.shape:
        x = resize_image(x, size)
        fov = resize_labels(fov, size, 2) > 0
        if not fov.any():
            raise MedsegError(
                f"{path}: the field of view vanishes at preprocess.max_side {cfg.max_side}; "
                "raise it"
            )
    return normalize_in_fov(x, fov), fov


def clahe(x: np.ndarray, clip: float, tiles: int) -> np.ndarray:
    """Contrast-limited adaptive histogram equalisation of one channel.

    Each of ``tiles`` x ``tiles`` regions gets its own histogram equalisation, its histogram
    clipped at ``clip`` (a share of the tile's pixels) so that noise in flat regions is not
    amplified, and neighbouring mappings are interpolated. Thin, faint vessels gain contrast
    against the uneven background of a fundus photograph.

    Args:
        x: (H, W) float32 in [0, 1].
        clip: clip limit in (0, 1].
        tiles: regions per image side.

    Returns:
        (H, W) float32 in [0, 1]; an image with (almost) no contrast comes back unchanged, as
        equalising it would only blow noise up to the full range.
    """
    if float(np.ptp(x)) < 1e-3:
        return x.astype(np.float32)
    kernel = (max(2, -(-x.shape[0] // tiles)), max(2, -(-x.shape[1] // tiles)))
    out = exposure.equalize_adapthist(np.clip(x, 0.0, 1.0), kernel_size=kernel, clip_limit=clip)
    return out.astype(np.float32)


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
    `medseg.crossval`.

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


BINARY = ("background", "foreground")


@dataclass(frozen=True)
class Case:
    """One preprocessed case, as `read_case` gives it.

    Attributes:
        case_id: its id.
        image: (C, h, w) float32 model input (zero mean, unit variance inside the FOV).
        mask: (h, w) uint8 labels at the model's resolution (0/1 binary, else 0..K-1).
        fov: (h, w) bool field of view at the model's resolution.
        truth: (H, W) uint8 labels at the ground truth's resolution, where scores are counted
            (the same array as ``mask`` unless ``preprocess.max_side`` resized the case).
        truth_fov: (H, W) bool, the FOV at that resolution.
        mask2: (H, W) uint8 second observer's labels, or None.
    """

    case_id: str
    image: np.ndarray
    mask: np.ndarray
    fov: np.ndarray
    truth: np.ndarray
    truth_fov: np.ndarray
    mask2: np.ndarray | None = None


def read_case(store: CaseStore, i: int) -> Case:
    """Case ``i`` of a split written by `preprocess_dataset` (views into its shards)."""
    fov = store.get(i, "fov") > 0
    mask = store.get(i, "mask")
    resized = store.has(i, "mask_full")
    return Case(
        store.ids[i],
        store.get(i, "image"),
        mask,
        fov,
        store.get(i, "mask_full") if resized else mask,
        store.get(i, "fov_full") > 0 if resized else fov,
        store.get(i, "mask2") if store.has(i, "mask2") else None,
    )


def open_split(data_dir: str | Path, split: str, ram: bool = False) -> CaseStore:
    """The cases of one split written by `preprocess_dataset`."""
    return CaseStore.open(data_dir, split, ram=ram)


def read_class_names(folder: str | Path) -> list[str]:
    """The class names in label order (background first) from ``folder/classes.json``; the
    binary pair when the file is absent."""
    path = Path(folder) / CLASSES
    if not path.is_file():
        return list(BINARY)
    raw = read_json(path, "class list")
    names = raw.get("names") if isinstance(raw, dict) else None
    return check_class_names(names, str(path))


def check_class_names(names: Any, source: str) -> list[str]:
    """``names`` as a list of 2 to `MAX_CLASSES` distinct class names; ``source`` names it in
    errors."""
    if (
        not isinstance(names, list)
        or not 2 <= len(names) <= MAX_CLASSES
        or not all(isinstance(n, str) and len(n) <= 100 for n in names)
        or not all(isinstance(n, str) and n for n in names)
        or len(set(names)) != len(names)
    ):
        raise MedsegError(
            f"{source}: names must be a list of 2 to {MAX_CLASSES} distinct class names"
        )
    return names


def preprocess_dataset(cfg: PreprocessConfig, converted: str | Path, out: str | Path) -> dict:
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

    Returns:
        The statistics written to ``stats.json``.
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
    val_ids = split_cases(train_ids, cfg.val_fraction, cfg.seed, source_groups(manifest))
    manifest["split"] = [
        "val" if cid in val_ids else split
        for cid, split in zip(manifest["case_id"], manifest["split"], strict=True)
    ]
    stats: dict = {"channel": cfg.channel, "classes": names, "max_side": cfg.max_side}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            rows = manifest[manifest["split"] == split]
            stats[split] = _write_split(rows, converted, cfg, names, tmp, split)
        manifest[["case_id", "split"]].to_csv(tmp / "split.csv", index=False)
        write_json(tmp / "stats.json", stats)
        save_record(cfg, tmp / RECORD)
        write_json(tmp / CLASSES, {"names": names})
        if (converted / CONVERT_RECORD).is_file():  # passed on to the model, for predict
            shutil.copyfile(converted / CONVERT_RECORD, tmp / CONVERT_RECORD)
    log.info("preprocessed %d cases", len(manifest))
    return stats


def source_groups(manifest: pd.DataFrame) -> dict[str, str] | None:
    """Case id -> source file, where some file gave several cases (frames); else None."""
    if "source" not in manifest.columns or not manifest["source"].duplicated().any():
        return None
    return dict(zip(manifest["case_id"], manifest["source"].astype(str), strict=True))


def _write_split(
    rows: pd.DataFrame, converted: Path, cfg: PreprocessConfig, names: list[str], out: Path,
    split: str,
) -> dict:  # fmt: skip
    """Prepare and append each case of one split to its shards; return the split's stats."""
    writer = ShardWriter(out, split)
    n_labels = len(names)
    fg = np.zeros(n_labels, dtype=np.int64)
    inside = resized = pixels = 0
    try:
        for row in rows.itertuples(index=False):
            arrays, meta = _prepare_case(row, converted, cfg, n_labels)
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
    row: Any, converted: Path, cfg: PreprocessConfig, n_labels: int
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Read, check and prepare one manifest row; every check before anything is written."""
    image_path = converted / str(row.image)
    fov_full = binarize(read_raster(converted / str(row.fov)))
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
    meta = {
        "height": int(fov.shape[0]),
        "width": int(fov.shape[1]),
        "full_height": int(fov_full.shape[0]),
        "full_width": int(fov_full.shape[1]),
    }
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


def read_labels(path: Path, n_labels: int) -> np.ndarray:
    """A converted mask as (H, W) uint8 labels: 0/1 for a binary data set (0/255 on disk),
    else the label values 0..n_labels-1 that convert wrote.

    Raises:
        MedsegError: a label outside the classes of ``classes.json``.
    """
    raw = read_raster(path)
    if n_labels == 2:
        return binarize(raw).astype(np.uint8)
    if raw.ndim != 2:
        raise MedsegError(f"{path}: a label map must have one channel, this one has {raw.shape[2]}")
    top = int(raw.max(initial=0))
    if top >= n_labels:
        raise MedsegError(
            f"{path}: label {top} but data.classes names {n_labels - 1} classes (labels 1.."
            f"{n_labels - 1}); rerun convert with the data.classes of this data set"
        )
    return raw.astype(np.uint8)


def save_record(cfg: PreprocessConfig, path: str | Path) -> None:
    """Write the preprocess params as JSON, for `load_record` (e.g. beside a model)."""
    write_json(path, dataclasses.asdict(cfg))


def load_record(path: str | Path) -> PreprocessConfig:
    """Read the preprocess params written by the preprocess stage (``preprocess.json``).

    Raises:
        MedsegError: the file is missing, not JSON, or does not hold valid preprocess params.
    """
    path = Path(path)
    raw = read_json(path, "preprocess record")
    return parse(PreprocessConfig, raw, prefix="preprocess.", source=str(path))
