"""The helpers every stage config uses: fields with their help text and what they are, checks.

A field's metadata says which CLI flag sets it and whether it is part of the identity of what the
stage makes (a store's content, a run's resumable state); the CLI's flag maps, the store's
recorded settings and a run's resume key are derived from it, so no list of names is kept twice.
"""

import math
from dataclasses import asdict, field, fields
from typing import Any

from stages.models import COMPUTE_DTYPES, FAST_MATMUL


def setting(
    default: Any,
    help: str,
    flag: str | None = None,
    identity: bool = True,
    choices: tuple[str, ...] | None = None,
) -> Any:
    """A config field: `flag` is the CLI option that sets it (e.g. "--top-k"); `identity` says
    whether its value is part of what the stage makes (False: where things live, how fast);
    `choices` are the values it may take."""
    metadata = {"help": help, "flag": flag, "identity": identity, "choices": choices}
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


# ---- fields several stages share -----------------------------------------------------------------


def store_setting(help: str) -> Any:
    # configs/default.yaml's store; named by its format (k=16 + 64 tail samples) so that a store
    # of an earlier default (k=1024, artifacts/store/default.zarr) stays where it was
    return setting("artifacts/store/default-k16-s64.zarr", help, "--store", identity=False)


def storage_options_setting(help: str = "fsspec options for a URL store") -> Any:
    return setting({}, help, "--storage-option", identity=False)


def trust_remote_code_setting(identity: bool = False) -> Any:
    help = "allow code shipped with a model folder to run"
    return setting(False, help, "--trust-remote-code", identity=identity)


def fast_matmul_setting() -> Any:
    help = "dequantize + BLAS matmul: auto (on for CPU), on, off"
    return setting("auto", help, identity=False, choices=FAST_MATMUL)


def compute_dtype_setting() -> Any:
    """Not an identity as written: `auto` means different dtypes on different devices, and a
    float32 model computes alike under every choice. A store records the dtype it resolved to
    (TargetsConfig.store_identity); a tune run resumes under any (see TuneConfig)."""
    help = (
        "dtype the models compute in: auto (float32 on CPU, the model's own elsewhere), "
        "float32, or model (its own); saved models keep their own dtype"
    )
    return setting("auto", help, identity=False, choices=COMPUTE_DTYPES)


def choice_problems(config: Any, section: str) -> list[str]:
    """Every field with `choices` holds one of them."""
    choices = {f.name: f.metadata["choices"] for f in fields(config) if f.metadata.get("choices")}
    return [
        f"{section}.{name} must be one of {', '.join(allowed)} (got {getattr(config, name)!r})"
        for name, allowed in choices.items()
        if getattr(config, name) not in allowed
    ]


INT64 = 1 << 63
MAX_STEPS = 10**9  # optimizer steps (and warm-up steps) a config may ask for


def empty_path_problems(config: Any, section: str, names: tuple[str, ...]) -> list[str]:
    """A path or model field given as an empty string would name the current folder."""
    return [
        f"{section}.{name} must not be empty"
        for name in names
        if isinstance(getattr(config, name), str) and not getattr(config, name).strip()
    ]


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
