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

    def fold_adds_bias(self) -> bool:
        """Whether :meth:`fold` must give the base module a bias it does not have (then the
        merged model no longer loads into the plain architecture)."""
        return False

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


def folds_add_bias(model: nn.Module) -> list[str]:
    """Paths of the wrappers whose fold would add a bias to a bias-less base module."""
    return [path for path, w in wrappers(model) if w.fold_adds_bias()]


def freeze(model: nn.Module) -> None:
    model.requires_grad_(False)


def mark_trainable(params: Iterable[nn.Parameter]) -> int:
    """Set ``requires_grad`` on ``params``; returns how many elements became trainable."""
    count = 0
    for p in params:
        p.requires_grad_(True)
        count += p.numel()
    return count


def follow_base(model: nn.Module, base_tensors: set[int]) -> None:
    """Move the tensors a method added onto the base model's device and floating dtype.

    ``base_tensors`` are the ids of the model's tensors before the method ran; everything else
    (new parameters and buffers) is moved, floating tensors cast, integer ones left in their
    dtype. Methods may then build their modules with plain ``nn.Linear(...)`` on the CPU.
    Tensors keep their identity where torch allows it (same kind of device); otherwise (onto
    ``meta``) they are replaced, a tensor shared by several modules by one shared replacement.
    """
    base = [t for t in (*model.parameters(), *model.buffers()) if id(t) in base_tensors]
    ref = next((t for t in base if t.is_floating_point()), base[0] if base else None)
    if ref is None:
        return
    done: dict[int, torch.Tensor] = {}
    for module in model.modules():
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if t is None or id(t) in base_tensors:
                    continue
                if id(t) not in done:
                    done[id(t)] = _moved(t, ref.device, ref.dtype)
                table[name] = done[id(t)]


def _moved(t: torch.Tensor, device: torch.device, float_dtype: torch.dtype) -> torch.Tensor:
    dtype = float_dtype if t.is_floating_point() else t.dtype
    if t.device == device and t.dtype == dtype:
        return t
    data = t.data.to(device=device, dtype=dtype)
    try:
        t.data = data  # in place: references a method kept to the tensor stay valid
        return t
    except RuntimeError:  # incompatible tensor types (e.g. onto meta): a new tensor
        done_ = nn.Parameter(data, requires_grad=t.requires_grad)
        return done_ if isinstance(t, nn.Parameter) else data
