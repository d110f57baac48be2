#!/usr/bin/env bash
# Train on DRIVE on one GPU with AMP; print images/s, peak GPU memory, GPU busy share, test Dice.
#
#   bash bench/gpu.sh [/path/to/DRIVE] [train.key=value ...]
#   bash bench/gpu.sh ../shared/datasets/DRIVE train.epochs=60 train.compile=true
#
# Runs the stage scripts (convert, preprocess, train, evaluate) into a temporary folder with this
# repository's params.yaml, data.root set to DRIVE and the GPU recipe below (each overridable).
# The GPU busy share is nvidia-smi's utilization.gpu (share of time a kernel runs), sampled every
# 200 ms during the train stage, validation included. Target: training under 8 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
DRIVE=${1:-../shared/datasets/DRIVE}
shift || true
WORK=$(mktemp -d)
trap 'kill "${SMI:-0}" 2>/dev/null || true; rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"

python - "$DRIVE" "$WORK/params.yaml" "$@" <<'EOF'
import sys, yaml
drive, out, overrides = sys.argv[1], sys.argv[2], sys.argv[3:]
p = yaml.safe_load(open("params.yaml"))
p["data"]["root"] = drive
p["train"].update(
    device="cuda", amp=True, batch_size=64, patch_size=128, patches_per_epoch=8192, epochs=40,
    val_every=5, lr=2.0e-3, warmup_epochs=1.0,
)
for item in overrides:
    key, value = item.split("=", 1)
    section, name = key.split(".", 1)
    p[section][name] = yaml.safe_load(value)
yaml.safe_dump(p, open(out, "w"), sort_keys=False)
print("train:", {k: p["train"][k] for k in ("arch", "encoder", "batch_size", "patch_size",
      "patches_per_epoch", "epochs", "lr", "loss", "compile")})
EOF

P=$WORK/params.yaml
python stages/convert.py --params "$P" --out "$WORK/converted"
python stages/preprocess.py --params "$P" --converted "$WORK/converted" --out "$WORK/processed"
nvidia-smi --query-gpu=utilization.gpu --format=csv,noheader,nounits -lms 200 >"$WORK/util.txt" &
SMI=$!
START=$(date +%s.%N)
python stages/train.py --params "$P" --data "$WORK/processed" --models "$WORK/models" \
    --logs "$WORK/train" --checkpoints "$WORK/checkpoints"
END=$(date +%s.%N)
kill "$SMI" 2>/dev/null || true
python stages/evaluate.py --params "$P" --data "$WORK/processed" \
    --model "$WORK/models/model.safetensors" --out "$WORK/evaluate"

python - "$WORK" "$START" "$END" <<'EOF'
import json, sys
work, start, end = sys.argv[1], float(sys.argv[2]), float(sys.argv[3])
train = json.load(open(f"{work}/train/metrics.json"))
test = json.load(open(f"{work}/evaluate/metrics.json"))["test"]["fov"]
util = [float(x) for x in open(f"{work}/util.txt").read().split() if x.strip()]
rows = [
    ("train stage wall time (s)", f"{end - start:.1f}"),
    ("images/s (last epoch)", f"{train['throughput_images_per_s']:.1f}"),
    ("peak GPU memory (GiB)", f"{train.get('gpu_peak_memory_gib', float('nan')):.2f}"),
    ("GPU busy, mean of samples (%)", f"{sum(util) / max(len(util), 1):.1f}"),
    ("best val Dice (epoch)", f"{train.get('best_val_dice', float('nan')):.4f} ({train['best_epoch']})"),
    ("test Dice (FOV)", f"{test['dice']:.4f}"),
    ("test AUC (FOV)", f"{test['auc_roc']:.4f}"),
]
print("\n| measure | value |\n| --- | ---: |")
for name, value in rows:
    print(f"| {name} | {value} |")
EOF
