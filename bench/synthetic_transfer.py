"""How good a starting point is the synthetic data? Score a model on real DRIVE images.

Converts and preprocesses the DRIVE folder (its *training* images only: the test images are for
reporting final results, not for tuning the generator), then scores the given weights there,
inside the FOV, with the evaluate stage's own code. Prints a Markdown table.

    dvc repro                                   # trains on the built-in synthetic data
    python bench/synthetic_transfer.py --drive ../shared/datasets/DRIVE
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
from pathlib import Path

from harness import table

from medseg.config.sections import ConvertConfig, DataConfig, EvaluateConfig, PreprocessConfig
from medseg.convert.dataset import convert_dataset
from medseg.evaluation.evaluate import evaluate_model
from medseg.preprocess.dataset import preprocess_dataset

REPO = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--drive", type=Path, required=True, help="the DRIVE folder")
    parser.add_argument("--model", type=Path, default=REPO / "models")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory(prefix="medseg-transfer-") as tmp:
        work = Path(tmp)
        convert_dataset(
            DataConfig(str(args.drive), "drive"), ConvertConfig(None, None), work / "conv"
        )
        preprocess_dataset(PreprocessConfig("green", 0.0, 0), work / "conv", work / "proc")
        # score the training images: their index where evaluate looks for the test split (it
        # names its own shard files)
        shutil.copytree(work / "proc", work / "score")
        shutil.copy(work / "proc" / "train.json", work / "score" / "test.json")
        cfg = EvaluateConfig(
            threshold=0.5, window=512, overlap=0.25, blending="gaussian", tta=False,
            batch_size=4, device="auto",
        )  # fmt: skip
        metrics = evaluate_model(cfg, work / "score", args.model, work / "out")

    fov = metrics["test"]["fov"]
    print(f"\n{args.model} on the {metrics['n_images']} DRIVE training images (FOV, pooled)\n")
    print(table(list(fov), [[f"{v:.4f}" for v in fov.values()]]))


if __name__ == "__main__":
    main()
