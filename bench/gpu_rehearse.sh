#!/usr/bin/env bash
# Rehearse bench/gpu.sh on this CPU machine as a bare GPU machine would run it: the packages it
# lacks (segmentation-models-pytorch, dvc, dvclive, pydicom, imagecodecs, edt) are made unimportable,
# except from the wheels gpu.sh unpacks out of .gpu/whl; tiny budget, device cpu, device cache.
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

MISSING = {"segmentation_models_pytorch", "dvc", "dvclive", "pydicom", "imagecodecs", "edt"}


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
BASELINES=${BASELINES-ram-w0 batch-x4 ram-w8} PYTHONPATH="$BLOCK${PYTHONPATH:+:$PYTHONPATH}" \
    bash bench/gpu.sh \
    train.device=cpu train.cache=device train.epochs=2 train.patches_per_epoch=8 \
    train.batch_size=4 train.patch_size=64 train.val_every=2 evaluate.device=cpu "$@"
