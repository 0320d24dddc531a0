"""Rows for the BatchNorm CNN family (ResNet, EfficientNet / MobileNet) and Conv-Adapter.

A CNN's closed forms need kernel shapes, so these counts read the layers of ``Dims.model`` (the
untouched tiny base model) and the view of it. The rows run on the CNN kinds that
``conftest.TINY`` defines (``CNN_KINDS``); ``tests/test_cnn.py`` runs the same checks on its own
tiny CNNs and imports the counts from here.
"""

from __future__ import annotations

from torch import nn

import vpeft
from vpeft.core.conv import is_depthwise

from rows import Row
from rows.layers import (
    backbone_count,
    bias_count,
    norm_affine_count,
    on_model,
    partial_k_count,
    ssf_count,
)

try:
    from conftest import TINY
except ImportError:  # imported outside the test session
    TINY = {}

CNN_KINDS = tuple(k for k in ("resnet", "resnext", "effnet") if k in TINY)


def _view(m: nn.Module):
    return vpeft.get_view(m)


def lora_conv_count(conv: nn.Conv2d, r: int) -> int:
    """A: ``r`` kernels of shape ``(in/g, kh, kw)`` per group; B: ``out x r``."""
    kh, kw = conv.kernel_size
    return conv.groups * r * (conv.in_channels // conv.groups) * kh * kw + conv.out_channels * r


def lora_default_count(m: nn.Module, r: int = 8, dora: bool = False,
                       grouped: bool = True) -> int:
    """LoRA's CNN default: block convs but depthwise ones, plus the conv feeding the head
    (``grouped=False``: also without grouped convs, as Hugging Face PEFT cannot merge those)."""
    view = _view(m)
    layers = [c for c in map(m.get_submodule, view.convs) if not is_depthwise(c)]
    if view.final_features:
        layers.append(m.get_submodule(view.final_features))
    layers = [c for c in layers if grouped or c.groups == 1]
    return sum(lora_conv_count(c, r) + (c.out_channels if dora else 0) for c in layers)


def conv_adapter_count(m: nn.Module, reduction: int = 4, k: int = 3, every: str = "block") -> int:
    """Per adapted block of width c (w = c / reduction): grouped k x k down (w kernels of
    reduction x k x k, plus bias), 1 x 1 up (c x w, plus bias) and alpha (c)."""
    view = _view(m)
    last = {f"{s}.{len(m.get_submodule(s)) - 1}" for s in view.stages}
    total = 0
    for block, c in zip(view.blocks, view.block_dims, strict=True):
        if every == "stage" and block not in last:
            continue
        w = c // reduction
        total += (w * reduction * k * k + w) + (c * w + c) + c
    return total


CONVNEXT = ("convnext",)  # ConvNeXt's stages take Conv-Adapter as a CNN's do

ROWS = [
    Row(m, on_model(c), o, backbones=CNN_KINDS) for m, o, c in [
        ("full", {}, backbone_count),
        ("linear", {}, lambda m: 0),
        ("bitfit", {}, bias_count),
        ("ln-tune", {}, norm_affine_count),  # BatchNorm weight and bias
        ("ssf", {}, ssf_count),  # inside every BatchNorm (the convs have no bias)
        ("ssf", {"init_std": 0.0}, ssf_count),
        ("lora", {}, lora_default_count),
        ("lora", {"rank": 2}, lambda m: lora_default_count(m, 2)),
        ("dora", {}, lambda m: lora_default_count(m, dora=True)),
        ("partial-k", {}, partial_k_count),
    ]
] + [
    Row("conv-adapter", on_model(conv_adapter_count), backbones=CNN_KINDS + CONVNEXT),
    Row("conv-adapter", on_model(lambda m: conv_adapter_count(m, 2, every="stage")),
        {"every": "stage", "reduction": 2}, backbones=CNN_KINDS + CONVNEXT),
]
