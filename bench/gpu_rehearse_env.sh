#!/usr/bin/env bash
# A virtual environment with the GPU machine's versions, for bench/gpu_rehearse.sh, outside the
# repository (default ../gpu-venv, where gpu_rehearse.sh looks for it). The versions are those a
# session read on the device's image (/work/.library/device/KINDS.md, 2026-11): Python 3.12,
# torch 2.11.0, torchvision 0.26.0, numpy 2.5.2, huggingface_hub 1.33.0, safetensors 0.8.0,
# onnx 1.23.1, onnxruntime 1.30.0; the rest as PyPI has them. No segmentation-models-pytorch,
# dvc, dvclive, pydicom, imagecodecs or edt: the machine lacks them (gpu.sh brings smp, timm
# and edt as wheels).
#
#   bash bench/gpu_rehearse_env.sh [/path/to/venv]
#
# PyPI's torch for Linux is the CUDA 13.0 build (the device's own, 2.11.0+cu130): about 0.5 GB,
# and its nvidia-* libraries about 3 GB more; it runs on a CPU. PyPI has no CPU-only build.
# Python 3.12 comes from python3.12 on the PATH, else pyenv's (~/.pyenv/versions/3.12.*).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-../gpu-venv}
PY312=$(command -v python3.12 2>/dev/null || ls -d ~/.pyenv/versions/3.12.*/bin/python3.12 2>/dev/null | tail -1)
[[ -n "$PY312" ]] || { echo "gpu_rehearse_env.sh: no Python 3.12 (python3.12, pyenv)" >&2; exit 2; }
"$PY312" -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet \
    torch==2.11.0 torchvision==0.26.0 numpy==2.5.2 huggingface_hub==1.33.0 safetensors==0.8.0 \
    onnx==1.23.1 onnxruntime==1.30.0 timm tifffile scikit-image pandas pyyaml scipy pillow tqdm \
    matplotlib nvidia-ml-py
"$VENV/bin/python" -c "import sys, torch, numpy, huggingface_hub, safetensors; print('rehearsal env:', sys.version.split()[0], 'torch', torch.__version__, 'numpy', numpy.__version__, 'huggingface_hub', huggingface_hub.__version__, 'safetensors', safetensors.__version__)"
