#!/usr/bin/env bash
# Train and evaluate on DRIVE on one GPU, without DVC and without a package index; print images/s,
# GPU busy share, peak GPU memory, test F1 (Dice) and AUC, and the wall times.
#
#   bash bench/gpu_prepare.sh                  # first, on a machine with this repository's venv
#   bash bench/gpu.sh [section.key=value ...]   # then, on the GPU machine, from the repository
#   bash bench/gpu.sh train.epochs=60 train.compile=true evaluate.threshold=auto
#
# Reads .gpu/ (made by bench/gpu_prepare.sh): the GPU recipe's params, the processed DRIVE stores
# and wheels of the pure-Python packages a bare machine lacks (segmentation-models-pytorch). It
# needs python3 with torch, timm, safetensors, tifffile, scikit-image and pandas; dvclive is
# optional (without it the train stage writes its metrics file only). The stage scripts run in a
# temporary folder. The GPU busy share is nvidia-smi's utilization.gpu (share of time a kernel
# runs), sampled every 200 ms during the train stage, validation included.
# Environment: PYTHON (default python3), GPU_DIR (default .gpu), KEEP=1 keeps the work folder.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
GPU=$(realpath "${GPU_DIR:-.gpu}")
for need in params.yaml processed.tar.gz whl; do
    [[ -e "$GPU/$need" ]] || { echo "gpu.sh: $GPU/$need is missing; run bench/gpu_prepare.sh" >&2; exit 2; }
done
WORK=$(mktemp -d -t medseg-gpu.XXXXXX)
SMI=""  # the nvidia-smi sampler's pid (never `kill 0`: that is the whole process group)
trap '[[ -z "$SMI" ]] || kill "$SMI" 2>/dev/null || true; [[ "${KEEP:-0}" == 1 ]] || rm -rf "$WORK"' EXIT

# 1. packages: a pure-Python wheel is a zip of the package; unpacked, it imports from there
SITE="$WORK/site"
mkdir -p "$SITE"
if ! "$PY" -c 'import segmentation_models_pytorch' 2>/dev/null; then
    for wheel in "$GPU"/whl/*.whl; do "$PY" -m zipfile -e "$wheel" "$SITE"; done
fi
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"

# 2. data and params (overrides from the command line)
tar -C "$WORK" -xzf "$GPU/processed.tar.gz"
"$PY" - "$GPU/params.yaml" "$WORK/params.yaml" "$@" <<'EOF'
import sys, yaml
src, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
p = yaml.safe_load(open(src))
for item in overrides:
    key, value = item.split("=", 1)
    section, name = key.split(".", 1)
    if name not in p[section]:
        sys.exit(f"gpu.sh: unknown params key {key}")
    p[section][name] = yaml.safe_load(value)
yaml.safe_dump(p, open(out, "w"), sort_keys=False)
print("train:", {k: p["train"][k] for k in ("device", "arch", "encoder", "batch_size",
      "patch_size", "patches_per_epoch", "epochs", "lr", "cache", "compile")})
EOF
P=$WORK/params.yaml

# 3. train (GPU sampled meanwhile), then evaluate
if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$WORK/util.txt" &
    SMI=$!
fi
START=$(date +%s.%N)
"$PY" stages/train.py --params "$P" --data "$WORK/processed" --models "$WORK/models" \
    --logs "$WORK/train" --checkpoints "$WORK/checkpoints"
END=$(date +%s.%N)
[[ -z "$SMI" ]] || kill "$SMI" 2>/dev/null || true
SMI=""
"$PY" stages/evaluate.py --params "$P" --data "$WORK/processed" --model "$WORK/models" \
    --out "$WORK/evaluate"
EVAL_END=$(date +%s.%N)

"$PY" - "$WORK" "$START" "$END" "$EVAL_END" <<'EOF'
import json, os, sys
work, start, end, eval_end = sys.argv[1], *map(float, sys.argv[2:])
train = json.load(open(f"{work}/train/metrics.json"))
for curve in ("throughput_images_per_s", "gpu_peak_memory_gib"):  # curves, not metrics
    path = f"{work}/train/plots/metrics/{curve}.tsv"
    if os.path.exists(path):
        train[curve] = float(open(path).read().split()[-1])
metrics = json.load(open(f"{work}/evaluate/metrics.json"))
test = metrics["test"]["fov"]
util_file = f"{work}/util.txt"
util = [float(x) for x in open(util_file).read().split()] if os.path.exists(util_file) else []
nan = float("nan")
rows = [
    ("train stage wall time (s)", f"{end - start:.1f}"),
    ("evaluate stage wall time (s)", f"{eval_end - end:.1f}"),
    ("images/s (last epoch)", f"{train.get('throughput_images_per_s', nan):.1f}"),
    ("peak GPU memory (GiB)", f"{train.get('gpu_peak_memory_gib', nan):.2f}"),
    ("GPU busy, mean of samples (%)", f"{sum(util) / len(util):.1f}" if util else "-"),
    ("best val Dice (epoch)", f"{train.get('best_val_dice', nan):.4f} ({train['best_epoch']})"),
    ("threshold (evaluate)", f"{metrics['threshold']}"),
    ("test F1 = Dice (FOV)", f"{test['dice']:.4f}"),
    ("test AUC (FOV)", f"{test['auc_roc']:.4f}"),
]
print("\n| measure | value |\n| --- | ---: |")
for name, value in rows:
    print(f"| {name} | {value} |")
EOF
