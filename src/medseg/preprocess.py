"""Model-ready arrays: channel choice, FOV-aware normalisation, padding and the train/val split."""

from __future__ import annotations

import dataclasses
import json
import logging
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
from skimage import exposure

from medseg.config import CONVERT_RECORD, PreprocessConfig, parse
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_dir, write_json
from medseg.io.images import binarize, read_raster

log = logging.getLogger(__name__)

SPLITS = ("train", "val", "test")
RECORD = "preprocess.json"  # the preprocess params, for `medseg predict` on new images
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


@dataclass(frozen=True)
class SplitArrays:
    """One split's cases, padded to a common size.

    Attributes:
        images: (N, 1, H, W) float32, zero mean and unit variance inside the FOV, 0 outside
            it and in the padding.
        masks: (N, H, W) uint8 ground truth, 0/1.
        fov: (N, H, W) uint8 field of view, 0/1 (0 in the padding).
        shapes: (N, 2) int64 original (height, width) of each case; the data sits top-left.
        case_ids: (N,) str.
        masks2: (N, H, W) uint8 second observer's truth, 0/1, or None when no case has one
            (the manifest's optional ``mask2`` column, e.g. DRIVE ``2nd_manual``).
        has_mask2: (N,) bool, which cases have a second observer; None with ``masks2``.
    """

    images: np.ndarray
    masks: np.ndarray
    fov: np.ndarray
    shapes: np.ndarray
    case_ids: np.ndarray
    masks2: np.ndarray | None = None
    has_mask2: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.case_ids)

    def cases(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        """Each case cropped back to its original size.

        Yields:
            case id; image (C, h, w) float32; mask (h, w) bool; FOV (h, w) bool.
        """
        for case_id, image, mask, fov, (h, w) in zip(
            self.case_ids, self.images, self.masks, self.fov, self.shapes, strict=True
        ):
            yield (
                str(case_id),
                crop_to(image, h, w),
                crop_to(mask, h, w) > 0,
                crop_to(fov, h, w) > 0,
            )

    def second_observer(self) -> Iterator[tuple[str, np.ndarray, np.ndarray, np.ndarray]]:
        """The cases that have a second observer, cropped back to their size.

        Yields:
            case id; first observer's mask (h, w) uint8 labels; second observer's (h, w) uint8
            labels; FOV (h, w) bool.
        """
        if self.masks2 is None or self.has_mask2 is None:
            return
        for i in np.flatnonzero(self.has_mask2):
            h, w = self.shapes[i]
            yield (
                str(self.case_ids[i]),
                crop_to(self.masks[i], h, w),
                crop_to(self.masks2[i], h, w),
                crop_to(self.fov[i], h, w) > 0,
            )


def select_channel(image: np.ndarray, channel: str) -> np.ndarray:
    """One channel of an image as float32 in [0, 1].

    Args:
        image: (H, W) or (H, W, 3), uint8 or uint16.
        channel: ``green`` (the vessel-contrast channel of a fundus photograph; a grey image is
            used as it is) or ``gray`` (luma of an RGB image).

    Returns:
        (H, W) float32.
    """
    scale = 65535.0 if image.dtype == np.uint16 else 255.0
    x = image.astype(np.float32) / scale
    if x.ndim == 2:
        return x
    if channel == "green":
        return np.ascontiguousarray(x[..., 1])
    return x @ _LUMA


def normalize_in_fov(x: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance using only FOV pixels; pixels outside the FOV become 0.

    Args:
        x: (H, W) float32 image.
        fov: (H, W) bool field of view (at least one pixel).

    Returns:
        (H, W) float32. A constant FOV gives zeros, never NaN.
    """
    inside = x[fov]
    std = float(inside.std())
    out = (x - float(inside.mean())) / (std if std > 1e-6 else 1.0)
    out[~fov] = 0.0
    return out.astype(np.float32)


def prepare_image(image: np.ndarray, fov: np.ndarray, cfg: PreprocessConfig) -> np.ndarray:
    """The model input for one image: the same steps for the pipeline and ``medseg predict``.

    Args:
        image: (H, W) or (H, W, 3) uint8 or uint16, as the readers of `medseg.io` return it.
        fov: (H, W) bool field of view (at least one pixel).
        cfg: the preprocess params the model was trained with.

    Returns:
        (1, H, W) float32, unpadded.
    """
    x = select_channel(image, cfg.channel)
    if cfg.contrast == "clahe":
        x = clahe(x, cfg.clahe_clip, cfg.clahe_tiles)
    return normalize_in_fov(x, fov)[None]


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


def padded_size(height: int, width: int, multiple: int) -> tuple[int, int]:
    """The smallest (height, width) at least as large, each a multiple of ``multiple``."""
    return -(-height // multiple) * multiple, -(-width // multiple) * multiple


def pad_to(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Zero-pad the last two axes of ``x`` at the bottom and right to (height, width)."""
    pad = [(0, 0)] * (x.ndim - 2) + [(0, height - x.shape[-2]), (0, width - x.shape[-1])]
    return np.pad(x, pad)


def crop_to(x: np.ndarray, height: int, width: int) -> np.ndarray:
    """Undo `pad_to`: keep the top-left (height, width) of the last two axes."""
    return x[..., :height, :width]


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
    group_of = groups or {cid: cid for cid in train_ids}
    keys = sorted({group_of[cid] for cid in train_ids})
    n_val = round(val_fraction * len(keys))
    if val_fraction > 0 and len(keys) >= 2:
        n_val = max(n_val, 1)
    n_val = min(n_val, len(keys) - 1)
    chosen = set(np.random.default_rng(seed).permutation(keys)[:n_val].tolist())
    return {cid for cid in train_ids if group_of[cid] in chosen}


def preprocess_dataset(cfg: PreprocessConfig, converted: str | Path, out: str | Path) -> dict:
    """Turn the converted PNGs + manifest into ``out/{train,val,test}.npz``, ``split.csv``,
    ``stats.json`` and ``preprocess.json`` (``cfg``, for `load_record`).

    Each npz holds the fields of `SplitArrays`. All splits share one padded size (the largest
    image rounded up to ``cfg.pad_multiple``), so one array per split holds every case; images are
    never resized, which would erase thin vessels. A manifest column ``mask2`` (optional; empty
    where a case has none) adds the second observer's masks as ``masks2`` and ``has_mask2``.

    Returns:
        The statistics written to ``stats.json``.
    """
    converted = Path(converted)
    manifest_path = converted / "manifest.csv"
    if not manifest_path.is_file():
        raise MedsegError(f"{manifest_path}: no manifest; run the convert stage first")
    manifest = pd.read_csv(manifest_path, dtype={"case_id": str})
    train_ids = manifest.loc[manifest["split"] == "train", "case_id"].tolist()
    if not train_ids:
        raise MedsegError(f"{manifest_path}: no training cases (split == 'train')")
    if not (manifest["split"] == "test").any():
        raise MedsegError(f"{manifest_path}: no test cases (split == 'test')")
    val_ids = split_cases(train_ids, cfg.val_fraction, cfg.seed, _source_groups(manifest))
    manifest["split"] = [
        "val" if cid in val_ids else split
        for cid, split in zip(manifest["case_id"], manifest["split"], strict=True)
    ]
    height, width = padded_size(
        int(manifest["height"].max()), int(manifest["width"].max()), cfg.pad_multiple
    )
    stats: dict = {"padded_height": height, "padded_width": width, "channel": cfg.channel}
    with atomic_dir(out) as tmp:
        for split in SPLITS:
            rows = manifest[manifest["split"] == split]
            arrays = _load_split(rows, converted, cfg, height, width)
            fields = {k: v for k, v in arrays.__dict__.items() if v is not None}
            np.savez(tmp / f"{split}.npz", **fields)
            fg = arrays.masks[arrays.fov.astype(bool)]
            stats[split] = {
                "cases": len(arrays),
                "foreground_fraction_in_fov": round(float(fg.mean()), 4) if fg.size else None,
            }
        manifest[["case_id", "split"]].to_csv(tmp / "split.csv", index=False)
        write_json(tmp / "stats.json", stats)
        save_record(cfg, tmp / RECORD)
        if (converted / CONVERT_RECORD).is_file():  # passed on to the model, for predict
            shutil.copyfile(converted / CONVERT_RECORD, tmp / CONVERT_RECORD)
    log.info("preprocessed %d cases to %dx%d", len(manifest), height, width)
    return stats


def _source_groups(manifest: pd.DataFrame) -> dict[str, str] | None:
    """Case id -> source file, where some file gave several cases (frames); else None."""
    if "source" not in manifest.columns or not manifest["source"].duplicated().any():
        return None
    return dict(zip(manifest["case_id"], manifest["source"].astype(str), strict=True))


def _load_split(
    rows: pd.DataFrame, converted: Path, cfg: PreprocessConfig, height: int, width: int
) -> SplitArrays:
    n = len(rows)
    images = np.zeros((n, 1, height, width), dtype=np.float32)
    masks = np.zeros((n, height, width), dtype=np.uint8)
    fovs = np.zeros((n, height, width), dtype=np.uint8)
    shapes = np.zeros((n, 2), dtype=np.int64)
    second = _second_masks(rows)
    masks2 = np.zeros((n, height, width), dtype=np.uint8) if second.any() else None
    for i, row in enumerate(rows.itertuples(index=False)):
        fov = binarize(read_raster(converted / str(row.fov)))
        h, w = fov.shape
        images[i, :, :h, :w] = prepare_image(read_raster(converted / str(row.image)), fov, cfg)
        masks[i, :h, :w] = binarize(read_raster(converted / str(row.mask)))
        if masks2 is not None and second[i]:
            mask2 = binarize(read_raster(converted / str(row.mask2)))
            if mask2.shape != (h, w):
                raise MedsegError(
                    f"{converted / str(row.mask2)}: second observer's mask is "
                    f"{mask2.shape[1]}x{mask2.shape[0]}, its image {w}x{h}; they must match"
                )
            masks2[i, :h, :w] = mask2
        fovs[i, :h, :w] = fov
        shapes[i] = (h, w)
    ids = np.array(rows["case_id"].tolist(), dtype=str)
    if masks2 is None:
        return SplitArrays(images, masks, fovs, shapes, ids)
    return SplitArrays(images, masks, fovs, shapes, ids, masks2, second)


def _second_masks(rows: pd.DataFrame) -> np.ndarray:
    """(N,) bool: which rows name a second observer's mask (optional manifest column ``mask2``,
    empty where a case has none)."""
    if "mask2" not in rows.columns:
        return np.zeros(len(rows), dtype=bool)
    names = rows["mask2"]
    return (names.notna() & (names.astype(str).str.strip() != "")).to_numpy()


def load_split(path: str | Path) -> SplitArrays:
    """Read one ``<split>.npz`` written by `preprocess_dataset`."""
    path = Path(path)
    if not path.is_file():
        raise MedsegError(f"{path}: missing; run the preprocess stage first")
    with np.load(path, allow_pickle=False) as z:
        return SplitArrays(**{k: z[k] for k in z.files})


def save_record(cfg: PreprocessConfig, path: str | Path) -> None:
    """Write the preprocess params as JSON, for `load_record` (e.g. beside a model)."""
    write_json(path, dataclasses.asdict(cfg))


def load_record(path: str | Path) -> PreprocessConfig:
    """Read the preprocess params written by the preprocess stage (``preprocess.json``).

    Raises:
        MedsegError: the file is missing, not JSON, or does not hold valid preprocess params.
    """
    path = Path(path)
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except OSError as err:
        raise MedsegError(f"cannot read the preprocess record {path}: {err.strerror}") from err
    except json.JSONDecodeError as err:
        raise MedsegError(f"{path}: not a valid preprocess record ({err})") from err
    return parse(PreprocessConfig, raw, prefix="preprocess.", source=str(path))
