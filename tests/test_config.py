from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import re
import subprocess
import sys
import tempfile
import types
import typing
from pathlib import Path

import pytest
import yaml
from conftest import REPO, tiny_params, write_params
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from medseg.config import load_all_params, load_params
from medseg.config.sections import DataConfig, EvaluateConfig, Params, TrainConfig
from medseg.errors import MedsegError


def test_repository_params_load_with_every_section():
    params = load_all_params(REPO / "params.yaml")
    assert isinstance(params.train, TrainConfig)
    assert params.train.encoder_weights is None  # offline by default
    assert [f.name for f in dataclasses.fields(Params)] == [
        "data", "synthesize", "convert", "preprocess", "train", "evaluate", "crossval",
    ]  # fmt: skip


def test_load_params_returns_the_section(params_file: Path):
    data = load_params(params_file, DataConfig)
    assert data.layout == "drive"
    assert load_params(params_file, EvaluateConfig).window == 64


def test_sections_are_frozen(params_file: Path):
    cfg = load_params(params_file, TrainConfig)
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr = 1.0  # type: ignore[misc]


def test_int_is_accepted_for_float(tmp_path: Path):
    path = write_params(tmp_path / "p.yaml", tiny_params(train={"lr": 1}))
    assert load_params(path, TrainConfig).lr == 1.0


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"train": {"lrr": 0.1}}, "unknown key train.lrr"),
        ({"train": {"epochs": "ten"}}, "train.epochs must be of type int"),
        ({"train": {"epochs": 2.5}}, "train.epochs must be of type int"),
        ({"train": {"amp": 1}}, "train.amp must be of type bool"),
        ({"train": {"lr": "fast"}}, "train.lr must be of type float, got 'fast' (str)"),
        ({"train": {"decoder_channels": 16}}, "train.decoder_channels must be a list"),
        ({"train": {"patch_size": 50}}, "train.patch_size must be a positive multiple of 32"),
        ({"train": {"epochs": 0}}, "train.epochs must be > 0"),
        ({"preprocess": {"channel": "red"}}, "preprocess.channel must be one of"),
        ({"data": {"layout": "nnunet"}}, "data.layout must be one of"),
        ({"evaluate": {"threshold": 1.5}}, "evaluate.threshold must be in [0, 1]"),
        ({"train": {"amp_cpu": "yes"}}, "train.amp_cpu must be one of auto"),
        ({"train": {"amp_cpu": 1}}, "train.amp_cpu must be of type"),
        ({"evaluate": {"blending": "mean"}}, "evaluate.blending must be one of gaussian"),
        ({"evaluate": {"tta": "yes"}}, "evaluate.tta must be of type bool"),
        ({"convert": {"window_center": 40.0}}, "must be set together"),
        ({"crossval": {"folds": [0]}}, "crossval.folds must be [0, 1, ..., k-1] with k >= 2"),
        ({"crossval": {"folds": [1, 2]}}, "crossval.folds must be [0, 1, ..., k-1]"),
        ({"crossval": {"folds": 5}}, "crossval.folds must be a list"),
    ],
)
def test_bad_values_name_the_key(tmp_path: Path, changes: dict, message: str):
    path = write_params(tmp_path / "p.yaml", tiny_params(**changes))
    with pytest.raises(MedsegError) as err:
        load_params(path, DataConfig)  # any section: the whole file is checked
    assert message in str(err.value)
    assert str(path) in str(err.value)


def test_missing_key_and_unknown_section(tmp_path: Path):
    params = tiny_params()
    del params["train"]["lr"]
    with pytest.raises(MedsegError, match=re.escape("missing key train.lr")):
        load_params(write_params(tmp_path / "a.yaml", params), TrainConfig)
    params = tiny_params()
    params["trian"] = {}
    with pytest.raises(MedsegError, match="unknown key trian"):
        load_params(write_params(tmp_path / "b.yaml", params), TrainConfig)


