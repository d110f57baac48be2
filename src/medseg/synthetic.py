"""Procedural fundus-like images with vessel trees: the built-in demo data set.

Each case is drawn from its own generator seeded with ``(seed, case_index)``, so a case does not
change when the data set grows. The picture is built in physical steps:

1. a circular field of view (FOV) with a soft rim, slightly off-centre;
2. an optic disc on the nasal side and a macula (with an avascular fovea) on the temporal side;
3. vessel trees grown from the disc: four arcades plus small vessels, each a correlated random walk
   (tortuosity) whose width tapers from ``vessel_width_max`` to ``vessel_width_min`` and splits at
   branches by Murray's law (w_parent^3 = w_a^3 + w_b^3);
4. the trees drawn at twice the resolution and box-filtered down, giving anti-aliased coverage; the
   label is coverage >= 0.5 inside the FOV;
5. an orange-red background with vignetting, low-frequency illumination, choroidal texture, a few
   haemorrhage-like dark spots and exudate-like bright spots as distractors;
6. vessels absorb mostly in the green channel (less in blue, little in red), then optical blur and
   sensor noise.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image, ImageDraw
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from scipy import ndimage

from medseg.config import SynthesizeConfig

_SUPERSAMPLE = 2
# Ophthalmic Photography 8 Bit Image Storage: what a fundus camera writes.
OPHTHALMIC_PHOTOGRAPHY_8BIT = "1.2.840.10008.5.1.4.1.1.77.1.5.1"
# Fraction of vessel darkening seen in each channel (R, G, B): haemoglobin absorbs green most.
_VESSEL_ABSORPTION = np.array([0.22, 1.0, 0.65], dtype=np.float32)
_BACKGROUND_RGB = np.array([0.78, 0.40, 0.17], dtype=np.float32)


@dataclass(frozen=True)
class SyntheticCase:
    """One generated case.

    Attributes:
        image: (H, W, 3) uint8 RGB fundus-like photograph.
        vessels: (H, W) bool vessel label, False outside the FOV.
        fov: (H, W) bool field-of-view mask.
        disc: optic disc centre x, centre y and radius, in pixels.
    """

    image: np.ndarray
    vessels: np.ndarray
    fov: np.ndarray
    disc: tuple[float, float, float]


@dataclass
class _Segment:
    points: list[tuple[float, float]]  # (x, y) in output pixels
    widths: list[float]
    contrast: float


def generate_case(cfg: SynthesizeConfig, index: int) -> SyntheticCase:
    """Generate case ``index`` of the data set described by ``cfg``; deterministic in both."""
    rng = np.random.default_rng([cfg.seed, index])
    h, w = cfg.height, cfg.width
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)

    # 1. field of view
    radius = 0.47 * min(h, w)
    cy = h / 2 + rng.normal(0, 0.01 * h)
    cx = w / 2 + rng.normal(0, 0.01 * w)
    rho = np.hypot(yy - cy, xx - cx)
    fov_soft = np.clip(radius - rho + 0.5, 0.0, 1.0)
    fov = fov_soft >= 0.5

    # 2. optic disc and macula
    side = 1.0 if rng.random() < 0.5 else -1.0  # +1: disc on the right (a left eye)
    disc = (cx + side * 0.62 * radius, cy + rng.normal(0, 0.05 * radius))
    disc_r = radius * rng.uniform(0.12, 0.15)
    macula = (cx - side * 0.12 * radius, cy + rng.normal(0, 0.04 * radius))

    # 3-4. vessel trees, rendered
    segments = _grow_trees(rng, cfg, disc, disc_r, macula, (cx, cy), radius, side)
    coverage, darkness = _render(segments, h, w)
    vessels = (coverage >= 0.5) & fov

    # 5. background, illumination, anatomy, distractors
    brightness = rng.uniform(0.8, 1.1)
    illum = 1.0 - 0.55 * np.clip(rho / radius, 0, 1.2) ** 2.5
    illum += 0.18 * _smooth_field(rng, h, w, sigma=0.25 * radius)
    texture = 0.05 * _smooth_field(rng, h, w, sigma=2.5)
    disc_d = np.hypot(xx - disc[0], yy - disc[1]) / disc_r
    disc_glow = np.exp(-(disc_d**8)) + 0.5 * np.exp(-((disc_d / 0.45) ** 2))  # sharp rim
    mac_d = np.hypot(xx - macula[0], yy - macula[1]) / (0.28 * radius)
    mac_dark = 0.35 * np.exp(-(mac_d**2))

    img = np.empty((h, w, 3), dtype=np.float32)
    disc_colour = np.array([0.30, 0.45, 0.35], dtype=np.float32)
    for c in range(3):
        base = _BACKGROUND_RGB[c] * brightness * illum * (1.0 + texture * (1.0 if c < 2 else 0.3))
        base = base * (1.0 - mac_dark * (0.6 if c == 0 else 1.0))
        base = base + disc_colour[c] * disc_glow * illum
        img[..., c] = base * (1.0 - _VESSEL_ABSORPTION[c] * darkness)
    _add_spots(rng, img, fov, radius)

    # 6. optics and sensor
    img = ndimage.gaussian_filter(img, sigma=(0.8, 0.8, 0))
    img += rng.normal(0.0, cfg.noise, size=img.shape).astype(np.float32)
    img *= fov_soft[..., None]
    img += np.abs(rng.normal(0.0, 0.01, size=img.shape)).astype(np.float32)
    image = np.clip(img * 255.0 + 0.5, 0, 255).astype(np.uint8)
    return SyntheticCase(image=image, vessels=vessels, fov=fov, disc=(*disc, disc_r))


def _grow_trees(
    rng: np.random.Generator,
    cfg: SynthesizeConfig,
    disc: tuple[float, float],
    disc_r: float,
    macula: tuple[float, float],
    centre: tuple[float, float],
    radius: float,
    side: float,
) -> list[_Segment]:
    """The vessel segments of one eye: arcades from the disc, then branches, as a random walk.

    Long (past 60 lines) on purpose: one seeded procedure whose every draw from ``rng`` comes in
    a fixed order (the demo data set is reproduced bit for bit from its seed); split into
    helpers, the order of the draws would have to be kept by hand across them.
    """
    temporal = math.pi if side > 0 else 0.0  # direction from the disc towards the macula
    w_max, w_min = cfg.vessel_width_max, cfg.vessel_width_min
    # (initial heading, curvature bias towards the macula side, width factor)
    roots = [
        (temporal - 1.25, +0.0065, 1.0),
        (temporal + 1.25, -0.0065, 1.0),
        (temporal - 1.65 + rng.normal(0, 0.1), +0.005, 0.8),
        (temporal + 1.65 + rng.normal(0, 0.1), -0.005, 0.8),
        (temporal + math.pi - 0.7, 0.0, 0.75),
        (temporal + math.pi + 0.7, 0.0, 0.75),
        (temporal + math.pi + rng.normal(0, 0.2), 0.0, 0.55),
        (temporal - 0.35 + rng.normal(0, 0.1), 0.0, 0.45),
        (temporal + 0.35 + rng.normal(0, 0.1), 0.0, 0.45),
    ]
    roots += [(rng.uniform(0, 2 * math.pi), 0.0, 0.35) for _ in range(rng.integers(2, 5))]
    # a positive bias turns a root at temporal - angle towards the temporal side on either eye

    queue: list[tuple[float, float, float, float, float, float]] = []
    for heading, bias, factor in roots:
        start = (
            disc[0] + 0.3 * disc_r * math.cos(heading),
            disc[1] + 0.3 * disc_r * math.sin(heading),
        )
        width = max(w_min, w_max * factor * rng.uniform(0.8, 1.0))
        queue.append((start[0], start[1], heading, width, bias, rng.uniform(0.35, 0.6)))

    segments: list[_Segment] = []
    step = 1.5
    taper = (w_max - w_min) / (3.5 * radius)  # slow taper between branches
    fovea_r = 0.1 * radius
    while queue and len(segments) < 1200:
        x, y, heading, width, bias, contrast = queue.pop(0)
        points, widths = [(x, y)], [width]
        wiggle = 0.0  # mean-reverting deviation from the smooth course: tortuosity
        length = 0.0
        while width >= w_min and length < 3.0 * radius:
            wiggle = 0.97 * wiggle + rng.normal(0.0, 0.025)
            heading += bias * step + rng.normal(0.0, 0.006)
            x += step * math.cos(heading + wiggle)
            y += step * math.sin(heading + wiggle)
            length += step
            width -= taper * step
            if math.hypot(x - centre[0], y - centre[1]) > radius + 2:
                break
            if math.hypot(x - macula[0], y - macula[1]) < fovea_r:
                break
            points.append((x, y))
            widths.append(max(width, w_min))
            if width > 1.3 * w_min and rng.random() < step / (10.0 + 4.0 * width):
                child = width * rng.uniform(0.35, 0.75)
                width = max(w_min, (width**3 - child**3) ** (1 / 3))
                sign = 1.0 if rng.random() < 0.5 else -1.0
                queue.append(
                    (
                        x,
                        y,
                        heading + sign * rng.uniform(0.5, 1.3),
                        child,
                        0.0,
                        contrast * rng.uniform(0.85, 1.0),
                    )
                )
        if len(points) > 1:
            segments.append(_Segment(points, widths, contrast))
    return segments


def _render(segments: list[_Segment], h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """Draw segments at supersampled resolution; return (coverage, darkness) in [0, 1], (H, W)."""
    s = _SUPERSAMPLE
    cover = Image.new("L", (w * s, h * s), 0)
    dark = Image.new("L", (w * s, h * s), 0)
    dc, dd = ImageDraw.Draw(cover), ImageDraw.Draw(dark)
    # weak vessels first so that at crossings the darker one wins
    for seg in sorted(segments, key=lambda g: g.contrast):
        for (x0, y0), (x1, y1), wd in zip(seg.points, seg.points[1:], seg.widths[1:], strict=False):
            # thin vessels are fainter than their width alone explains, as capillaries are
            fill = round(255 * seg.contrast * min(1.0, 0.35 + 0.65 * wd / 4.0))
            px = wd * s
            line = [(x0 * s, y0 * s), (x1 * s, y1 * s)]
            dc.line(line, fill=255, width=max(1, round(px)))
            dd.line(line, fill=fill, width=max(1, round(px)))
            r = px / 2
            if r >= 1.0:
                box = [x1 * s - r, y1 * s - r, x1 * s + r, y1 * s + r]
                dc.ellipse(box, fill=255)
                dd.ellipse(box, fill=fill)
    coverage = np.asarray(cover.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
    darkness = np.asarray(dark.resize((w, h), Image.Resampling.BOX), dtype=np.float32) / 255.0
    return coverage, darkness


def _smooth_field(rng: np.random.Generator, h: int, w: int, sigma: float) -> np.ndarray:
    """Zero-mean, unit-peak smooth random field of shape (H, W)."""
    field = ndimage.gaussian_filter(rng.standard_normal((h, w)).astype(np.float32), sigma)
    field -= field.mean()
    peak = float(np.abs(field).max())
    return field / peak if peak > 0 else field


def _add_spots(rng: np.random.Generator, img: np.ndarray, fov: np.ndarray, radius: float) -> None:
    """Paint a few haemorrhage-like dark and exudate-like bright blobs into ``img`` in place."""
    h, w = fov.shape
    ys, xs = np.nonzero(fov)
    for _ in range(rng.integers(0, 7)):
        k = rng.integers(len(ys))
        r = rng.uniform(1.5, 0.012 * radius + 2.5)
        dark = rng.random() < 0.6
        y0, x0 = ys[k], xs[k]
        y_lo, y_hi = max(0, int(y0 - 3 * r)), min(h, int(y0 + 3 * r) + 1)
        x_lo, x_hi = max(0, int(x0 - 3 * r)), min(w, int(x0 + 3 * r) + 1)
        yy, xx = np.mgrid[y_lo:y_hi, x_lo:x_hi]
        blob = np.exp(-(((yy - y0) ** 2 + (xx - x0) ** 2) / (r * r)))[..., None]
        if dark:
            img[y_lo:y_hi, x_lo:x_hi] *= 1.0 - 0.5 * blob * _VESSEL_ABSORPTION
        else:
            img[y_lo:y_hi, x_lo:x_hi] += 0.25 * blob * np.array([0.8, 0.7, 0.2], dtype=np.float32)


def write_dataset(cfg: SynthesizeConfig, out: str | Path) -> int:
    """Write the synthetic data set in the DRIVE folder layout; return the number of cases.

    ``out/training`` and ``out/test`` each hold ``images/`` (TIFF, or DICOM for a seeded share of
    ``cfg.dicom_fraction`` of the cases), ``1st_manual/`` (GIF vessel masks, 0/255; with
    ``labels: vessels_disc`` label maps, see `label_map`) and ``mask/``
    (GIF FOV masks). Test cases are numbered from 01, training cases after them, as in DRIVE.
    """
    out = Path(out)
    splits = [("test", "test", range(cfg.n_test)), ("training", "training", range(cfg.n_train))]
    n_total = cfg.n_train + cfg.n_test
    order = np.random.default_rng([cfg.seed, 2**31]).permutation(n_total)
    dicom_ids = set(order[: round(cfg.dicom_fraction * n_total)].tolist())
    width = max(2, len(str(n_total)))
    index = 0
    for folder, suffix, cases in splits:
        for sub in ("images", "1st_manual", "mask"):
            (out / folder / sub).mkdir(parents=True, exist_ok=True)
        for _ in cases:
            case = generate_case(cfg, index)
            num = f"{index + 1:0{width}d}"
            images = out / folder / "images"
            if index in dicom_ids:
                write_rgb_dicom(images / f"{num}_{suffix}.dcm", case.image, f"{cfg.seed}-{num}")
            else:
                tifffile.imwrite(images / f"{num}_{suffix}.tif", case.image, photometric="rgb")
            if cfg.labels == "vessels_disc":
                _write_gif(out / folder / "1st_manual" / f"{num}_manual1.gif", label_map(case), 1)
            else:
                _write_gif(out / folder / "1st_manual" / f"{num}_manual1.gif", case.vessels)
            _write_gif(out / folder / "mask" / f"{num}_{suffix}_mask.gif", case.fov)
            index += 1
    return n_total


def label_map(case: SyntheticCase) -> np.ndarray:
    """(H, W) uint8 labels of a case for the multi-class variant: 2 optic disc (the whole disc,
    the vessels crossing it included, as disc segmentation sets label it), 1 vessel elsewhere,
    0 background."""
    h, w = case.fov.shape
    yy, xx = np.mgrid[:h, :w]
    cx, cy, r = case.disc
    labels = case.vessels.astype(np.uint8)
    labels[(np.hypot(xx - cx, yy - cy) <= r) & case.fov] = 2
    return labels


def _write_gif(path: Path, mask: np.ndarray, scale: int = 255) -> None:
    Image.fromarray(mask.astype(np.uint8) * scale).save(path, format="GIF")


def write_rgb_dicom(path: str | Path, image: np.ndarray, case_uid_seed: str) -> None:
    """Write an (H, W, 3) uint8 photograph as an uncompressed ophthalmic-photography DICOM.

    Used by the synthetic data set. Patient fields are fixed placeholders and UIDs are derived
    from ``case_uid_seed``, so the file's bytes are deterministic.
    """
    meta = FileMetaDataset()
    sop_uid = generate_uid(entropy_srcs=[case_uid_seed, "sop"])
    meta.MediaStorageSOPClassUID = UID(OPHTHALMIC_PHOTOGRAPHY_8BIT)
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = OPHTHALMIC_PHOTOGRAPHY_8BIT
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(entropy_srcs=[case_uid_seed, "study"])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=[case_uid_seed, "series"])
    ds.Modality = "OP"
    ds.PatientName = "SYNTHETIC^PHANTOM"
    ds.PatientID = "SYNTHETIC"
    ds.BurnedInAnnotation = "NO"
    ds.Rows, ds.Columns = int(image.shape[0]), int(image.shape[1])
    ds.SamplesPerPixel = 3
    ds.PhotometricInterpretation = "RGB"
    ds.PlanarConfiguration = 0
    ds.BitsAllocated = 8
    ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    ds.PixelData = np.ascontiguousarray(image, dtype=np.uint8).tobytes()
    ds.save_as(path, enforce_file_format=True)
