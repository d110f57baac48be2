"""Benchmark of evaluation on the 20 DRIVE test images: full `evaluate`, inference per image,
metric computation; and the DRIVE second observer scored like a model.

The test images are read and preprocessed the pipeline's way (`prepare_image`) into a temporary
case store; the model is an untrained resnet18 UNet with the default params (timing does not
depend on the weights). Prints Markdown tables.

    python bench/evaluate.py --drive ../shared/datasets/DRIVE          # 2 threads, default
    python bench/evaluate.py --drive ../shared/datasets/DRIVE --threads 4
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import Timing, machine, rounds, table

from medseg.config import load_params
from medseg.config.sections import EvaluateConfig, PreprocessConfig, TrainConfig
from medseg.evaluation.evaluate import evaluate_model
from medseg.inference.bundle import save_bundle
from medseg.inference.runners import prepare_model
from medseg.inference.window import WindowSettings, predict_probabilities
from medseg.io.images import binarize, read_raster
from medseg.io.shards import CaseStore, ShardWriter
from medseg.labels import LabelSpace
from medseg.model import build_model
from medseg.preprocess.dataset import case_arrays
from medseg.preprocess.processed import RECORD, read_case, save_record
from medseg.preprocess.transforms import prepare_image
from medseg.scoring.tally import ScoreTally, SecondObserver
from medseg.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]


def drive_test_store(root: Path, pre: PreprocessConfig, out: Path) -> CaseStore:
    """DRIVE ``test/``: images, 1st and 2nd manual, FOV masks, preprocessed into a case store."""
    images = sorted((root / "test" / "images").glob("*.tif"))
    if not images:
        raise SystemExit(f"{root}/test/images: no DRIVE test images")
    out.mkdir(parents=True, exist_ok=True)
    writer = ShardWriter(out, "test")
    for path in images:
        key = path.stem.split("_")[0]
        fov = binarize(read_raster(next((root / "test" / "mask").glob(f"{key}_*"))))
        truth = binarize(read_raster(next((root / "test" / "1st_manual").glob(f"{key}_*"))))
        second = binarize(read_raster(next((root / "test" / "2nd_manual").glob(f"{key}_*"))))
        x, _ = prepare_image(read_raster(path), fov, pre)
        arrays = case_arrays(x, truth.astype(np.uint8), fov, 2)
        arrays["mask2"] = second.astype(np.uint8)
        h, w = fov.shape
        writer.add(path.stem, arrays, height=h, width=w, full_height=h, full_width=w)
    writer.close()
    return CaseStore.open(out, "test")


def infer_times(model, store: CaseStore, cfg: EvaluateConfig) -> tuple[Timing, list]:
    """Wall and CPU seconds (all threads) of each image's inference, and the probabilities."""
    cases, probs = iter([read_case(store, i) for i in store]), []
    settings = WindowSettings.from_config(cfg)

    def one() -> None:
        probs.append(predict_probabilities(model, next(cases).image, settings, "cpu"))

    return rounds(one, len(store), warmup=0), probs


def metric_time(store: CaseStore, probs: list[np.ndarray], threshold: float) -> None:
    """Score ``probs`` against ``store`` as the evaluate stage does: every table and curve."""
    tally = ScoreTally(1)
    for i, p in enumerate(probs):
        case = read_case(store, i)
        p = p.copy()
        p[:, ~case.fov] = 0.0
        pred = LabelSpace.of(1).segment(p, threshold)
        tally.add(case.case_id, p, pred, case.truth, case.fov)
    tally.summary()
    tally.curves()
    tally.confusion_table()
    tally.per_image()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--drive", type=Path, default=REPO.parent / "shared/datasets/DRIVE")
    parser.add_argument("--params", type=Path, default=REPO / "params.yaml")
    parser.add_argument(
        "--plan", type=Path, default=REPO / "plans.json", help="the plan of its auto params"
    )
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    cfg = load_params(args.params, EvaluateConfig, args.plan)
    cfg = EvaluateConfig(**{**cfg.__dict__, "device": "cpu"})
    train = load_params(args.params, TrainConfig, args.plan)
    pre = load_params(args.params, PreprocessConfig, args.plan)
    spec = ModelSpec.from_config(train, in_channels=1)
    torch.manual_seed(0)
    net = build_model(spec).eval()
    model = prepare_model(net, spec.in_channels)

    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        split = drive_test_store(args.drive, pre, tmp / "data")
        save_record(pre, tmp / "data" / RECORD)
        (tmp / "models").mkdir()
        save_bundle(tmp / "models", net.state_dict(), net.state_dict(), spec, tmp / "data")
        infer_times(model, split, cfg)  # warm-up: first calls allocate and pick kernels
        full = rounds(
            lambda: evaluate_model(cfg, tmp / "data", tmp / "models", tmp / "results"), 1, 0
        )
        rows = []
        variants = [
            ("params.yaml", cfg),
            ("window 512", EvaluateConfig(**{**cfg.__dict__, "window": 512})),
            ("constant blending", EvaluateConfig(**{**cfg.__dict__, "blending": "constant"})),
            ("flip TTA", EvaluateConfig(**{**cfg.__dict__, "tta": True})),
        ]
        probs_default: list = []
        for name, variant in variants:
            timing, probs = infer_times(model, split, variant)
            if name == "params.yaml":
                probs_default = probs
            rows.append((name, variant, timing))
        metrics = rounds(lambda: metric_time(split, probs_default, cfg.threshold), 3, warmup=0)
        observer = SecondObserver(1)
        for i in split:
            case = read_case(split, i)
            assert case.mask2 is not None
            observer.add(case.truth, case.mask2, case.truth_fov)
        second = observer.summary()
    n = args.threads
    print(f"\nDRIVE test, {len(split)} images 565x584, resnet18 UNet "
          f"(decoder {train.decoder_channels}), CPU, {n} threads\n{machine()}\n")  # fmt: skip
    print("CPU/threads: CPU seconds of all threads divided by the thread count, what the wall time")
    print("would be with the cores to ourselves; wall: as measured on this (shared) machine.\n")
    base = rows[0][2]
    print(table(("measure", "wall", "CPU/threads", "target"), [
        (f"full evaluate (inference, metrics, {len(split) * 2} PNGs, tables)",
         f"{full.min:.2f} s", f"{full.cpu_min / n:.2f} s", "< 15 s"),
        (f"inference per image, params.yaml (window {cfg.window}, overlap {cfg.overlap}, "
         f"{cfg.blending}, no TTA), best of {len(split)}",
         f"{base.min:.3f} s", f"{base.cpu_min / n:.3f} s", "< 0.3 s"),
        (f"metrics for {len(split)} images (all scores, AUCs, curves, confusion; one thread), "
         "best of 3", f"{metrics.min:.3f} s", f"{metrics.cpu_min:.3f} s", "< 1 s"),
    ]))  # fmt: skip
    print("\n" + table(
        ("inference variant", "window", "wall s/image (best, median)",
         "CPU/threads s/image (best)", "vs params.yaml"),
        [(name, variant.window, f"{t.min:.3f}, {t.median:.3f}", f"{t.cpu_min / n:.3f}",
          f"{t.cpu_min / base.cpu_min:.2f}x") for name, variant, t in rows],
    ))  # fmt: skip

    assert second is not None
    print(
        f"\nDRIVE second observer vs first, inside the FOV, pooled over {len(split)} test images\n"
    )
    scores = {k: v for k, v in second.items() if k != "n_images"}
    print(table(list(scores), [[f"{v:.4f}" for v in scores.values()]]))


if __name__ == "__main__":
    main()
