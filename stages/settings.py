"""The helper every stage config uses: a dataclass field with its help text and what it is.

A field's metadata says which CLI flag sets it and whether it is part of the identity of what the
stage makes (a store's content, a run's resumable state); the CLI's flag maps, the store's
recorded settings and a run's resume key are derived from it, so no list of names is kept twice.
"""

import math
from dataclasses import asdict, field, fields
from typing import Any


def setting(default: Any, help: str, flag: str | None = None, identity: bool = True) -> Any:
    """A config field: `flag` is the CLI option that sets it (e.g. "--top-k"); `identity` says
    whether its value is part of what the stage makes (False: where things live, how fast)."""
    metadata = {"help": help, "flag": flag, "identity": identity}
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata=metadata)
    return field(default=default, metadata=metadata)


def identity_values(config: Any) -> dict[str, Any]:
    """The config's values that are part of its identity, in field order."""
    values = asdict(config)
    return {f.name: values[f.name] for f in fields(config) if f.metadata.get("identity", True)}


def flag_keys(config_cls: type) -> dict[str, str]:
    """CLI flag (e.g. "--top-k") -> the field it sets, for the fields a flag sets."""
    return {f.metadata["flag"]: f.name for f in fields(config_cls) if f.metadata.get("flag")}


INT64 = 1 << 63
MAX_STEPS = 10**9  # optimizer steps (and warm-up steps) a config may ask for


def representable_problems(config: Any, section: str) -> list[str]:
    """Floats must be finite and ints fit in 64 bits: NaN passes every `<`/`>` check a config
    makes, and an int beyond 64 bits crashes numpy and MLX."""
    problems = []
    for name, value in vars(config).items():
        values = value if isinstance(value, list) else [value]
        if any(isinstance(v, float) and not math.isfinite(v) for v in values):
            problems.append(f"{section}.{name} must be a finite number (got {value})")
        elif any(isinstance(v, int) and not -INT64 <= v < INT64 for v in values):
            problems.append(f"{section}.{name} must fit in 64 bits (got {value})")
    return problems


def above_limit_problems(config: Any, section: str, limits: dict[str, int | float]) -> list[str]:
    """Upper bounds: sizes no real run has, refused before anything is planned or allocated."""
    return [
        f"{section}.{name} must be <= {limit:,} (got {getattr(config, name):,})"
        for name, limit in limits.items()
        if isinstance(getattr(config, name), (int, float)) and getattr(config, name) > limit
    ]
