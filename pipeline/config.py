"""YAML config + CLI overrides -> the stages' typed configs. Precedence: CLI > file > defaults.

A config file has one section per stage (`targets:`, `tune:`, `eval:`) and an optional top-level
`store:` that every stage uses unless its section names its own.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from stages.errors import InvalidConfig
from stages.evaluate import EvalConfig
from stages.run_dir import MODEL_DIR
from stages.settings import INT64, flag_keys
from stages.targets import TargetsConfig
from stages.tune import TuneConfig

SECTIONS: dict[str, type] = {"targets": TargetsConfig, "tune": TuneConfig, "eval": EvalConfig}
SHARED_KEYS = ("store", "storage_options", "compute_dtype")


@dataclass(frozen=True)
class PipelineConfig:
    targets: TargetsConfig
    tune: TuneConfig
    eval: EvalConfig


def read_yaml(path: Path) -> dict:
    if path.is_dir():
        raise InvalidConfig([f"config {path} is a folder, not a YAML file"])
    if not path.is_file():
        raise InvalidConfig([f"config file {path} does not exist"])
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as exc:
        raise InvalidConfig([f"cannot read config {path}: {exc.strerror or exc}"]) from exc
    except UnicodeDecodeError as exc:
        raise InvalidConfig([f"{path} is not a text (UTF-8) YAML file"]) from exc
    if not text.strip():
        raise InvalidConfig([f"config {path} is empty; leave out --config to use the defaults"])
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark else ""
        raise InvalidConfig([f"{path} is not valid YAML{where}"]) from exc
    if not isinstance(raw, dict):
        raise InvalidConfig([f"{path} must hold a mapping of sections"])
    return raw


def parse_override(text: str) -> tuple[str, Any]:
    """'targets.top_k=512' -> ('targets.top_k', 512); values are read as YAML scalars/lists."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise InvalidConfig([f"override {text!r} must look like section.key=value"])
    if not value.strip():
        raise InvalidConfig(
            [
                f"override {text!r} has no value (leave the --set out for the default; "
                f"{key.strip()}='' is an empty string)"
            ]
        )
    try:
        return key.strip(), yaml.safe_load(value)
    except yaml.YAMLError as exc:
        raise InvalidConfig([f"override {text!r}: value is not valid YAML"]) from exc


def flag_overrides(section: str, flags: dict[str, Any]) -> dict[str, Any]:
    """The overrides a command's flags make, found by each field's `flag`: `flags` holds the
    command's parameters by name (--top-k -> top_k), None where a flag was not given; an on-only
    flag left off (False) sets nothing either. Shared keys go to the top level, as in a file."""
    overrides = {}
    for flag, name in flag_keys(SECTIONS[section]).items():
        value = flags[flag.removeprefix("--").replace("-", "_")]
        if value is not None and value is not False:
            overrides[name if name in SHARED_KEYS else f"{section}.{name}"] = value
    return overrides


def _apply_overrides(raw: dict, overrides: dict[str, Any], problems: list[str]) -> dict:
    merged = {k: (dict(v) if isinstance(v, dict) else v) for k, v in raw.items()}
    for dotted, value in overrides.items():
        if value is None:
            continue
        if dotted in SECTIONS:
            problems.append(f"override {dotted}=... must name a key: {dotted}.KEY=value")
            continue
        if "." not in dotted:
            merged[dotted] = value
            continue
        section, key = dotted.split(".", 1)
        if section not in SECTIONS:
            problems.append(f"unknown section {section!r} in override {dotted}")
            continue
        if not isinstance(merged.setdefault(section, {}), dict):
            continue  # load_config reports the section that is not a mapping
        merged[section][key] = value
    return merged


def _section_problems(raw: dict) -> list[str]:
    """A section is a mapping of keys, or left out; `tune:` with nothing under it is null."""
    return [
        f"section {name!r} must be a mapping of keys or left out (got {raw[name]!r})"
        for name in SECTIONS
        if name in raw and not isinstance(raw[name], dict)
    ]


def _type_ok(hint: Any, value: Any) -> bool:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(arg, value) for arg in typing.get_args(hint))
    if origin is list:
        (item,) = typing.get_args(hint)
        return isinstance(value, list) and all(_type_ok(item, v) for v in value)
    if origin is dict:
        return isinstance(value, dict) and all(isinstance(k, str) for k in value)
    if hint is type(None):
        return value is None
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, hint)


def _as_float(value: Any) -> Any:
    """YAML 1.1 reads `1e-4` (no dot) and `nan` as strings: a float field takes any string
    float() reads (NaN and inf are then refused as not finite); anything else is left as is."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _coerce(hint: Any, value: Any) -> Any:
    """`value` with number-like strings read as floats where `hint` wants a float."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return _coerce(float, value) if float in typing.get_args(hint) else value
    if origin is list and isinstance(value, list):
        (item,) = typing.get_args(hint)
        return [_coerce(item, v) for v in value]
    return _as_float(value) if hint is float else value


def _type_name(hint: Any) -> str:
    return getattr(hint, "__name__", None) or str(hint).replace("typing.", "")


def _not_representable(value: Any) -> str | None:
    """NaN and inf pass every comparison a stage's check could make, and ints beyond 64 bits
    crash numpy and MLX: both are refused here, in lists too."""
    if isinstance(value, list):
        return next(filter(None, map(_not_representable, value)), None)
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number (got {value})"
    if isinstance(value, int) and not -INT64 <= value < INT64:
        return f"must fit in 64 bits (got {value})"
    return None


def build_section(name: str, cls: type, values: Any, problems: list[str]) -> Any:
    if not isinstance(values, dict):
        problems.append(f"section {name!r} must be a mapping")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name for f in dataclasses.fields(cls)}
    typed = {}
    for key, value in values.items():
        value = _coerce(hints[key], value) if key in fields else value
        if key not in fields:
            problems.append(f"unknown key {name}.{key} (known: {', '.join(sorted(fields))})")
        elif not _type_ok(hints[key], value):
            problems.append(f"{name}.{key} must be {_type_name(hints[key])}, got {value!r}")
        elif problem := _not_representable(value):
            problems.append(f"{name}.{key} {problem}")
        else:
            typed[key] = float(value) if hints[key] is float else value
    try:
        return cls(**typed)
    except InvalidConfig as exc:
        problems.extend(exc.problems)
        return None


def load_config(path: Path | None, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Build every stage config, reporting all problems of file and overrides in one error."""
    problems: list[str] = []
    raw = read_yaml(path) if path is not None else {}
    raw = _apply_overrides(raw, overrides or {}, problems)
    problems += _section_problems(raw)
    if problems:
        raise InvalidConfig(problems)
    allowed = set(SECTIONS) | set(SHARED_KEYS)
    for key in sorted(set(raw) - allowed):
        problems.append(f"unknown top-level key {key!r} (known: {', '.join(sorted(allowed))})")
    built = {}
    for name, cls in SECTIONS.items():
        section = dict(raw.get(name, {}))
        for shared in SHARED_KEYS:
            if shared in raw and shared not in section and shared in cls.__dataclass_fields__:
                section[shared] = raw[shared]
        built[name] = build_section(name, cls, section, problems)
    if problems:
        raise InvalidConfig(problems)
    if built["eval"].student is None:  # evaluate what this config's tune run saved
        tuned = str(Path(built["tune"].run_dir) / MODEL_DIR)
        built["eval"] = dataclasses.replace(built["eval"], student=tuned)
    return PipelineConfig(**built)
