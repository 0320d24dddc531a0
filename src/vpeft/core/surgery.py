"""Module surgery by composition: wrap, replace and restore sub-modules; freeze and unfreeze."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn


class NotMergeableError(RuntimeError):
    """Raised when a method's modules cannot be folded into the base weights."""


class Wrapper(nn.Module):
    """Base class of every module that vpeft puts in place of an original one.

    The original module is kept, untouched, as ``self.base``; attribute reads that the wrapper does
    not define fall through to it, so code that inspects ``block.attn.num_heads`` keeps working.
    Mergeable wrappers implement :meth:`fold` (fold the update into ``base`` and return it) and
    :meth:`unfold` (take it back out of ``base``).
    """

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.base = base

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "base":
                raise
            return getattr(super().__getattr__("base"), name)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        raise NotMergeableError(f"{type(self).__name__} cannot be merged into the base weights")

    @torch.no_grad()
    def unfold(self) -> None:
        raise NotMergeableError(f"{type(self).__name__} cannot be unmerged")


def get_submodule(model: nn.Module, path: str) -> nn.Module:
    return model.get_submodule(path) if path else model


def replace_module(model: nn.Module, path: str, new: nn.Module) -> nn.Module:
    """Put ``new`` at ``path`` (dotted name) and return the module that was there."""
    if not path:
        raise ValueError("cannot replace the root module; wrap it from the outside instead")
    parent_path, _, child = path.rpartition(".")
    parent = get_submodule(model, parent_path)
    old = getattr(parent, child)
    setattr(parent, child, new)
    return old


def wrap(model: nn.Module, path: str, factory) -> Wrapper:
    """Replace the module at ``path`` by ``factory(original)`` and return the wrapper."""
    wrapper = factory(get_submodule(model, path))
    replace_module(model, path, wrapper)
    return wrapper


def wrappers(model: nn.Module) -> list[tuple[str, Wrapper]]:
    """Every outermost :class:`Wrapper` in ``model``, with its path."""
    found: list[tuple[str, Wrapper]] = []
    for name, module in model.named_modules():
        if isinstance(module, Wrapper) and not any(name.startswith(p + ".") for p, _ in found):
            found.append((name, module))
    return found


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


def mark_trainable(params: Iterable[nn.Parameter]) -> int:
    """Set ``requires_grad`` on ``params``; returns how many elements became trainable."""
    count = 0
    for p in params:
        p.requires_grad_(True)
        count += p.numel()
    return count
