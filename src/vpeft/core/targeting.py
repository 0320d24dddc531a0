"""Select modules by name pattern and type. Pure functions over ``named_modules``."""

from __future__ import annotations

import fnmatch
import re
from collections.abc import Iterable, Sequence

from torch import nn

from vpeft.backbones.base import BackboneView, MissingPartError

NORM_TYPES = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)


class TargetNotFoundError(MissingPartError):
    """A target pattern matched no module: the backbone lacks a part the method targets."""


def _matches(name: str, pattern: str) -> bool:
    """A pattern matches a dotted module name as a glob on the whole name or on its suffix.

    ``"qkv"`` matches ``blocks.3.attn.qkv``; ``"blocks.*.mlp.fc1"`` matches exactly that layer;
    ``"re:..."`` is a regular expression searched in the name.
    """
    if pattern.startswith("re:"):
        return re.search(pattern[3:], name) is not None
    return fnmatch.fnmatchcase(name, pattern) or fnmatch.fnmatchcase(name, "*." + pattern)


def find_modules(
    model: nn.Module,
    patterns: Sequence[str],
    types: type | tuple[type, ...] | None = None,
    within: Iterable[str] | None = None,
) -> list[str]:
    """Names of the modules matching any of ``patterns`` (and ``types``), in model order.

    ``within`` restricts the search to modules under those paths. Every pattern must match at
    least one module; otherwise :class:`TargetNotFoundError` says which, and lists what exists.
    """
    roots = list(within) if within is not None else None
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if name
        and (types is None or isinstance(m, types))
        and (roots is None or any(name == r or name.startswith(r + ".") for r in roots))
    ]
    selected: list[str] = []
    for pattern in patterns:
        hits = [name for name, _ in candidates if _matches(name, pattern)]
        if not hits:
            raise TargetNotFoundError(
                f"target pattern '{pattern}' matched no module"
                + (f" of type {_type_names(types)}" if types else "")
                + f"; candidates look like: {_examples([n for n, _ in candidates])}"
            )
        selected.extend(h for h in hits if h not in selected)
    order = {name: i for i, (name, _) in enumerate(candidates)}
    return sorted(selected, key=order.__getitem__)


def _type_names(types: type | tuple[type, ...]) -> str:
    types = types if isinstance(types, tuple) else (types,)
    return "/".join(t.__name__ for t in types)


def _examples(names: list[str], limit: int = 12) -> str:
    """Distinct names with block indices collapsed to ``*``, so the list stays short."""
    seen: list[str] = []
    for n in names:
        g = re.sub(r"\.\d+(?=\.|$)", ".*", n)
        if g not in seen:
            seen.append(g)
    more = f" ... (+{len(seen) - limit} more)" if len(seen) > limit else ""
    return ", ".join(seen[:limit]) + more if seen else "(none)"


def norm_params(model: nn.Module, view: BackboneView) -> list[nn.Parameter]:
    """Affine parameters of every normalisation layer outside the classifier heads (LN-Tune,
    DiffFit, Houlsby adapters' trained norms)."""
    return [
        p for name, m in model.named_modules()
        if isinstance(m, NORM_TYPES) and not view.in_head(name)
        for p in m.parameters(recurse=False)
    ]
