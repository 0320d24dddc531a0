"""Rows of the shared method test matrix, one module per taxonomy branch.

A row names a registered method, the options it is tested with, and its closed-form count of
trainable parameters *without the head* as a function of the backbone's dimensions.
"""

from __future__ import annotations

import importlib
import pkgutil
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Dims:
    """Dimensions of a ViT backbone, as the closed-form formulas need them."""

    D: int  # embedding width
    L: int  # number of blocks
    H: int  # MLP hidden width
    heads: int
    prefix: int  # class/distillation/register tokens
    patches: int  # patch tokens
    patch: int  # patch size
    C: int = 3  # image channels
    img: int = 32  # image side
    ln_final: int = 1  # LayerNorms after the blocks (norm or fc_norm) with weights


@dataclass(frozen=True)
class Row:
    method: str
    count: Callable[[Dims], int]  # trainable params without head, closed form
    options: dict[str, Any] = field(default_factory=dict)
    zero_init: bool | None = None  # None: take the method's own claim
    backbones: tuple[str, ...] = ("vit", "deit-distilled", "vit-avgpool-reg")

    @property
    def id(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}[{opts}]" if opts else self.method


def all_rows() -> list[Row]:
    rows: list[Row] = []
    for info in pkgutil.iter_modules(__path__):
        rows.extend(importlib.import_module(f"{__name__}.{info.name}").ROWS)
    return rows
