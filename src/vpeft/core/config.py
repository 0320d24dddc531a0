"""Method configurations: typed dataclasses that round-trip to JSON and reject unknown options."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass, field, fields
from typing import Any, ClassVar


def option(default: Any, help: str, **kwargs: Any) -> Any:
    """A dataclass field with help text (shown by ``vpeft methods --verbose`` and the CLI)."""
    if isinstance(default, (list, dict, set)):
        return field(default_factory=lambda: type(default)(default), metadata={"help": help})
    return field(default=default, metadata={"help": help}, **kwargs)


@dataclass
class MethodConfig:
    """Options shared by every method. Subclasses add their own fields with :func:`option`."""

    method: ClassVar[str] = ""

    train_head: bool = option(True, "Also train the classifier head (needed for a new task).")

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = list(value) if isinstance(value, tuple) else value
        return out

    @classmethod
    def option_names(cls) -> list[str]:
        return [f.name for f in fields(cls)]

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> MethodConfig:
        """Build a config, coercing JSON/CLI values to the declared types; unknown keys raise."""
        known = {f.name: f for f in fields(cls)}
        unknown = sorted(set(values) - set(known))
        if unknown:
            raise TypeError(
                f"unknown option(s) {unknown} for method '{cls.method}'; "
                f"its options are: {sorted(known)}"
            )
        hints = typing.get_type_hints(cls)
        kwargs = {k: _coerce(v, hints[k], k, cls.method) for k, v in values.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> MethodConfig:
        return self.from_dict({**self.to_dict(), **changes})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check option values; subclasses extend with ``super().validate()``."""


def _coerce(value: Any, hint: Any, name: str, method: str) -> Any:
    """Convert strings (from the CLI) and lists (from JSON) to the annotated type."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin is typing.Union or str(origin) == "<class 'types.UnionType'>":
        if value is None or (isinstance(value, str) and value.lower() == "none"):
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], name, method)
    if origin is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        elem = args[0] if args else str
        return tuple(_coerce(v, elem, name, method) for v in value)
    if hint is bool:
        if isinstance(value, str):
            lowered = value.lower()
            if lowered in ("1", "true", "yes", "on"):
                return True
            if lowered in ("0", "false", "no", "off"):
                return False
            raise ValueError(
                f"option '{name}' of method '{method}' expects a boolean, got {value!r}"
            )
        return bool(value)
    if hint in (int, float, str):
        try:
            return hint(value)
        except (TypeError, ValueError):
            raise ValueError(
                f"option '{name}' of method '{method}' expects {hint.__name__}, got {value!r}"
            ) from None
    return value


def is_dataclass_config(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and isinstance(obj, MethodConfig)
