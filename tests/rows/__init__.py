"""Rows of the shared method test matrix, one module per taxonomy branch (or backbone family).

A row names a registered method, the options it is tested with, the tiny backbone kinds it runs
on, and its closed-form count of trainable parameters *without the head* as a function of the
backbone's dimensions.

Backbone families. ``Row.backbones`` lists kinds of ``conftest.TINY`` (one tiny random model
each); the default is the plain-ViT kinds, whose counts are written with ``D``, ``L``, ``H``.
A row for another family lists that family's kinds (``conftest.kinds_of("swin")`` or the
constants below) and writes its count with the per-block fields, which hold for every family:
``widths[i]`` / ``hiddens[i]`` are block ``i``'s token width and MLP hidden width (they differ
per stage on Swin and ConvNeXt). A family whose closed form needs layer shapes that no field
holds (kernel sizes of a CNN) reads them from ``Dims.model``, the untouched tiny base model:
the count still comes from the architecture, never from the adapted model. One method with
different counts per family is several rows (one per family) or one row whose count branches
on ``Dims.family``. Every method x family pair that has no row is still checked by
``tests/test_backbones.py``: it runs or raises ``MissingPartError``.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch import nn

VIT = ("vit", "deit-distilled", "vit-avgpool-reg")  # the default kinds of a row
VIT_NOBIAS = ("vit-nobias",)  # attention without q/k/v biases
VIT_LS_PRENORM = ("vit-ls-prenorm",)  # layer scale, pre-norm (its rows: each method's first)
EVA = ("eva", "eva-separate")
SWIN = ("swin", "swinv2")
CONVNEXT = ("convnext",)


@dataclass(frozen=True)
class Dims:
    """Dimensions of a tiny backbone, as the closed-form formulas need them."""

    D: int  # embedding width (the first stage's width on hierarchical models)
    L: int  # number of blocks
    H: int  # MLP hidden width (the first block's)
    heads: int
    prefix: int  # class/distillation/register tokens
    patches: int  # patch tokens
    patch: int  # patch size
    C: int = 3  # image channels
    img: int = 32  # image side
    ln_final: int = 1  # LayerNorms after the blocks (norm or fc_norm) with weights
    family: str = "vit"  # the view's family
    qkv_bias: bool = True  # the attention's q/k/v projections have biases
    qkv_fused: bool = True  # one qkv Linear (False: separate q, k, v projections)
    layer_scale: bool = False  # ViT blocks scale both branches by learned gammas (DeiT-III)
    norm_pre: bool = False  # a LayerNorm before the blocks and a patch conv without bias (CLIP)
    widths: tuple[int, ...] = ()  # per block: token width
    hiddens: tuple[int, ...] = ()  # per block: MLP hidden width
    model: nn.Module | None = field(default=None, compare=False, repr=False)  # tiny base


@dataclass(frozen=True)
class Row:
    method: str
    count: Callable[[Dims], int]  # trainable params without head, closed form
    options: dict[str, Any] = field(default_factory=dict)
    zero_init: bool | None = None  # None: take the method's own claim
    backbones: tuple[str, ...] = VIT  # kinds of conftest.TINY

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}[{opts}]" if opts else self.method


def all_rows() -> list[Row]:
    rows: list[Row] = []
    for info in pkgutil.iter_modules(__path__):
        rows.extend(importlib.import_module(f"{__name__}.{info.name}").ROWS)
    return rows
