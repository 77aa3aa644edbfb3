"""The helper every stage config uses: a dataclass field with its help text."""

import math
from dataclasses import field
from typing import Any


def setting(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def help_of(config_cls: type, name: str) -> str:
    return config_cls.__dataclass_fields__[name].metadata.get("help", "")


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
