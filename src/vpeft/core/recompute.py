"""Recompute cheap activations in the backward instead of storing them twice.

A method that trains through a Linear's weight (or a rank-r factor of its input) makes autograd
keep that Linear's input, which a frozen Linear does not need. Inside a ViT block those inputs
are mostly the outputs of a LayerNorm (qkv, fc1) or of the MLP's activation (fc2), whose own
backward already keeps *their* inputs. :func:`recompute_norm_and_act_outputs` stores, in place
of such an output, a note to recompute it from that input when the backward asks for it: an
elementwise pass, against an activation-sized tensor kept for the whole step (the MLP's hidden
activation is four times the width of the tokens).

It works through :func:`torch.autograd.graph.saved_tensors_hooks`, active during the model's
forward: a tensor about to be saved whose storage is a recorded output becomes
``(module, input)``, and is recomputed (under the same autocast state) on unpacking. Results are
bitwise those of the stored tensor; an input changed in place after the forward is refused.
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.autograd.graph import saved_tensors_hooks

#: modules whose output is cheap to recompute from an input their own backward keeps
RECOMPUTABLE: tuple[type[nn.Module], ...] = (nn.LayerNorm, nn.GELU)


class _Recompute:
    """What is saved instead of a recorded output: how to rebuild the tensor autograd saved."""

    __slots__ = ("autocast", "input", "module", "version", "view")

    def __init__(self, module: nn.Module, inp: torch.Tensor, saved: torch.Tensor) -> None:
        self.module, self.input, self.version = module, inp, inp._version
        self.view = (saved.size(), saved.stride(), saved.storage_offset())
        dev = inp.device.type
        self.autocast = (dev, torch.is_autocast_enabled(dev), torch.get_autocast_dtype(dev))

    def __call__(self) -> torch.Tensor:
        if self.input._version != self.version:
            raise RuntimeError(f"the input of {type(self.module).__name__} was modified in place "
                               "after the forward; it cannot be recomputed for the backward")
        dev, enabled, dtype = self.autocast
        with torch.no_grad(), torch.autocast(dev, dtype=dtype, enabled=enabled):
            out = self.module.forward(self.input)  # not __call__: no hooks, no second record
        return out.as_strided(*self.view)


class Recomputer:
    """Records the outputs of ``modules`` during a forward and swaps them out of autograd's
    saved tensors; ``enter``/``exit`` bracket the forward (as model hooks)."""

    def __init__(self) -> None:
        self.outputs: dict[int, tuple[weakref.ref, nn.Module, torch.Tensor]] = {}
        self.contexts: list[saved_tensors_hooks] = []
        self.swapped = 0  # saved tensors replaced by a recomputation so far

    def record(self, module: nn.Module, args: tuple, out: Any) -> None:
        if (self.contexts and torch.is_grad_enabled() and isinstance(out, torch.Tensor)
                and len(args) == 1 and isinstance(args[0], torch.Tensor)):
            self.outputs[out.untyped_storage().data_ptr()] = (weakref.ref(out), module, args[0])

    def pack(self, t: torch.Tensor) -> Any:
        if not self.outputs or t.layout != torch.strided:
            return t
        hit = self.outputs.get(t.untyped_storage().data_ptr())
        if hit is None:
            return t
        ref, module, inp = hit
        out = ref()
        # the very tensor the module returned (or a view of it), unchanged since
        if out is None or out.dtype != t.dtype or out._version != 0 or t._version != 0:
            return t
        self.swapped += 1
        return _Recompute(module, inp, t)

    @staticmethod
    def unpack(packed: Any) -> torch.Tensor:
        return packed() if isinstance(packed, _Recompute) else packed

    def enter(self, *_: Any) -> None:
        ctx = saved_tensors_hooks(self.pack, self.unpack)
        ctx.__enter__()
        self.contexts.append(ctx)

    def exit(self, *_: Any) -> None:
        if self.contexts:
            self.contexts.pop().__exit__(None, None, None)
        if not self.contexts:
            self.outputs.clear()


def recompute_norm_and_act_outputs(model: nn.Module, roots: Iterable[nn.Module]) -> Recomputer:
    """Recompute, in the backward of ``model``, the outputs of the LayerNorms and GELUs inside
    ``roots`` (a backbone's blocks) rather than keeping them where a later layer saves them.

    Exact (bitwise); costs one elementwise pass per recomputed tensor in the backward.
    """
    rec = Recomputer()
    for root in roots:
        for m in root.modules():
            if isinstance(m, RECOMPUTABLE):
                m.register_forward_hook(rec.record)
    model.register_forward_pre_hook(rec.enter)
    model.register_forward_hook(rec.exit, always_call=True)
    return rec


__all__ = ["RECOMPUTABLE", "Recomputer", "recompute_norm_and_act_outputs"]
