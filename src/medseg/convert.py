"""Conversion of a raw data set (any layout, DICOM/TIFF/PNG/GIF/JPEG) to lossless PNG + manifest."""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pandas as pd

from medseg.config import ConvertConfig, DataConfig
from medseg.errors import MedsegError
from medseg.io.atomic import atomic_dir
from medseg.io.images import binarize, read_image, source_format, write_png
from medseg.io.layouts import CaseFiles, find_cases

log = logging.getLogger(__name__)

MANIFEST_COLUMNS = [
    "case_id", "split", "image", "mask", "fov", "source", "source_format", "bit_depth",
    "channels", "height", "width", "fov_source",
]  # fmt: skip


def convert_dataset(data: DataConfig, cfg: ConvertConfig, out: str | Path) -> pd.DataFrame:
    """Convert every case under ``data.root`` into ``out``.

    Writes ``out/images/<case>.png`` (8 or 16 bit, grey or RGB), ``out/masks/<case>.png`` and
    ``out/fov/<case>.png`` (0/255), and ``out/manifest.csv`` (one row per case, columns
    `MANIFEST_COLUMNS`, paths relative to ``out``). ``out`` appears only when all cases converted.

    Returns:
        The manifest.
    """
    root = Path(data.root)
    cases = find_cases(root, data.layout)
    window = None
    if cfg.window_center is not None and cfg.window_width is not None:
        window = (cfg.window_center, cfg.window_width)
    with atomic_dir(out) as tmp:
        for sub in ("images", "masks", "fov"):
            (tmp / sub).mkdir()
        rows = [_convert_case(case, root, tmp, window) for case in cases]
        manifest = pd.DataFrame(rows, columns=MANIFEST_COLUMNS)
        manifest.to_csv(tmp / "manifest.csv", index=False)
    log.info("converted %d cases from %s", len(manifest), root)
    return manifest


def _convert_case(
    case: CaseFiles, root: Path, out: Path, window: tuple[float, float] | None
) -> dict[str, object]:
    image = read_image(case.image, window=window)
    mask = binarize(read_image(case.mask))
    if mask.shape != image.shape[:2]:
        raise MedsegError(
            f"{case.mask}: mask is {mask.shape[1]}x{mask.shape[0]} but its image {case.image.name} "
            f"is {image.shape[1]}x{image.shape[0]} (width x height); they must match"
        )
    if case.fov is not None:
        fov = binarize(read_image(case.fov))
        if fov.shape != image.shape[:2]:
            raise MedsegError(
                f"{case.fov}: FOV mask size {fov.shape[1]}x{fov.shape[0]} differs from its image "
                f"{case.image.name} ({image.shape[1]}x{image.shape[0]})"
            )
        fov_source = "given"
    else:
        fov = np.ones(image.shape[:2], dtype=bool)
        fov_source = "whole_image"
    if not fov.any():
        raise MedsegError(f"{case.fov}: the field-of-view mask is empty")
    names = {sub: f"{sub}/{case.case_id}.png" for sub in ("images", "masks", "fov")}
    write_png(out / names["images"], image)
    write_png(out / names["masks"], mask)
    write_png(out / names["fov"], fov)
    return {
        "case_id": case.case_id,
        "split": case.split,
        "image": names["images"],
        "mask": names["masks"],
        "fov": names["fov"],
        "source": case.image.relative_to(root).as_posix(),
        "source_format": source_format(case.image),
        "bit_depth": 16 if image.dtype == np.uint16 else 8,
        "channels": 1 if image.ndim == 2 else image.shape[2],
        "height": image.shape[0],
        "width": image.shape[1],
        "fov_source": fov_source,
    }
