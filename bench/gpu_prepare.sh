#!/usr/bin/env bash
# Build .gpu/ on this (CPU) machine: everything bench/gpu.sh needs on a bare GPU machine that
# has python3 with torch, timm, safetensors, tifffile, scikit-image and pandas, but no
# segmentation-models-pytorch, dvc, dvclive, pydicom or imagecodecs, and no package index.
#
#   bash bench/gpu_prepare.sh [/path/to/DRIVE]      # default ../shared/datasets/DRIVE
#
# .gpu/params.yaml          this repository's params.yaml, data.root set to DRIVE, the GPU recipe
# .gpu/processed.tar.gz     DRIVE converted and preprocessed with those params (the stage outputs)
# .gpu/whl/*.whl            wheels of what the GPU machine lacks (pure Python: no platform tags)
#
# No binary wheel is needed: train and evaluate never import pydicom or dvc, dvclive is optional,
# and imagecodecs is imported only for 16-bit colour PNG (not DRIVE). Should one be needed, fetch it
# for the GPU machine's Python with: python3 -m pip download --no-deps --only-binary=:all:
#   --python-version 3.12 --implementation cp --platform manylinux_2_28_x86_64
#   --platform manylinux2014_x86_64 -d .gpu/whl NAME==VERSION
#
# The folder is git-ignored and stays under 64 MiB (it travels with the working tree).
set -euo pipefail
cd "$(dirname "$0")/.."
DRIVE=$(realpath "${1:-../shared/datasets/DRIVE}")
GPU=.gpu
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$GPU"
mkdir -p "$GPU/whl"

# the GPU recipe; bench/gpu.sh takes further section.key=value overrides at run time
python3 - "$DRIVE" "$GPU/params.yaml" <<'PY'
import sys, yaml
drive, out = sys.argv[1], sys.argv[2]
p = yaml.safe_load(open("params.yaml"))
p["data"]["root"] = drive
p["train"].update(
    device="cuda", amp=True, cache="auto", batch_size=64, patch_size=128,
    patches_per_epoch=8192, epochs=40, val_every=5, lr=2.0e-3, warmup_epochs=1.0, workers=0,
)
yaml.safe_dump(p, open(out, "w"), sort_keys=False)
PY

python3 stages/convert.py --params "$GPU/params.yaml" --out "$WORK/converted"
python3 stages/preprocess.py --params "$GPU/params.yaml" --converted "$WORK/converted" \
    --out "$WORK/processed"
tar -C "$WORK" -czf "$GPU/processed.tar.gz" processed

# pure-Python wheels, the versions installed here (the ones the tests pass with)
for dist in segmentation-models-pytorch; do
    version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
    python3 -m pip download --quiet --no-deps --dest "$GPU/whl" "$dist==$version"
done
du -sh "$GPU" "$GPU"/*
