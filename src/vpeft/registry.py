"""The method registry: ``@register`` binds a config dataclass to its method class."""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from vpeft.core.config import MethodConfig
    from vpeft.core.method import Method

_METHODS: dict[str, type[Method]] = {}
_ALIASES: dict[str, str] = {}  # old name -> registered name
# prefix -> (resolve a member name to its class, the members that list_methods() shows)
_FAMILIES: dict[str, tuple[Callable[[str], type[Method]], Callable[[], list[str]]]] = {}
_loaded = False


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make a :class:`~vpeft.core.method.Method` available by its ``name``."""
    name = cls.name
    if not name or cls.config_cls is None:
        raise TypeError(f"{cls.__name__} needs a `name` and a `config_cls` to be registered")
    if name in _METHODS and _METHODS[name] is not cls:
        raise ValueError(f"method '{name}' is registered twice ({_METHODS[name]} and {cls})")
    cls.config_cls.method = name
    _METHODS[name] = cls
    return cls


def register_alias(alias: str, name: str) -> None:
    """Let ``alias`` (an old name) resolve to the method ``name``."""
    _ALIASES[_key(alias)] = _key(name)


def register_family(
    prefix: str, resolve: Callable[[str], type[Method]], members: Callable[[], list[str]]
) -> None:
    """Make every name ``<prefix>:<member>`` resolve through ``resolve(member)``, which returns a
    method class (registered here on first use) or raises ``KeyError`` naming the valid members;
    ``members()`` lists the members that :func:`list_methods` shows."""
    _FAMILIES[prefix] = (resolve, members)


def _key(name: str) -> str:
    return name.strip().lower().replace("_", "-")


def _load_builtin() -> None:
    """Import every module under ``vpeft.methods`` so that their ``@register`` runs."""
    global _loaded
    if _loaded:
        return
    _loaded = True
    import vpeft.methods as pkg

    for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
        importlib.import_module(info.name)


def get_method(name: str) -> type[Method]:
    _load_builtin()
    key = _ALIASES.get(_key(name), _key(name))
    if key not in _METHODS:
        prefix, sep, member = key.partition(":")
        if sep and prefix in _FAMILIES:
            cls = _FAMILIES[prefix][0](member)
            return _METHODS[key] if key in _METHODS else register(cls)
        families = "".join(f", {p}:<name>" for p in sorted(_FAMILIES))
        raise KeyError(f"unknown method '{name}'; available methods: "
                       f"{', '.join(sorted(_METHODS))}{families}")
    return _METHODS[key]


def make_config(method: str | MethodConfig, **options: Any) -> MethodConfig:
    """Resolve a method name plus options, or a config object, to a config object.

    Options given next to a config object must agree with it: ``LoRAConfig(rank=4)`` with
    ``rank=8`` raises rather than silently picking one (repeating the same value is fine).
    """
    from vpeft.core.config import MethodConfig

    if not isinstance(method, MethodConfig):
        return get_method(method).config_cls.from_dict(options)
    if not options:
        return method
    resolved = method.replace(**options)  # coerces the options and rejects unknown ones
    mine, theirs = method.to_dict(), resolved.to_dict()
    conflicts = [f"{k}={mine[k]!r} in the config but {k}={options[k]!r} as an option"
                 for k in options if mine[k] != theirs[k]]
    if conflicts:
        raise ValueError(f"conflicting values for method '{method.method}': "
                         + "; ".join(conflicts) + "; give each option once")
    return method


def config_classes() -> dict[str, type[MethodConfig]]:
    """Config classes by class name (``LoRAConfig`` ...), for ``vpeft.<Name>Config``."""
    _load_builtin()
    return {m.config_cls.__name__: m.config_cls for m in _METHODS.values()}


@dataclass(frozen=True)
class MethodInfo:
    """A row of ``vpeft.list_methods()``: a method's place in the taxonomy, its characteristics."""

    name: str
    family: str
    subfamily: str
    mergeable: bool
    structure_preserving: bool
    inference_overhead: bool
    memory_saving: bool
    requires: tuple[str, ...]  # packages the method needs (``vpeft[bench]`` extras ...)
    searchable: bool  # ``vpeft search --method`` can search it
    summary: str

    def as_dict(self) -> dict[str, Any]:
        return {**self.__dict__, "requires": list(self.requires)}


def missing_requirements(name: str) -> list[str]:
    """Packages that method ``name`` declares in ``requires`` and that are not installed."""
    return get_method(name).missing_requirements()


def list_methods() -> list[MethodInfo]:
    """Every registered method with its family and characteristics, in taxonomy order."""
    _load_builtin()
    for prefix, (_, members) in _FAMILIES.items():
        for member in members():
            get_method(f"{prefix}:{member}")
    order = {"reference": 0, "addition": 1, "partial": 2, "unified": 3, "temporal": 4}
    rows = [m.info() for m in _METHODS.values()]
    return sorted(rows, key=lambda r: (order.get(r.family, 9), r.subfamily, r.name))
