"""What boundary and lesion metrics cost per case, against whole-image inference of that case.

Issue 20's target: HD95, ASSD and NSD add at most 20% to the evaluate stage, on DRIVE and on a
512x512 CT set. Per case this times, on one thread of its own:

- ``boundary``: `medseg.scoring.boundary.boundary_scores` (HD95, ASSD, NSD at 1 pixel), as the
evaluate
  stage would call it, and ``scipy EDT``: its boundaries and distances (no statistics) with
  scipy's ``distance_transform_edt`` instead of the ``edt`` package (the reason for that
  dependency);
- ``lesions``: `medseg.scoring.lesions.lesion_counts` (components, matching, PQ);
- ``inference``: `medseg.inference.predictor.Predictor.predict` with params.yaml's network
(untrained: the
  time does not depend on the weights) and evaluate settings, on an image of the case's size, with
  ``--threads`` threads (the evaluate stage's cost is this plus the pixel metrics and the
  outputs, so the ratio printed is an upper bound of the share of the stage).

Cases: the 20 DRIVE test vessel masks (565x584) inside their FOV, the prediction being the
second observer's annotation; the CHAOS CT liver slices of ``test/`` (512x512, no FOV), the
prediction being the truth shifted by (2, 3) pixels and eroded once. Prints a Markdown table.

    python bench/boundary_cost.py --drive ../shared/datasets/DRIVE --ct ../shared/datasets/CHAOS_CT3
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from harness import machine, rounds, table
from scipy import ndimage

from medseg.config import load_params
from medseg.config.sections import EvaluateConfig, TrainConfig
from medseg.inference.predictor import Predictor
from medseg.inference.runners import as_runner, prepare_model
from medseg.inference.window import WindowSettings
from medseg.io.images import binarize, read_raster
from medseg.labels import LabelSpace
from medseg.model import build_model
from medseg.scoring.boundary import boundary, boundary_scores
from medseg.scoring.lesions import lesion_counts
from medseg.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]
Case = tuple[np.ndarray, np.ndarray, np.ndarray | None]  # prediction, truth, FOV


def drive_cases(root: Path) -> list[Case]:
    """DRIVE test: (2nd observer, 1st observer, FOV) per image."""
    cases = []
    for truth_path in sorted((root / "test" / "1st_manual").glob("*.gif")):
        key = truth_path.name.split("_")[0]
        second = next((root / "test" / "2nd_manual").glob(f"{key}_*"))
        fov = next((root / "test" / "mask").glob(f"{key}_*"))
        cases.append(
            (
                binarize(read_raster(second)),
                binarize(read_raster(truth_path)),
                binarize(read_raster(fov)),
            )
        )
    if not cases:
        raise SystemExit(f"{root}/test/1st_manual: no DRIVE masks")
    return cases


def ct_cases(root: Path) -> list[Case]:
    """CT liver slices: (truth shifted by (2, 3) and eroded once, truth, no FOV)."""
    cases = []
    for path in sorted((root / "test" / "masks").glob("*.png")):
        truth = binarize(read_raster(path))
        pred = ndimage.binary_erosion(np.roll(truth, (2, 3), axis=(0, 1)))
        cases.append((pred, truth, None))
    if not cases:
        raise SystemExit(f"{root}/test/masks: no masks")
    return cases


def scipy_distances(pred: np.ndarray, truth: np.ndarray, fov: np.ndarray | None) -> None:
    """The distance step of `boundary_scores` with scipy's transform, on the same crop."""
    if fov is not None:
        pred, truth = pred & fov, truth & fov
    union = pred | truth
    if not pred.any() or not truth.any():
        return
    rows, cols = np.flatnonzero(union.any(axis=1)), np.flatnonzero(union.any(axis=0))
    box = (
        slice(max(rows[0] - 1, 0), rows[-1] + 2),
        slice(max(cols[0] - 1, 0), cols[-1] + 2),
    )
    edge_p, edge_t = boundary(pred[box]), boundary(truth[box])
    ndimage.distance_transform_edt(~edge_t)[edge_p]
    ndimage.distance_transform_edt(~edge_p)[edge_t]


