"""The helper every stage config uses: a dataclass field with its help text."""

from dataclasses import field
from typing import Any


def setting(default: Any, help: str) -> Any:
    if isinstance(default, (list, dict)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help})


def help_of(config_cls: type, name: str) -> str:
    return config_cls.__dataclass_fields__[name].metadata.get("help", "")
