"""Prove that what a method injected is on the model's forward path.

A wrapper that the backbone never calls trains nothing and fails silently (timm's EVA attention
once read ``qkv.weight`` directly, bypassing a LoRA around ``qkv``). :func:`check_forward_path`
runs one tiny forward and names every wrapper that did not run.
"""

from __future__ import annotations

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.surgery import wrappers


class BypassedModuleError(ValueError):
    """A module a method injected is not called by the model's forward (a ``ValueError``, so the
    command line reports it in one line like the other refusals of a method on a backbone)."""


def probe_input(model: nn.Module, view: BackboneView) -> torch.Tensor:
    """One image of the size the model expects, on its device and in its floating dtype."""
    size = _input_size(model)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.zeros(1, view.in_chans, *size, device=device, dtype=dtype)


def check_forward_path(model: nn.Module, view: BackboneView, method: str = "") -> None:
    """Raise :class:`BypassedModuleError` naming each injected wrapper a forward does not call.

    One no-grad forward in eval mode on a zero image of the model's input size; the model's
    training mode is restored. Skipped for models on the ``meta`` device (nothing to compute).

    The same forward tells each wrapper whether the model changes its output in place after it
    returns (timm's ``qkv += bias``, an in-place ReLU after a Linear): the wrapper's
    ``output_changed_in_place`` is set, so a wrapper whose backward would keep its output (to
    save memory) keeps its input instead where that output does not survive.
    """
    found = wrappers(model)
    if not found or any(p.is_meta for p in model.parameters()):
        return
    called: set[str] = set()
    outputs: dict[str, tuple[torch.Tensor, int]] = {}

    def record(path: str, out: object) -> None:
        if isinstance(out, torch.Tensor):
            outputs[path] = (out, out._version)

    hooks = [
        w.register_forward_pre_hook(lambda m, a, path=path: called.add(path)) for path, w in found
    ] + [
        w.register_forward_hook(lambda m, a, out, path=path: record(path, out))
        for path, w in found
    ]
    was_training = model.training
    try:
        model.eval()
        with torch.no_grad():
            model(probe_input(model, view))
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    for path, w in found:
        if path in outputs:
            out, version = outputs[path]
            w.output_changed_in_place = out._version != version
    missed = [path for path, _ in found if path not in called]
    if missed:
        who = f"method '{method}'" if method else "the method"
        raise BypassedModuleError(
            f"{who} put modules that the forward of {type(model).__name__} (view "
            f"'{view.family}') never calls, so they would not train: {', '.join(missed)}"
        )


def _input_size(model: nn.Module) -> tuple[int, int]:
    """(H, W) from timm's pretrained config or the patch embedding; 224 x 224 otherwise."""
    patch_embed = getattr(model, "patch_embed", None)
    img = getattr(patch_embed, "img_size", None)
    if img:
        return tuple(img) if isinstance(img, (tuple, list)) else (img, img)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = cfg.get("input_size")
    return tuple(size[-2:]) if size else (224, 224)
