#!/usr/bin/env bash
# Rehearse bench/gpu.sh on this CPU machine as a bare GPU machine would run it: in an environment
# with the GPU machine's versions (PYTHON, default ../gpu-venv/bin/python when there, made by
# bench/gpu_rehearse_env.sh: Python 3.12, torch 2.11, numpy 2.5, huggingface_hub 1.x,
# safetensors 0.8), with the packages it lacks (segmentation-models-pytorch, dvc, dvclive,
# pydicom, imagecodecs, edt, highdicom, pylibjpeg, vl-convert) made unimportable, except from
# the wheels gpu.sh unpacks out of .gpu/whl; a tiny training, device cpu, device cache, and a
# CPU's time limits (BUDGET 900, SMOKE_MAX 300, TRAIN_MAX 240).
#
#   bash bench/gpu_prepare.sh && bash bench/gpu_rehearse.sh [section.key=value ...]
#
# The baselines run too, but for `compile` (an inductor build on two CPU cores takes minutes):
# set BASELINES to choose.
set -euo pipefail
cd "$(dirname "$0")/.."
BLOCK=$(mktemp -d)
trap 'rm -rf "$BLOCK"' EXIT
cat >"$BLOCK/sitecustomize.py" <<'PY'
"""Imports of the packages a bare GPU machine lacks fail, unless gpu.sh unpacked them."""
import importlib.machinery
import sys

MISSING = {
    "segmentation_models_pytorch", "dvc", "dvclive", "pydicom", "imagecodecs", "edt",
    "highdicom", "pylibjpeg", "vl_convert",
}


class BareMachine:
    @staticmethod
    def find_spec(name, path=None, target=None):
        if name not in MISSING:
            return None
        unpacked = [p for p in sys.path if "/medseg-gpu." in p and p.endswith("/site")]
        spec = importlib.machinery.PathFinder.find_spec(name, unpacked)
        if spec is None:
            raise ModuleNotFoundError(f"No module named {name!r} (bare GPU machine)", name=name)
        return spec


sys.meta_path.insert(0, BareMachine)
PY
if [[ -z "${PYTHON:-}" && -x ../gpu-venv/bin/python ]]; then
    PYTHON="$(cd ../gpu-venv/bin && pwd)/python"  # not realpath: that leaves the venv
    export PYTHON
fi
echo "rehearsal: ${PYTHON:-python3} ($("${PYTHON:-python3}" --version 2>&1))"
BASELINES=${BASELINES-ram-w0 batch-x4 ram-w8} PYTHONPATH="$BLOCK${PYTHONPATH:+:$PYTHONPATH}" \
    BUDGET=${BUDGET:-900} SMOKE_MAX=${SMOKE_MAX:-300} TRAIN_MAX=${TRAIN_MAX:-240} \
    bash bench/gpu.sh \
    train.device=cpu train.cache=device train.epochs=2 train.patches_per_epoch=8 \
    train.batch_size=4 train.patch_size=64 train.val_every=2 evaluate.device=cpu "$@"
