"""Benchmark: seconds per DRIVE-sized image for the torch model and its ONNX export run by
onnxruntime, on the CPU with the same thread count, through the one case-prediction function
(`medseg.inference.predictor.Predictor`); and the largest difference of their probabilities.

The model is an untrained network of the repository's params (timing does not depend on the
weights), exported with `medseg.inference.export.export_onnx`. The images are the DRIVE test images,
preprocessed the pipeline's way, where ../shared/datasets/DRIVE holds them; else seeded random
565x584 images. An untimed pass gives the probabilities to compare; then the runtimes take turns
(`harness.turns`), each round every image once; the table gives seconds per image, the median
and the best round. Prints a Markdown table.

    python bench/export.py                                  # 20 images, 3 rounds, 2 threads
    python bench/export.py --images 2 --rounds 1 --threads 4 --tta
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

import numpy as np
import torch
from harness import machine, table, turns

from medseg.config import load_params
from medseg.config.sections import EvaluateConfig, PreprocessConfig, TrainConfig
from medseg.inference.bundle import Bundle, load_bundle, save_bundle
from medseg.inference.export import export_onnx
from medseg.inference.onnx_model import open_onnx
from medseg.inference.predictor import Predictor
from medseg.inference.window import WindowSettings
from medseg.io.images import binarize, read_raster
from medseg.model import build_model
from medseg.preprocess.processed import RECORD, save_record
from medseg.preprocess.transforms import in_channels, prepare_image
from medseg.spec import ModelSpec

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--params", default=REPO / "params.yaml", type=Path)
    parser.add_argument(
        "--plan", type=Path, default=REPO / "plans.json", help="the plan of its auto params"
    )
    parser.add_argument("--drive", default=REPO.parent / "shared" / "datasets" / "DRIVE", type=Path)
    parser.add_argument("--images", type=int, default=20, help="how many images")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2, help="for torch and onnxruntime")
    parser.add_argument("--tta", action="store_true", help="flip test-time augmentation")
    return parser.parse_args(argv)


def drive_images(root: Path, pre: PreprocessConfig, n: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Up to ``n`` prepared (image, FOV) pairs: DRIVE test images, else random 565x584."""
    paths = sorted((root / "test" / "images").glob("*.tif"))[:n]
    cases = []
    for path in paths:
        key = path.stem.split("_")[0]
        fov = binarize(read_raster(next((root / "test" / "mask").glob(f"{key}_*"))))
        cases.append(prepare_image(read_raster(path), fov, pre))
    rng = np.random.default_rng(0)
    while len(cases) < n:  # no DRIVE here: random images of its size
        image = rng.integers(0, 256, (584, 565, 3), dtype=np.uint8)
        cases.append(prepare_image(image, np.ones((584, 565), bool), pre))
    return cases


def make_models(params: Path, plan: Path, work: Path, threads: int) -> tuple[Bundle, Bundle]:
    """An untrained bundle of the params' network, and its export with ``threads`` threads."""
    pre = load_params(params, PreprocessConfig, plan)
    spec = ModelSpec.from_config(load_params(params, TrainConfig, plan), in_channels(pre.channel))
    torch.manual_seed(0)
    state = build_model(spec).state_dict()
    save_record(pre, work / RECORD)
    (work / "models").mkdir()
    save_bundle(work / "models", state, state, spec, work)
    export_onnx(work / "models", work / "model.onnx")
    exported = load_bundle(work / "model.onnx", "cpu")
    runner, _ = open_onnx(work / "model.onnx", "cpu", threads=threads)
    return load_bundle(work / "models", "cpu"), dataclasses.replace(exported, model=runner)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    options = dataclasses.replace(
        load_params(args.params, EvaluateConfig, args.plan), device="cpu", tta=args.tta
    )
    with tempfile.TemporaryDirectory() as tmp:
        built = make_models(args.params, args.plan, Path(tmp), args.threads)
        models = dict(zip(("torch", "onnxruntime"), built, strict=True))
        pre = models["torch"].preprocess
        cases = drive_images(args.drive, pre, args.images)
        settings = WindowSettings.from_config(options)
        predictors = {
            name: Predictor.from_bundles([bundle], settings, options.threshold, 0.5)
            for name, bundle in models.items()
        }

        def predict_all(name: str) -> list[np.ndarray]:
            return [predictors[name].predict(image, fov)[1] for image, fov in cases]

        probs = {name: predict_all(name) for name in models}  # also the warm-up
        timings = turns({name: lambda n=name: predict_all(n) for name in models}, args.rounds, 0)
    diff = max(float(np.abs(a - b).max()) for a, b in zip(*probs.values(), strict=True))
    size = "x".join(map(str, cases[0][0].shape[:0:-1]))
    print(
        f"\n{len(cases)} images of {size}, {args.rounds} round(s), {args.threads} thread(s), "
        f"tta {args.tta}, window {options.window}\n{machine()}\n"
    )
    rows = [(name, f"{t.median / len(cases):.3f}", f"{t.min / len(cases):.3f}", len(t.wall))
            for name, t in timings.items()]  # fmt: skip
    print(table(("runtime", "median s/image", "best round s/image", "rounds"), rows))
    print(f"\nlargest |onnxruntime - torch| probability: {diff:.2e}")


if __name__ == "__main__":
    main()
