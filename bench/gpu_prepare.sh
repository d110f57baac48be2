#!/usr/bin/env bash
# Build .gpu/ on this (CPU) machine: everything bench/gpu.sh needs on a bare GPU machine that
# has python3 with torch, timm, safetensors, tifffile, scikit-image and pandas, but no
# segmentation-models-pytorch, dvc, dvclive, pydicom or imagecodecs, and no package index.
#
#   bash bench/gpu_prepare.sh [/path/to/DRIVE] [section.key=value ...]
#       # default /work/shared/datasets/DRIVE, else ../shared/datasets/DRIVE
#
# .gpu/params.yaml          this repository's params.yaml, data.root set to DRIVE, the GPU recipe
# .gpu/processed.tar.gz     DRIVE converted and preprocessed with those params (the stage outputs)
# .gpu/whl/*.whl            the exact wheels the code was tested with here, unpacked by gpu.sh
#                           ahead of the machine's own: segmentation-models-pytorch, timm, edt
# .gpu/stamp.json           the commit, a hash of the source (src/, stages/, bench/gpu*,
#                           params.yaml) and the size and hash of each file above: gpu.sh
#                           refuses a .gpu that does not match its working tree (gpu_stamp.py)
#
# The GPU recipe is the CPU DRIVE recipe (bench/drive_recipe.py RECIPE: CLAHE, flip TTA at
# evaluation, validation every 5 epochs) with a GPU's batch: 64 patches of 128 pixels, 8192
# patches an epoch, 40 epochs, lr 2e-3, bf16, the split cached on the GPU. Overrides given here
# (a preprocess.* key, say) are baked into .gpu/params.yaml and the processed data; gpu.sh
# refuses to change data.*, convert.* or preprocess.* later, since the data are made here.
#
# The folder is git-ignored and stays under 64 MiB (it travels with the working tree: name it
# in the device run's `carry`, docs/gpu.md).
set -euo pipefail
cd "$(dirname "$0")/.."
DEFAULT=/work/shared/datasets/DRIVE
[[ -d $DEFAULT ]] || DEFAULT=../shared/datasets/DRIVE
DRIVE=$DEFAULT
if [[ $# -gt 0 && $1 != *=* ]]; then DRIVE=$1; shift; fi
DRIVE=$(realpath "$DRIVE")
GPU=.gpu
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
rm -rf "$GPU"
mkdir -p "$GPU/whl"

python3 - "$DRIVE" "$GPU/params.yaml" "$@" <<'PY'
import sys, yaml
drive, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
p = yaml.safe_load(open("params.yaml"))
p["data"]["root"] = drive
# every key the plan would choose, given (the GPU run needs no plans.json): DRIVE's hand recipe
p["convert"]["fov_fallback"] = "threshold"
p["preprocess"].update(channel="green", contrast="clahe", max_side=None)  # as drive_recipe.py
p["evaluate"].update(window=1024, threshold=0.5)
p["evaluate"]["tta"] = True
p["train"].update(
    device="cuda", amp=True, cache="auto", batch_size=64, patch_size=128,
    foreground_fraction=0.5, loss="bce_dice", postprocess=[],
    patches_per_epoch=8192, epochs=40, val_every=5, lr=2.0e-3, warmup_epochs=1.0, workers=0,
)
for item in overrides:
    key, value = item.split("=", 1)
    section, name = key.split(".", 1)
    if name not in p.get(section, {}):
        sys.exit(f"gpu_prepare.sh: unknown params key {key}")
    p[section][name] = yaml.safe_load(value)
yaml.safe_dump(p, open(out, "w"), sort_keys=False)
PY

nice -n 10 python3 stages/convert.py --params "$GPU/params.yaml" --out "$WORK/converted"
nice -n 10 python3 stages/preprocess.py --params "$GPU/params.yaml" --converted "$WORK/converted" \
    --out "$WORK/processed"
tar -C "$WORK" -czf "$GPU/processed.tar.gz" processed

# the versions installed here (the ones the tests pass with); pure Python, no platform tags
for dist in segmentation-models-pytorch timm ruamel.yaml pydantic annotated-types typing-inspection \
    typing_extensions; do
    version=$(python3 -c "import importlib.metadata as m, sys; print(m.version(sys.argv[1]))" "$dist")
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$GPU/whl" "$dist==$version"
done
# edt (the boundary metrics' distance transform) and pydantic-core (the params models) are
# compiled: each one's wheel for the GPU machine's
# Python (3.12) and for this one's (the rehearsal); gpu.sh unpacks both, each Python loads its own
edt=$(python3 -c "import importlib.metadata as m; print(m.version('edt'))")
core=$(python3 -c "import importlib.metadata as m; print(m.version('pydantic-core'))")
here=$(python3 -c "import sys; print(f'{sys.version_info[0]}.{sys.version_info[1]}')")
for pyver in 3.12 "$here"; do
    python3 -m pip download --quiet --no-deps --only-binary=:all: --dest "$GPU/whl" \
        --python-version "$pyver" --platform manylinux2014_x86_64 \
        --platform manylinux_2_28_x86_64 "edt==$edt" "pydantic-core==$core"
done
python3 bench/gpu_stamp.py write --gpu "$GPU"
du -sh "$GPU" "$GPU"/*