def test_unreadable_files(tmp_path: Path):
    with pytest.raises(MedsegError, match="cannot read the params file"):
        load_params(tmp_path / "absent.yaml", TrainConfig)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(MedsegError, match="not valid YAML"):
        load_params(bad, TrainConfig)
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(MedsegError, match="must be a mapping"):
        load_params(empty, TrainConfig)


@pytest.mark.parametrize(
    ("train", "message"),
    [
        ({"loss": "focal"}, "train.loss must be one of bce, dice, bce_dice, cldice"),
        ({"cldice_weight": 1.5}, "train.cldice_weight must be in [0, 1]"),
        ({"optimizer": "sgd"}, "train.optimizer must be one of adam, adamw"),
        ({"schedule": "step"}, "train.schedule must be one of constant, cosine, poly"),
        ({"min_lr": 1.0}, "train.min_lr must be <= train.lr"),
        ({"warmup_epochs": -1.0}, "train.warmup_epochs must be >= 0.0"),
        ({"grad_clip": -1.0}, "train.grad_clip must be >= 0.0"),
        ({"val_every": 0}, "train.val_every must be > 0"),
        ({"aug_rotate": 200.0}, "train.aug_rotate must be in [0, 180] degrees"),
        ({"aug_scale": 0.9}, "train.aug_scale must be in [0, 0.5]"),
        ({"aug_gamma": 1.0}, "train.aug_gamma must be in [0, 1)"),
        ({"aug_prob": 2.0}, "train.aug_prob must be in [0, 1]"),
        ({"workers": -1}, "train.workers must be >= 0"),
        ({"classes": 0}, "train.classes must be >= 1"),
        ({"compile": "yes"}, "train.compile must be of type bool"),
    ],
)
def test_bad_training_values_name_the_key(tmp_path: Path, train: dict, message: str):
    path = write_params(tmp_path / "p.yaml", tiny_params(train=train))
    with pytest.raises(MedsegError) as err:
        load_params(path, TrainConfig)
    assert message in str(err.value)


@pytest.mark.parametrize(
    ("classes", "message"),
    [
        ({}, "at least one class"),
        ({"background": 1}, "is not a class name"),
        ({"9lives": 1}, "is not a class name"),
        ({"liver": 0}, r"data\.classes\.liver must be a mask value"),
        ({"liver": "1"}, r"data\.classes\.liver must be a mask value"),
        ({"liver": 1, "kidney": [2, 1]}, "mask value 1 is given twice"),
    ],
)
def test_bad_data_classes_are_refused_naming_the_key(classes: dict, message: str):
    with pytest.raises(MedsegError, match=message):
        DataConfig("d", "folders", classes=classes)


def test_data_classes_map_values_to_labels_in_order():
    from medseg.config.sections import label_map

    assert label_map({"liver": 63, "kidney": [126, 189]}) == {63: 1, 126: 2, 189: 2}


def test_more_classes_than_8_bit_labels_hold_are_refused():
    classes = {f"c{k}": k for k in range(1, 257)}
    with pytest.raises(MedsegError, match=r"data\.classes names 256 classes; at most 255"):
        DataConfig("data", "folders", classes=classes)


# --- hostile params: non-finite numbers, alias bombs, unbounded values ------------------------


_SECTIONS = typing.get_type_hints(Params)  # section name -> its dataclass


def _fields_of_type(wanted: type) -> list[str]:
    """Every ``section.key`` of params.yaml whose type is ``wanted`` or ``wanted | None``."""
    keys = []
    for section, cls in _SECTIONS.items():
        for name, tp in typing.get_type_hints(cls).items():
            if tp is wanted or (typing.get_origin(tp) in (typing.Union, types.UnionType)
                                and wanted in typing.get_args(tp)):  # fmt: skip
                keys.append(f"{section}.{name}")
    return keys


FLOAT_KEYS = _fields_of_type(float)


def test_every_float_param_is_listed():
    assert {"train.lr", "data.test_fraction", "convert.window_center", "evaluate.overlap"} <= set(
        FLOAT_KEYS
    )


