"""Each registry holds exactly the names of its list in `medseg.names`, and the params schema
accepts every one of them and nothing else."""

from __future__ import annotations

import subprocess
import sys

import pytest
from conftest import tiny_params, write_params

from medseg import names
from medseg.config import load_all_params
from medseg.errors import MedsegError


def test_the_architectures_are_the_models_registry():
    from medseg.model import _ARCHS

    assert tuple(_ARCHS) == names.ARCHS


def test_the_losses_are_the_loss_registry():
    from medseg.training.losses import LOSSES

    assert tuple(LOSSES) == names.LOSSES


def test_the_optimizers_and_schedules_are_those_of_optim():
    from medseg.names import SCHEDULES
    from medseg.training.optim import OPTIMIZERS, lr_factor

    assert tuple(OPTIMIZERS) == names.OPTIMIZERS
    assert SCHEDULES == names.SCHEDULES
    # each schedule has its own shape: none falls through to another's branch
    shapes = {s: lr_factor(5, 10, 0, s, 0.0, 2.0) for s in names.SCHEDULES}
    assert len(set(shapes.values())) == len(names.SCHEDULES)


def test_the_blendings_are_those_of_the_sliding_window():
    from medseg.names import BLENDINGS

    assert tuple(BLENDINGS) == names.BLENDINGS


def test_the_layouts_are_the_layout_registry():
    from medseg.io.layouts import LAYOUTS

    assert tuple(LAYOUTS) == names.LAYOUTS


def test_the_predict_command_offers_the_same_choices():
    from medseg.cli import parse_args

    for blending in names.BLENDINGS:
        assert parse_args(["predict", "--model", "m", "--out", "o", "x", "--blending", blending])
    with pytest.raises(SystemExit):
        parse_args(["predict", "--model", "m", "--out", "o", "x", "--blending", "median"])


@pytest.mark.parametrize(
    ("section", "key", "choices"),
    [
        ("data", "layout", names.LAYOUTS),
        ("synthesize", "labels", names.LABEL_SETS),
        ("convert", "fov_fallback", names.FOV_FALLBACKS),
        ("convert", "names", names.ID_NAMES),
        ("preprocess", "channel", names.CHANNELS),
        ("preprocess", "contrast", names.CONTRASTS),
        ("train", "arch", names.ARCHS),
        ("train", "loss", names.LOSSES),
        ("train", "optimizer", names.OPTIMIZERS),
        ("train", "schedule", names.SCHEDULES),
        ("train", "cache", names.CACHES),
        ("evaluate", "blending", names.BLENDINGS),
    ],
)
def test_the_schema_accepts_each_name_and_refuses_others(tmp_path, section, key, choices):
    for choice in choices:
        params = tiny_params(**{section: {key: choice}})
        loaded = load_all_params(write_params(tmp_path / f"{choice}.yaml", params))
        assert getattr(getattr(loaded, section), key) == choice
    bad = write_params(tmp_path / "bad.yaml", tiny_params(**{section: {key: "nonesuch"}}))
    with pytest.raises(MedsegError, match=rf"{section}\.{key} must be one of {choices[0]}"):
        load_all_params(bad)


def test_check_params_names_an_unknown_architecture(tmp_path, capsys):
    from medseg.cli import main

    bad = write_params(tmp_path / "p.yaml", tiny_params(train={"arch": "mask-rcnn"}))
    with pytest.raises(SystemExit) as stop:
        main(["check-params", str(bad)])
    assert stop.value.code != 0
    assert "train.arch must be one of unet" in capsys.readouterr().err


@pytest.mark.parametrize("encoder", ["../../etc/passwd", "", "resnet 18"])
def test_check_params_refuses_what_cannot_be_an_encoder_name(tmp_path, capsys, encoder):
    from medseg.cli import main

    bad = write_params(tmp_path / "p.yaml", tiny_params(train={"encoder": encoder}))
    with pytest.raises(SystemExit) as stop:
        main(["check-params", str(bad)])
    assert stop.value.code != 0
    assert "train.encoder must be a segmentation-models-pytorch encoder name" in (
        capsys.readouterr().err
    )


def test_every_encoder_name_of_smp_has_the_shape_the_schema_accepts():
    import re

    import segmentation_models_pytorch as smp

    odd = [e for e in smp.encoders.get_encoder_names() if not re.fullmatch(names.ENCODER_NAME, e)]
    assert not odd


def test_the_names_and_the_schema_import_no_implementation():
    code = (
        "import sys, medseg.config; "
        "print(sorted(m for m in ('torch', 'pandas', 'skimage', 'medseg.training.losses') "
        "if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"
