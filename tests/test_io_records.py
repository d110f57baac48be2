"""``params.yaml`` is read as DVC reads it (YAML 1.2), so that ``dvc params diff`` and ``dvc exp
show`` report the value a stage used; the scalars YAML 1.1 (PyYAML) reads otherwise are the
table below, each checked against DVC's own parser."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_params, write_params
from dvc.utils.serialize import parse_yaml

from medseg.config import load_all_params, load_params
from medseg.config.sections import TrainConfig
from medseg.errors import MedsegError
from medseg.io.records import read_yaml

# text -> the value YAML 1.2 gives it (PyYAML's 1.1 value differs for each)
DISAGREEING = [
    ("1e-3", 0.001),
    ("1E3", 1000.0),
    ("12e3", 12000.0),
    ("yes", "yes"),
    ("no", "no"),
    ("on", "on"),
    ("off", "off"),
    ("Yes", "Yes"),
    ("017", 17),
    ("0o17", 15),
    ("1:20", "1:20"),
    ("190:20:30", "190:20:30"),
]
# the same in both, checked all the same
AGREEING = [("1.0e-3", 0.001), ("true", True), ("null", None), ("~", None), ("0x1f", 31)]


def _dvc(path: Path) -> object:
    """What DVC reads (``dvc params diff``, ``dvc exp show``): its own YAML parser."""
    return parse_yaml(path.read_text(encoding="utf-8"), str(path))


@pytest.mark.parametrize(("text", "value"), DISAGREEING + AGREEING)
def test_scalars_are_read_as_dvc_reads_them(tmp_path: Path, text: str, value: object):
    path = tmp_path / "params.yaml"
    path.write_text(f"k: {text}\n")
    ours, dvc = read_yaml(path)["k"], _dvc(path)["k"]  # type: ignore[index]
    assert (type(ours), ours) == (type(dvc), dvc) == (type(value), value)
    if (text, value) in DISAGREEING:  # the table holds what PyYAML (YAML 1.1) reads otherwise
        assert yaml.safe_load(path.read_text())["k"] != value


def test_the_shipped_params_file_reads_as_dvc_reads_it():
    path = REPO / "params.yaml"
    assert read_yaml(path) == _dvc(path)


def test_a_float_without_a_dot_is_a_float_and_yes_is_not_true(tmp_path: Path):
    path = write_params(tmp_path / "params.yaml", tiny_params())
    text = path.read_text()
    path.write_text(re.sub(r"(?m)^  lr: .*$", "  lr: 1e-3", text))
    assert load_params(path, TrainConfig).lr == 0.001 == _dvc(path)["train"]["lr"]  # type: ignore[index]
    path.write_text(re.sub(r"(?m)^  amp: .*$", "  amp: yes", text))
    with pytest.raises(MedsegError, match=r"train\.amp must be of type bool, got 'yes' \(str\)"):
        load_all_params(path)


def test_a_key_given_twice_is_refused_in_one_line(tmp_path: Path):
    path = tmp_path / "params.yaml"
    path.write_text("data:\n  root: a\n  root: b\n")
    with pytest.raises(MedsegError, match=r'not valid YAML: .*found duplicate key "root"') as err:
        read_yaml(path)
    assert "\n" not in str(err.value) and "<unicode string>" not in str(err.value)