def test_nan_and_infinity_are_refused_for_every_float_param(tmp_path: Path):
    base = write_params(tmp_path / "base.yaml", tiny_params()).read_text()
    values = [".nan", ".inf", "-.inf", "1.0e+999"]  # each key gets one, in turn
    for k, key in enumerate(FLOAT_KEYS):
        section, name = key.split(".")
        params = yaml.safe_load(base)
        params[section][name] = "@"
        if section == "convert" and name.startswith("window_"):  # set together
            params["convert"]["window_center" if name == "window_width" else "window_width"] = 1.0
        value = values[k % len(values)]
        text = _dump(params).replace("'@'", value)
        path = tmp_path / "params.yaml"
        path.write_text(text)
        with pytest.raises(MedsegError) as err:
            load_all_params(path)
        assert str(err.value) == f"{path}: {key} must be a finite number, got {_repr(value)}"


def _dump(params: dict) -> str:
    return yaml.dump(params, Dumper=_DUMPER, sort_keys=False, allow_unicode=True)


_DUMPER = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


def _repr(value: str) -> str:
    return {".nan": "nan", ".inf": "inf", "-.inf": "-inf", "1.0e+999": "inf"}[value]


def test_an_integer_too_large_for_a_float_is_refused(tmp_path: Path):
    path = write_params(tmp_path / "p.yaml", tiny_params(train={"lr": 10**400}))
    with pytest.raises(
        MedsegError, match=r"train\.lr must be a finite number, got 1000000+\.\.\.$"
    ):
        load_all_params(path)


