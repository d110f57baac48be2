"""Shared fixtures: tiny, fast params and the paths of the repository."""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may download during tests

REPO = Path(__file__).resolve().parents[1]
DRIVE = REPO.parent / "shared" / "datasets" / "DRIVE"

# The real params.yaml, shrunk: tiny images, few cases, one short epoch.
TINY_OVERRIDES: dict[str, dict[str, Any]] = {
    "synthesize": {"n_train": 4, "n_test": 2, "height": 72, "width": 68},
    "train": {
        "decoder_channels": [32, 16, 16, 8, 8],
        "epochs": 1,
        "patches_per_epoch": 8,
        "batch_size": 4,
        "patch_size": 32,
    },
    "evaluate": {"window": 64},
}


def tiny_params(**changes: dict[str, Any]) -> dict[str, Any]:
    """The repository's params.yaml with `TINY_OVERRIDES` and then ``changes`` applied."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    for overrides in (TINY_OVERRIDES, changes):
        for section, values in overrides.items():
            params[section].update(copy.deepcopy(values))
    return params


def write_params(path: Path, params: dict[str, Any]) -> Path:
    """Write a params dict as YAML to ``path``; return ``path``."""
    path.write_text(yaml.safe_dump(params, sort_keys=False))
    return path


@pytest.fixture
def params_file(tmp_path: Path) -> Path:
    """A tiny params.yaml in a temporary folder."""
    return write_params(tmp_path / "params.yaml", tiny_params())
