"""The fingerprint of a data set: what its training cases are like, read one case at a time.

`fingerprint` reads the converted **training** cases (the manifest's split column chooses them;
no test file is opened): sizes, channels, intensities inside the FOV and the foreground, how well
each channel and the colour separate foreground from background, the foreground's share, and
the objects' shapes from connected components and a distance transform (extent, area, local
thickness on the medial axis; the same for the background between objects, whose thin walls are
the detail of a dense tissue). `medseg.planning.plan.structure` says from it whether the
objects are thin (tubular), dense or compact; `thin_labels` applies the thin rule to label maps
(the evaluate stage uses it to leave thin structures without lesion counts). The rules that turn
a fingerprint into settings are `medseg.planning.plan`'s.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from scipy import ndimage

from medseg.convert.fov import FOV_LABEL_TOLERANCE
from medseg.errors import MedsegError
from medseg.io.images import binarize, read_labels, read_raster
from medseg.io.volumes import is_volume_row, open_volume
from medseg.preprocess.processed import read_class_names
from medseg.progress import progress

# -- limits: memory stays that of one case whatever the data set's size --
MIN_TRAIN_CASES = 2
SAMPLE_PIXELS = 200_000  # intensity samples kept over the whole data set, per kind (FOV, fg, bg)
SHAPE_PIXELS = 1 << 22  # a mask larger than this is analysed at an integer stride (lengths scaled)
MAX_CASES = 200  # cases read at most (a seeded choice beyond); sizes come from every row
VOLUME_SLICES = 4  # slices of a volume read (among those with foreground), plus the middle one
DARK = 0.1  # share of full scale below which a pixel is "dark" (convert.fov_threshold's default)
ELONGATED = 20.0  # area / thickness^2 above this: thin (tubular), e.g. a vessel tree (disc: 0.8)
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_EIGHT = ndimage.generate_binary_structure(2, 2)


# == fingerprint ================================================================================


def fingerprint(
    converted_dir: str | Path,
    manifest: pd.DataFrame | None = None,
    *,
    seed: int = 0,
    sample_pixels: int = SAMPLE_PIXELS,
    max_cases: int = MAX_CASES,
) -> dict[str, Any]:
    """The fingerprint of a converted data set's training cases.

    Reads the rows whose ``split`` is ``train`` only (images, masks, FOV masks), one case at a
    time: no test file is opened. At most ``max_cases`` cases are read (a seeded choice among
    more; the sizes come from every row's ``height`` and ``width``), and pixel samples are drawn
    with a generator seeded by ``seed``, at most ``sample_pixels`` per kind over the whole set,
    so the result is deterministic and memory and time stay bounded whatever the set's size.

    Args:
        converted_dir: the convert stage's output (PNGs, ``manifest.csv``, ``classes.json``).
        manifest: its manifest (default: read from ``converted_dir/manifest.csv``).
        seed: seed of the pixel samples.
        sample_pixels: samples kept per kind (FOV, foreground, background).
        max_cases: cases read at most.

    Returns:
        A JSON-ready dict; its keys are described in ``docs/plan.md``.

    Raises:
        MedsegError: no manifest, fewer than `MIN_TRAIN_CASES` training cases, or no foreground
            in any training mask.
    """
    converted = Path(converted_dir)
    manifest_path = converted / "manifest.csv"
    if manifest is None:
        if not manifest_path.is_file():
            raise MedsegError(f"{manifest_path}: no manifest; run the convert stage first")
        manifest = pd.read_csv(manifest_path, dtype=str, keep_default_na=False)
    if "split" not in manifest.columns:
        raise MedsegError(f"{manifest_path}: the manifest has no split column")
    rows = manifest[manifest["split"] == "train"]
    if len(rows) < MIN_TRAIN_CASES:
        raise MedsegError(
            f"{manifest_path}: {len(rows)} training case(s); the plan needs at least "
            f"{MIN_TRAIN_CASES} to fingerprint the data set (add training cases, or set every "
            "planned param explicitly)"
        )
    names = read_class_names(converted)
    rng = np.random.default_rng(seed)
    read = rows
    if len(rows) > max_cases:
        read = rows.iloc[np.sort(rng.choice(len(rows), max_cases, replace=False))]
    acc = _Accumulator(len(names), max(16, sample_pixels // len(read)), rng)
    for row in progress(read.itertuples(index=False), total=len(read), desc="fingerprint"):
        acc.add(converted, row)
    if not any(acc.fg_pixels[1:]):
        raise MedsegError(
            f"{converted / 'masks'}: no foreground in any of the {len(read)} training masks; "
            "check the masks (and data.classes), the plan cannot size objects it cannot see"
        )
    return acc.result(names, rows)


def _groups(rows: pd.DataFrame) -> int:
    """The distinct groups (patients) of the training cases: the manifest's ``group`` column
    (a manifest of an earlier version: its source files)."""
    for column in ("group", "source"):
        if column in rows.columns:
            return int(rows[column].nunique())
    return len(rows)


class _Accumulator:
    """What the fingerprint keeps while it streams the cases: counts, bounded samples."""

    def __init__(self, n_labels: int, per_case: int, rng: np.random.Generator) -> None:
        self.n_labels, self.per_case, self.rng = n_labels, per_case, rng
        self.sizes: list[tuple[int, int]] = []
        self.channels: list[int] = []
        self.bit_depths: list[int] = []
        self.grey_rgb = 0  # colour files whose three channels are equal
        self.fov_pixels = 0
        self.image_pixels = 0
        self.fg_pixels = np.zeros(n_labels, np.int64)
        self.case_fg_share: list[float] = []
        self.fov_samples: list[np.ndarray] = []  # (n, C) raw share of full scale
        self.fg_samples: list[np.ndarray] = []
        self.fg_norm: list[np.ndarray] = []  # (n, 4): r, g, b, luma normalised in the FOV
        self.bg_norm: list[np.ndarray] = []
        self.border_dark: list[float] = []
        self.fg_dark = 0
        self.shapes = [_ShapeStats() for _ in range(n_labels)]  # 0: the background between
        self.strides: list[int] = []
        self.cases_read = 0

    def add(self, converted: Path, row: Any) -> None:
        self.cases_read += 1
        if is_volume_row(row):
            self._add_volume(converted, row)
            return
        image = read_raster(converted / str(row.image))
        truth = read_labels(converted / str(row.mask), self.n_labels)
        fov = binarize(read_raster(converted / str(row.fov)))
        for what, arr in (("mask", truth), ("FOV mask", fov)):
            if arr.shape != image.shape[:2]:
                raise MedsegError(
                    f"{converted / str(row.mask if what == 'mask' else row.fov)}: {what} is "
                    f"{arr.shape[1]}x{arr.shape[0]}, its image {image.shape[1]}x{image.shape[0]}"
                )
        self.bit_depths.append(16 if image.dtype == np.uint16 else 8)
        x = image.astype(np.float32) / (65535.0 if image.dtype == np.uint16 else 255.0)
        self._add_image(x, truth, fov)

    def _add_volume(self, converted: Path, row: Any) -> None:
        """A volume counts as one case, seen through a few of its slices (`VOLUME_SLICES`,
        spread over those with foreground, and one more), its intensities scaled to [0, 1] by
        the volume's own range; a volume is calibrated data (16 bit, like CT and MR DICOM)."""
        image, labels = open_volume(converted, row)
        has_fg = np.flatnonzero(labels.reshape(len(labels), -1).max(axis=1) > 0)
        pool = has_fg if len(has_fg) else np.arange(len(labels))
        chosen = pool[np.linspace(0, len(pool) - 1, min(VOLUME_SLICES, len(pool))).astype(int)]
        chosen = np.unique(np.append(chosen, len(labels) // 2))
        lo, hi = float(np.min(image)), float(np.max(image))
        self.bit_depths.append(16)
        for z in chosen:
            x = (np.asarray(image[:, z], dtype=np.float32) - lo) / max(hi - lo, 1e-6)
            x = np.moveaxis(x, 0, -1)  # (H, W, C)
            truth = np.asarray(labels[z])
            self._add_image(x[..., 0] if x.shape[2] != 3 else x, truth, np.ones(truth.shape, bool))

    def _add_image(self, x: np.ndarray, truth: np.ndarray, fov: np.ndarray) -> None:
        """One 2D image: (H, W) or (H, W, C) float32 in [0, 1], its labels and FOV."""
        h, w = x.shape[:2]
        self.sizes.append((h, w))
        self.channels.append(1 if x.ndim == 2 else x.shape[2])
        if x.ndim == 2:
            x = x[..., None]
        if (
            x.shape[2] == 3
            and np.array_equal(x[..., 0], x[..., 1])
            and np.array_equal(x[..., 1], x[..., 2])
        ):
            self.grey_rgb += 1
        fov_n = int(fov.sum())
        self.fov_pixels += fov_n
        self.image_pixels += h * w
        fg = (truth > 0) & fov
        self.fg_pixels += np.bincount(truth[fov].ravel(), minlength=self.n_labels)[: self.n_labels]
        self.case_fg_share.append(float(fg.sum()) / max(fov_n, 1))
        thickness = self._shapes(truth, fov)
        self._intensities(x, fov, fg, thickness)
        self._surround(x, fg)

    def _sample(self, values: np.ndarray) -> np.ndarray:
        if len(values) <= self.per_case:
            return values
        return values[np.sort(self.rng.choice(len(values), self.per_case, replace=False))]

    def _intensities(
        self, x: np.ndarray, fov: np.ndarray, fg: np.ndarray, thickness: float
    ) -> None:
        inside = x[fov]  # (n, C)
        self.fov_samples.append(self._sample(inside))
        if fg.any():
            self.fg_samples.append(self._sample(x[fg]))
        grey = x @ _LUMA if x.shape[2] == 3 else x[..., 0]
        planes = [x[..., c] for c in range(x.shape[2])] if x.shape[2] == 3 else [x[..., 0]] * 3
        stack = np.stack([*planes, grey], axis=-1)  # (H, W, 4): r, g, b, luma
        # local contrast: the background estimated at twice the objects' thickness is taken
        # off, so that slow illumination shared by the channels does not count as colour
        stack = stack - _blur(stack, max(2.0, 2.0 * thickness))
        # the network sees each channel normalised inside the FOV (preprocess): so do we
        mean = stack[fov].mean(axis=0)
        std = stack[fov].std(axis=0)
        norm = (stack - mean) / np.where(std > 1e-6, std, 1.0)
        bg = fov & ~fg
        if fg.any() and bg.any():
            self.fg_norm.append(self._sample(norm[fg]))
            self.bg_norm.append(self._sample(norm[bg]))

    def _surround(self, x: np.ndarray, fg: np.ndarray) -> None:
        bright = x.max(axis=2)
        b = max(2, round(0.02 * min(bright.shape)))
        border = np.concatenate(
            [bright[:b].ravel(), bright[-b:].ravel(), bright[:, :b].ravel(), bright[:, -b:].ravel()]
        )
        self.border_dark.append(float((border <= DARK).mean()))
        self.fg_dark += int((bright[fg] <= DARK).sum())

    def _shapes(self, truth: np.ndarray, fov: np.ndarray) -> float:
        """Add the case's shapes; return its thinnest class's median thickness (px)."""
        stride = max(1, math.ceil(math.sqrt(truth.size / SHAPE_PIXELS)))
        self.strides.append(stride)
        if stride > 1:
            truth, fov = truth[::stride, ::stride], fov[::stride, ::stride]
        thinnest = math.inf
        for k in range(self.n_labels):
            mask = (truth > 0) & fov if k == 0 else (truth == k) & fov
            if k == 0:
                mask = fov & ~mask  # the background between the objects, inside the FOV
            t = self.shapes[k].add(mask, stride, self.per_case, self.rng)
            if k > 0 and t is not None:
                thinnest = min(thinnest, t)
        return thinnest if math.isfinite(thinnest) else float(max(truth.shape))

    def result(self, names: list[str], rows: pd.DataFrame) -> dict[str, Any]:
        sizes = np.array(self.sizes)
        if {"height", "width"} <= set(rows.columns):  # every row's, not only those read
            known = (
                pd.to_numeric(rows["height"], errors="coerce").notna()
                & pd.to_numeric(rows["width"], errors="coerce").notna()
            )
            if known.all():
                sizes = rows[["height", "width"]].astype(int).to_numpy()
        longer = sizes.max(axis=1)
        fg_total = int(self.fg_pixels[1:].sum())
        out: dict[str, Any] = {
            "cases": len(rows),
            "groups": _groups(rows),
            "cases_read": self.cases_read,
            "classes": names,
            "size": {
                "height_median": as_number(np.median(sizes[:, 0])),
                "width_median": as_number(np.median(sizes[:, 1])),
                "longer_side_median": as_number(np.median(longer)),
                "longer_side_min": int(longer.min()),
                "longer_side_max": int(longer.max()),
                "pixels": int(sizes.prod(axis=1).sum()),
            },
            "channels": sorted(set(self.channels)),
            "grey_as_rgb_cases": self.grey_rgb,
            "bit_depths": sorted(set(self.bit_depths)),
            "source_formats": _counts(rows, "source_format"),
            "modality": _counts(rows, "modality") or None,
            "fov_sources": _counts(rows, "fov_source"),
            "fov_cut_cases": _fov_cut_cases(rows),
            "fov_share": as_number(self.fov_pixels / max(self.image_pixels, 1)),
            "foreground_share": as_number(fg_total / max(self.fov_pixels, 1)),
            "foreground_share_case_median": as_number(np.median(self.case_fg_share)),
            "class_share": {
                names[k]: as_number(self.fg_pixels[k] / max(self.fov_pixels, 1))
                for k in range(1, len(names))
            },
            "intensity": {
                "fov": _intensity(self.fov_samples),
                "foreground": _intensity(self.fg_samples),
            },
            "separability": _separability(self.fg_norm, self.bg_norm),
            "border_dark_share": as_number(np.median(self.border_dark)),
            "foreground_dark_share": as_number(self.fg_dark / max(fg_total, 1)),
            "shape_stride_max": max(self.strides),
            "shapes": {
                ("background" if k == 0 else names[k]): self.shapes[k].summary(k == 0)
                for k in range(len(names))
            },
        }
        return out


class _ShapeStats:
    """Connected components and medial-axis thickness of one class, pooled over the cases."""

    def __init__(self) -> None:
        self.areas: list[np.ndarray] = []
        self.extents: list[np.ndarray] = []
        self.comp_thickness: list[np.ndarray] = []
        self.components: list[int] = []
        self.thickness: list[np.ndarray] = []
        self.holes = 0
        self.pixels = 0

    def add(
        self, mask: np.ndarray, stride: int, per_case: int, rng: np.random.Generator
    ) -> float | None:
        """Add one case's mask (at ``stride``); return its median thickness (None: empty)."""
        from skimage.morphology import skeletonize  # here: only the fingerprint needs it

        labels, n = ndimage.label(mask, structure=_EIGHT)
        self.components.append(n)
        if n == 0:
            return None
        area = np.bincount(labels.ravel())[1:] * stride**2
        boxes = ndimage.find_objects(labels)
        extent = np.array([max(s[0].stop - s[0].start, s[1].stop - s[1].start) for s in boxes])
        skeleton = skeletonize(mask)
        dist = ndimage.distance_transform_edt(mask)
        local = 2.0 * dist[skeleton] * stride  # local thickness: twice the distance to the rim
        on_skel = labels[skeleton]
        comp = ndimage.median(local, on_skel, np.arange(1, n + 1)) if local.size else None
        comp_t = np.asarray(comp if comp is not None else np.zeros(n), dtype=np.float64)
        self.areas.append(area.astype(np.float64))
        self.extents.append(extent.astype(np.float64) * stride)
        self.comp_thickness.append(np.nan_to_num(comp_t, nan=float(stride)))
        median = float(np.median(local)) if local.size else float(stride)
        if local.size > per_case:
            local = local[np.sort(rng.choice(local.size, per_case, replace=False))]
        self.thickness.append(local)
        self.holes += int((ndimage.binary_fill_holes(mask) & ~mask).sum()) * stride**2
        self.pixels += int(mask.sum()) * stride**2
        return median

    def summary(self, background: bool) -> dict[str, Any]:
        if not self.areas:
            return {"components_case_median": 0.0, "present_cases": 0}
        areas = np.concatenate(self.areas)
        extents = np.concatenate(self.extents)
        thick = np.concatenate(self.thickness) if self.thickness else np.zeros(1)
        comp_t = np.concatenate(self.comp_thickness)
        present = [c for c in self.components if c > 0]
        out: dict[str, Any] = {
            "present_cases": len(present),
            "components_case_median": as_number(np.median(self.components)),
            "one_component_share": as_number(np.mean([c == 1 for c in present])),
            "area_median": as_number(np.median(areas)),
            "area_p05": as_number(np.percentile(areas, 5)),
            "extent_median": as_number(np.median(extents)),
            # what a typical pixel belongs to: specks do not drag it down
            "extent_pixel_median": as_number(_weighted_median(extents, areas)),
            "equivalent_diameter_pixel_median": as_number(
                _weighted_median(2.0 * np.sqrt(areas / math.pi), areas)
            ),
            "thickness_median": as_number(np.median(thick)),
            "thickness_p90": as_number(np.percentile(thick, 90)),
            "elongation_pixel_median": as_number(
                _weighted_median(areas / np.maximum(comp_t, 1.0) ** 2, areas)
            ),
            "hole_share": as_number(self.holes / max(self.pixels, 1)),
        }
        if background:  # only its thickness and count mean something
            keep = ("present_cases", "components_case_median", "thickness_median", "thickness_p90")
            out = {k: out[k] for k in keep}
        return out


def _blur(stack: np.ndarray, sigma: float) -> np.ndarray:
    """A Gaussian blur of each plane of (H, W, C) at ``sigma`` px; a wide one is computed on a
    block-averaged copy (the cost stays that of a sigma of a few pixels)."""
    h, w = stack.shape[:2]
    if sigma >= 0.5 * min(h, w):  # wider than the image: its mean is the background
        return np.broadcast_to(stack.reshape(-1, stack.shape[2]).mean(axis=0), stack.shape)
    f = max(1, int(sigma // 4))
    if f == 1:
        return np.asarray(ndimage.gaussian_filter(stack, (sigma, sigma, 0)))
    hh, ww = h // f * f, w // f * f
    small = stack[:hh, :ww].reshape(hh // f, f, ww // f, f, -1).mean(axis=(1, 3))
    small = ndimage.gaussian_filter(small, (sigma / f, sigma / f, 0))
    big = np.repeat(np.repeat(small, f, axis=0), f, axis=1)
    return np.pad(big, ((0, h - hh), (0, w - ww), (0, 0)), mode="edge")


def _weighted_median(values: np.ndarray, weights: np.ndarray) -> float:
    order = np.argsort(values, kind="stable")
    cum = np.cumsum(weights[order])
    return float(values[order][np.searchsorted(cum, 0.5 * cum[-1])])


def _intensity(samples: list[np.ndarray]) -> dict[str, list[float]] | None:
    """Per channel (share of full scale): mean, std, 0.5th, 50th and 99.5th percentiles."""
    if not samples:
        return None
    width = max(s.shape[1] for s in samples)
    values = np.concatenate([s for s in samples if s.shape[1] == width])
    return {
        "mean": [as_number(v) for v in values.mean(axis=0)],
        "std": [as_number(v) for v in values.std(axis=0)],
        "p00_5": [as_number(v) for v in np.percentile(values, 0.5, axis=0)],
        "p50": [as_number(v) for v in np.percentile(values, 50, axis=0)],
        "p99_5": [as_number(v) for v in np.percentile(values, 99.5, axis=0)],
    }


def _separability(fg: list[np.ndarray], bg: list[np.ndarray]) -> dict[str, float] | None:
    """How far apart foreground and background lie, in pooled standard deviations (Fisher's
    d'), for each input the network could get: the red, green, blue and grey (luma) channel
    alone, and the best linear mix of the three colours (``rgb``, Fisher's discriminant)."""
    if not fg:
        return None
    f, b = np.concatenate(fg).astype(np.float64), np.concatenate(bg).astype(np.float64)
    out = {}
    for i, name in enumerate(("red", "green", "blue", "gray")):
        pooled = math.sqrt(0.5 * (f[:, i].var() + b[:, i].var()))
        out[name] = as_number(abs(f[:, i].mean() - b[:, i].mean()) / max(pooled, 1e-6))
    delta = f[:, :3].mean(axis=0) - b[:, :3].mean(axis=0)
    within = 0.5 * (np.cov(f[:, :3].T) + np.cov(b[:, :3].T)) + 1e-6 * np.eye(3)
    out["rgb"] = as_number(math.sqrt(max(float(delta @ np.linalg.solve(within, delta)), 0.0)))
    return out


def _fov_cut_cases(rows: pd.DataFrame) -> int:
    """Training cases whose FOV, made by threshold, leaves out labels (`medseg.convert.fov`)."""
    if "fov_cut" not in rows.columns:
        return 0
    return int((pd.to_numeric(rows["fov_cut"], errors="coerce") > FOV_LABEL_TOLERANCE).sum())


def _counts(rows: pd.DataFrame, column: str) -> dict[str, int]:
    if column not in rows.columns:
        return {}
    values = rows[column].astype(str).replace("", "unknown")
    return {str(k): int(v) for k, v in sorted(values.value_counts().items())}


def as_number(value: Any) -> float:
    """A JSON-stable float: 4 significant digits (the plan depends on it, not on noise)."""
    v = float(value)
    return float(f"{v:.4g}") if math.isfinite(v) else 0.0


def thin_labels(masks: Iterable[np.ndarray], labels: Sequence[int]) -> set[int]:
    """The labels that form thin (tubular) structures in these label maps, by the fingerprint's
    rule: a class whose pixel-weighted median component area / thickness^2 exceeds `ELONGATED`
    (a vessel tree, not an organ or a lesion).

    Args:
        masks: (H, W) integer label maps, e.g. the training cases' (never the test cases').
        labels: the foreground labels to judge.
    """
    stats = {k: _ShapeStats() for k in labels}
    rng = np.random.default_rng(0)
    for mask in masks:
        for k, shape in stats.items():
            shape.add(mask == k, 1, 10_000, rng)
    thin = set()
    for k, shape in stats.items():
        summary = shape.summary(background=False)
        if summary.get("present_cases") and summary["elongation_pixel_median"] > ELONGATED:
            thin.add(k)
    return thin