def _laughs(levels: int) -> str:
    """A "billion laughs" document: each level an alias list of ten of the level below."""
    lines = ["l0: &l0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for k in range(1, levels):
        lines.append(f"l{k}: &l{k} [" + ", ".join([f"*l{k - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (_laughs(9), r"more than 100000 values once aliases are expanded \(an alias bomb\?\)"),
        ("a: &a [1, *a]\n", r"recursive alias"),
        ("a: " + "[" * 200 + "]" * 200 + "\n", r"values nested (deeper than 64 levels|too deeply)"),
        ("a: " + "9" * 5000 + "\n", r"cannot be read: Exceeds the limit \(4300 digits\)"),
        ("a: b\n" + "#" * (1 << 20), r"larger than 1 MiB; not a params file"),
        ("a: \xff\n", r"is not UTF-8 text"),
        ("a: [b\n", r"not valid YAML"),
    ],
)
def test_hostile_yaml_fails_fast_with_one_line(tmp_path: Path, text: str, message: str):
    path = tmp_path / "params.yaml"
    path.write_text(text, encoding="latin-1" if "\xff" in text else "utf-8")
    with pytest.raises(MedsegError, match=message) as err:  # the bound's own message
        load_all_params(path)
    assert str(err.value).startswith(f"params file {path}")
    assert len(str(err.value)) < 500


def test_aliases_within_the_bound_are_read(tmp_path: Path):
    params = tiny_params()
    text = yaml.safe_dump(params, sort_keys=False)
    text = text.replace("  split_seed: 0\n", "  split_seed: &seed 0\n", 1)
    text = text.replace("\n  seed: 0\n", "\n  seed: *seed\n", 1)
    path = tmp_path / "params.yaml"
    path.write_text(text)
    assert "*seed" in text and load_all_params(path).synthesize.seed == 0


@pytest.mark.parametrize(
    ("changes", "shown"),
    [
        ({"train": {"device": "x" * 10_000}}, "train.device must be one of"),
        ({"train": {"decoder_channels": "y" * 10_000}}, "train.decoder_channels must be a list"),
        ({"train": {"epochs": "z" * 10_000}}, "train.epochs must be of type int"),
        ({"train": {"classes": 10**4000}}, "train.classes must be <= 256, got 1000"),
        ({"train": {"k" * 10_000: 1}}, "unknown key train.kkk"),
        ({"data": {"classes": ["c" * 10_000]}}, "data.classes must be a mapping"),
    ],
)
def test_messages_never_echo_an_unbounded_value(tmp_path: Path, changes: dict, shown: str):
    params = tiny_params()
    for section, values in changes.items():
        params[section].update(values)
    path = write_params(tmp_path / "params.yaml", params)
    with pytest.raises(MedsegError) as err:
        load_all_params(path)
    message = str(err.value)
    assert shown in message and len(message) < 1000
    assert not re.search(r"(.)\1{80}", message)  # the long value is cut


def test_keys_of_mixed_types_are_refused_as_unknown(tmp_path: Path):
    params = tiny_params()
    params["train"][1] = 2
    with pytest.raises(MedsegError, match=r"unknown key train\.1; known keys in train: arch"):
        load_all_params(write_params(tmp_path / "params.yaml", params))


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"decoder_channels": [10**9] * 5}, r"train\.decoder_channels must be a list of 1 to 8"),
        ({"decoder_channels": [16] * 9}, r"train\.decoder_channels must be a list of 1 to 8"),
        ({"classes": 10**9}, r"train\.classes must be <= 256, got 1000000000"),
    ],
)
def test_network_sizes_are_bounded(tmp_path: Path, changes: dict, message: str):
    path = write_params(tmp_path / "params.yaml", tiny_params(train=changes))
    with pytest.raises(MedsegError, match=message):
        load_all_params(path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("train:\n  lr: .nan\n", "train.lr must be a finite number, got nan"),
        (_laughs(9), "an alias bomb"),
    ],
)
def test_check_params_prints_one_line_without_a_traceback(tmp_path: Path, text: str, message: str):
    base = yaml.safe_load(write_params(tmp_path / "base.yaml", tiny_params()).read_text())
    path = tmp_path / "params.yaml"
    if text.startswith("train:"):
        path.write_text(
            yaml.safe_dump(base, sort_keys=False).replace(
                f"  lr: {base['train']['lr']}\n", "  lr: .nan\n"
            )
        )
        assert ".nan" in path.read_text()
    else:
        path.write_text(text)
    proc = subprocess.run(
        [sys.executable, "-c", "from medseg.cli import main; main()", "check-params", str(path)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode != 0 and proc.stdout == ""
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and str(path) in lines[0]


# --- property-based: any value for any field parses into its type or is refused cleanly ----

_SCALARS = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.integers(min_value=-(10**400), max_value=10**400)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
    | st.sampled_from(["auto", "cpu", "unet", "hash", "green", "1.0e-3", "1e-3", "yes", "~"])
)
_VALUES = st.recursive(
    _SCALARS,
    lambda inner: (
        st.lists(inner, max_size=6) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
_ALL_KEYS = [
    (section, name) for section, cls in _SECTIONS.items() for name in typing.get_type_hints(cls)
]
_BASE = tiny_params()


def _has_type(value: object, tp: object) -> bool:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        return any(_has_type(value, arg) for arg in typing.get_args(tp))
    if tp is type(None):
        return value is None
    if origin is typing.Literal:
        return isinstance(value, str) and value in typing.get_args(tp)
    if origin is list:
        (item,) = typing.get_args(tp)
        return isinstance(value, list) and all(_has_type(v, item) for v in value)
    if origin is dict:
        return isinstance(value, dict)
    if tp is float:
        return type(value) is float and math.isfinite(value)
    return type(value) is tp


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(_ALL_KEYS), value=_VALUES)
def test_any_value_parses_to_its_type_or_is_refused(key: tuple[str, str], value: object):
    section, name = key
    params = copy.deepcopy(_BASE)
    params[section][name] = value
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(_dump(params))
        try:
            parsed = load_all_params(path)
        except MedsegError as err:
            assert "\n" not in str(err)
            assert len(str(err)) < 1000
            return
    tp = typing.get_type_hints(_SECTIONS[section])[name]
    assert _has_type(getattr(getattr(parsed, section), name), tp)


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab:-[]{}&*!|>'\"#%@ \n\t,?0.9")), max_size=80))
def test_any_yaml_text_is_read_or_refused_cleanly(text: str):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "params.yaml"
        path.write_text(text)
        with contextlib.suppress(MedsegError):  # any other exception fails the test
            load_all_params(path)
