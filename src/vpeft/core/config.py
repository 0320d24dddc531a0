"""Method configurations: typed dataclasses that round-trip to JSON and reject unknown options."""

from __future__ import annotations

import dataclasses
import types
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
        owner = f"method '{cls.method}'"
        kwargs = {k: coerce(v, hints[k], k, owner) for k, v in values.items()}
        return cls(**kwargs)

    def replace(self, **changes: Any) -> MethodConfig:
        return self.from_dict({**self.to_dict(), **changes})

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check option values; subclasses extend with ``super().validate()``."""


_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
_NONE = ("none", "null", "")


def coerce(value: Any, hint: Any, name: str, owner: str = "") -> Any:
    """Convert a Python, JSON, YAML or command-line ``value`` to the annotated type ``hint``.

    The one set of rules for method options and training options, strict so that a typo never
    becomes a different setting: a bool is ``true``/``false`` (also ``0``/``1`` and the strings
    ``yes``/``no``/``on``/``off``), never ``2``; an int refuses ``8.7`` (``8.0`` is 8) and bools; a
    float takes ints; a tuple takes a list or a comma-separated string; ``X | None`` takes
    ``None`` / ``"none"``. ``owner`` (e.g. ``"method 'lora'"``) makes the error name where the
    option belongs. Other annotations (dicts, classes) are returned unchanged.
    """
    where = f"option '{name}'" + (f" of {owner}" if owner else "")
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin is typing.Union or isinstance(hint, types.UnionType):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE):
            return None
        inner = [a for a in args if a is not type(None)]
        return coerce(value, inner[0], name, owner) if len(inner) == 1 else value
    if origin is tuple or hint is tuple:
        if isinstance(value, str):
            value = [v for v in value.replace(",", " ").split() if v]
        if not isinstance(value, (list, tuple)):
            raise ValueError(f"{where} expects a list or comma-separated values, got {value!r}")
        elem = args[0] if args else str
        return tuple(coerce(v, elem, name, owner) for v in value)
    if hint is bool:
        return _to_bool(value, where)
    if hint is int:
        return _to_int(value, where)
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, str)):
            raise ValueError(f"{where} expects a number, got {value!r}")
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{where} expects float, got {value!r}") from None
    if hint is str:
        if isinstance(value, bool) or not isinstance(value, (str, int, float)):
            raise ValueError(f"{where} expects str, got {value!r}")
        return str(value)
    return value


def _to_bool(value: Any, where: str) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):  # `train_head=1` reads as YAML int 1
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    raise ValueError(f"{where} expects true or false, got {value!r}")


def _to_int(value: Any, where: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"{where} expects int, got {value!r}")
    if isinstance(value, str):
        text = value.strip()
        try:
            return int(text)
        except ValueError:
            try:
                value = float(text)  # "8.0" from a command line is 8; "8.7" is refused below
            except ValueError:
                raise ValueError(f"{where} expects int, got {value!r}") from None
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{where} expects an integer, got {value!r}")
        return int(value)
    if isinstance(value, int):
        return value
    raise ValueError(f"{where} expects int, got {value!r}")


def is_dataclass_config(obj: Any) -> bool:
    return dataclasses.is_dataclass(obj) and isinstance(obj, MethodConfig)
