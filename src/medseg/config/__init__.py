"""Typed, strict configuration: loading ``params.yaml`` into its sections
(`medseg.config.sections`, where each key is declared once), with the plan's values for the
keys left ``auto``.

Loading rejects unknown sections and keys, missing keys and wrong types, naming the offending
key (``train.lr``) so a typo never silently falls back to a default. The file is read as DVC
reads it (YAML 1.2, `medseg.io.records.read_yaml`).
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from pathlib import Path
from typing import Any, TypeVar

from medseg import names
from medseg.config.keys import parse
from medseg.config.sections import (  # the public names of medseg.config, home sections.py
    ConvertConfig,
    CrossvalConfig,
    DataConfig,
    EvaluateConfig,
    Params,
    PreprocessConfig,
    SynthesizeConfig,
    TrainConfig,
    label_map,
)
from medseg.errors import MedsegError, cut
from medseg.io.records import read_json, read_yaml
from medseg.planning.settings import SETTINGS, STAND_INS

__all__ = [
    "ConvertConfig",
    "CrossvalConfig",
    "DataConfig",
    "EvaluateConfig",
    "Params",
    "PreprocessConfig",
    "SynthesizeConfig",
    "TrainConfig",
    "label_map",
    "load_all_params",
    "load_params",
]


T = TypeVar("T")


def load_params(
    path: str | Path, section: type[T], plan: str | Path | Mapping[str, Any] | None = None
) -> T:
    """Load and validate the whole params file, then return one section of it.

    The whole file is checked, not only the section asked for, so that a typo anywhere stops
    the first stage that runs instead of the one that reads it. A planned key
    (`medseg.planning.settings`) set to ``auto`` takes its value from the plan (``plans.json``,
    written by the plan stage).

    Args:
        path: the ``params.yaml`` file.
        section: the section's dataclass, e.g. ``TrainConfig``.
        plan: the plan (its ``plans.json`` path, or the loaded dict); needed when the section
            has a key set to ``auto``.

    Returns:
        The validated, frozen section, every ``auto`` replaced by the plan's value.

    Raises:
        MedsegError: the file is missing or unreadable, a key is unknown, missing or of the
            wrong type, or a key of the section is ``auto`` and no plan gives it.
    """
    params, unresolved = _load(Path(path), plan)
    for field in dataclasses.fields(Params):
        value = getattr(params, field.name)
        if isinstance(value, section):
            waiting = [key for key in unresolved if key.startswith(f"{field.name}.")]
            if waiting and plan is not None:
                raise MedsegError(
                    f"{plan if not isinstance(plan, Mapping) else names.PLAN_FILE}: no value "
                    f"for {', '.join(waiting)}, which {path} sets to auto; run the plan stage "
                    "again (dvc repro)"
                )
            if waiting:
                raise MedsegError(
                    f"params: {', '.join(waiting)} {'is' if len(waiting) == 1 else 'are'} auto, "
                    f"which the plan stage chooses; run `dvc repro` (it writes "
                    f"{names.PLAN_FILE}), or set {'it' if len(waiting) == 1 else 'them'} in "
                    f"{path}"
                )
            return value
    raise TypeError(f"{section.__name__} is not a section of params.yaml")


def load_all_params(path: str | Path, plan: str | Path | Mapping[str, Any] | None = None) -> Params:
    """Load and validate every section of a params file. See `load_params`; a key left
    ``auto`` without a plan is checked as if the plan had given it a valid value."""
    return _load(Path(path), plan)[0]


def planned_values(raw: Any) -> dict[str, Any]:
    """The planned keys (`medseg.planning.settings.SETTINGS`) of a raw params mapping that are
    not ``auto``: dotted key -> value. The plan stage records them as explicit."""
    out: dict[str, Any] = {}
    for setting in SETTINGS:
        section = raw.get(setting.section) if isinstance(raw, Mapping) else None
        if isinstance(section, Mapping) and section.get(setting.name, names.AUTO) != names.AUTO:
            out[setting.key] = section[setting.name]
    return out


def _load(path: Path, plan: str | Path | Mapping[str, Any] | None) -> tuple[Params, list[str]]:
    """Parse ``path`` with every ``auto`` planned key replaced by the plan's value (or, where the
    plan gives none, a stand-in, listed as unresolved). Without a plan, a key whose stage runs
    before the plan (`Setting.before_plan`) keeps ``auto``, which that stage handles."""
    raw = read_yaml(path)
    chosen = _plan_params(plan) if plan is not None else None
    unresolved: list[str] = []
    planned: list[str] = []
    if isinstance(raw, dict):
        raw = {k: dict(v) if isinstance(v, dict) else v for k, v in raw.items()}
        for setting in SETTINGS:
            section = raw.get(setting.section)
            if not isinstance(section, dict) or section.get(setting.name) != names.AUTO:
                continue
            if chosen is not None and setting.name in chosen.get(setting.section, {}):
                section[setting.name] = chosen[setting.section][setting.name]
                planned.append(setting.key)
            elif chosen is None and setting.before_plan:
                continue
            else:
                section[setting.name] = STAND_INS[setting.key]
                unresolved.append(setting.key)
    try:
        return _parse_params(raw, str(path)), unresolved
    except MedsegError as err:
        if not planned:
            raise
        source = plan if not isinstance(plan, Mapping) else names.PLAN_FILE
        raise MedsegError(
            f"{err} (the values of {', '.join(planned)}, auto in {path}, come from {source}: "
            "run the plan stage again, or set them)"
        ) from None


def _parse_params(raw: Any, source: str) -> Params:
    """Every section of a params mapping, strictly (`parse`), in the order of `Params`."""
    where = typing.get_type_hints(Params)
    if not isinstance(raw, dict):
        raise MedsegError(f"{source}: the top level must be a mapping of keys to values")
    unknown = sorted((k for k in raw if k not in where), key=str)
    if unknown:
        raise MedsegError(
            f"{source}: unknown key {cut(str(unknown[0]), 60)}; known keys in the top level: "
            f"{', '.join(where)}"
        )
    missing = [name for name in where if name not in raw]
    if missing:
        raise MedsegError(f"{source}: missing key {missing[0]}")
    built = {name: parse(cls, raw[name], f"{name}.", source) for name, cls in where.items()}
    return Params(**built)


def _plan_params(plan: str | Path | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The ``params`` part of a plan: section -> key -> value."""
    source = str(plan) if not isinstance(plan, Mapping) else names.PLAN_FILE
    loaded = read_json(Path(plan), "plan") if not isinstance(plan, Mapping) else plan
    chosen = loaded.get("params") if isinstance(loaded, Mapping) else None
    if not isinstance(chosen, Mapping) or not all(isinstance(v, Mapping) for v in chosen.values()):
        raise MedsegError(
            f"{source}: not a plan (no 'params' section of section -> key -> value); run the "
            "plan stage again (dvc repro)"
        )
    return {str(k): dict(v) for k, v in chosen.items()}