def per_case_ms(
    cases: list[Case], fn: Callable[[Case], object], repeat: int
) -> tuple[float, float]:
    """Wall and CPU ms per case: medians over cases of the best of ``repeat`` runs."""
    timings = [rounds(lambda c=case: fn(c), repeat, warmup=0) for case in cases]
    return (
        1e3 * statistics.median(t.min for t in timings),
        1e3 * statistics.median(t.cpu_min for t in timings),
    )


def inference_ms(
    model: torch.nn.Module, shape: tuple[int, int], cfg: EvaluateConfig, repeat: int
) -> tuple[float, float]:
    """Wall and CPU ms (all threads) of `Predictor.predict` on a random image of ``shape``, the
    best of ``repeat`` calls after one untimed (first calls allocate and pick kernels)."""
    rng = np.random.default_rng(0)
    image = rng.standard_normal((1, *shape)).astype(np.float32)
    fov = np.ones(shape, bool)
    predictor = Predictor(
        [as_runner(model, torch.device("cpu"))], LabelSpace.of(1), 0.5,
        WindowSettings.from_config(cfg),
    )  # fmt: skip
    timing = rounds(lambda: predictor.predict(image, fov), repeat, warmup=1)
    return 1e3 * timing.min, 1e3 * timing.cpu_min


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drive", type=Path, default=REPO.parent / "shared/datasets/DRIVE")
    parser.add_argument("--ct", type=Path, default=REPO.parent / "shared/datasets/CHAOS_CT3")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument(
        "--plan", type=Path, default=REPO / "plans.json", help="the plan of its auto params"
    )
    parser.add_argument("--threads", type=int, default=2, help="torch threads for inference")
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()

    train = load_params(args.params, TrainConfig, args.plan)
    cfg = load_params(args.params, EvaluateConfig, args.plan)
    cfg = EvaluateConfig(**{**cfg.__dict__, "device": "cpu", "threshold": 0.5})
    spec = ModelSpec.from_config(train, in_channels=1)
    torch.manual_seed(0)
    model = prepare_model(build_model(spec).eval(), spec.in_channels)

    rows = []
    datasets = (
        ("DRIVE test (vessels)", drive_cases(args.drive)),
        ("CHAOS CT test (liver)", ct_cases(args.ct)),
    )
    for name, cases in datasets:
        shape = cases[0][1].shape
        torch.set_num_threads(args.threads)
        infer_wall, infer_cpu = inference_ms(model, shape, cfg, args.repeat)
        torch.set_num_threads(1)
        bound = per_case_ms(
            cases, lambda c: boundary_scores(c[0], c[1], c[2], tolerance=1.0), args.repeat
        )
        dist_scipy = per_case_ms(cases, lambda c: scipy_distances(*c), args.repeat)
        lesion = per_case_ms(cases, lambda c: lesion_counts(*c), args.repeat)
        hd95 = statistics.median(boundary_scores(*c).hd95 for c in cases)
        infer = (infer_wall, infer_cpu / args.threads)
        rows.append((name, len(cases), shape, bound, dist_scipy, lesion, infer, hd95))

    print(
        f"\nCPU; boundary and lesion metrics on 1 thread, inference on {args.threads} threads "
        f"(params.yaml: {train.arch} {train.encoder}, window {cfg.window}). ms per case, "
        f"wall / CPU: medians over cases of the best of {args.repeat}; inference CPU is divided "
        "by the threads (its wall time on an idle machine). The shares use CPU times, which a "
        f"shared machine disturbs less.\n{machine()}\n"
    )
    headers = ("cases", "n", "size", "boundary (HD95, ASSD, NSD)", "scipy EDT instead of edt",
               "lesions", "inference", "boundary / inference", "lesions / inference",
               "median HD95 (px)")  # fmt: skip
    print(table(headers, [
        (name, n, f"{shape[1]}x{shape[0]}",
         *(f"{wall:.1f} / {cpu:.1f}" for wall, cpu in (bound, dist_scipy, lesion, infer)),
         f"{bound[1] / infer[1]:.1%}", f"{lesion[1] / infer[1]:.1%}", f"{hd95:.2f}")
        for name, n, shape, bound, dist_scipy, lesion, infer, hd95 in rows
    ]))  # fmt: skip


if __name__ == "__main__":
    main()
