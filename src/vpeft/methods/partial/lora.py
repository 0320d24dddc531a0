"""LoRA (Hu et al., 2022, arXiv:2106.09685): a low-rank update ``B @ A`` of chosen Linear weights.

On a ViT's fused ``qkv`` layer only the chosen parts (default q and v, as the paper) get an update;
``B`` starts at zero so the adapted model starts equal to the base; merging adds
``alpha / rank * B @ A`` to the weight and leaves a plain ``nn.Linear``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import LinearUpdate, lowrank_
from vpeft.core.surgery import wrap
from vpeft.core.targeting import find_modules
from vpeft.methods.partial.base import Reparameterization
from vpeft.registry import register


@dataclass
class LoRAConfig(MethodConfig):
    rank: int = option(8, "Rank r of the update B @ A.")
    alpha: float | None = option(
        None, "Scale numerator: the update is alpha / r * B @ A (default: alpha = r, i.e. scale 1)."
    )
    dropout: float = option(0.0, "Dropout on the LoRA branch's input.")
    targets: tuple[str, ...] = option(
        ("qkv",),
        "Linear layers to adapt, by name pattern "
        "(glob on the dotted name or its suffix; 're:' for regex).",
    )
    qkv: str = option("qv", "Which of q, k, v get an update on fused qkv layers.")

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if not self.qkv or set(self.qkv) - set("qkv"):
            raise ValueError(f"lora qkv must be a non-empty subset of 'qkv', got {self.qkv!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


class LoRALinear(LinearUpdate):
    """``base(x) + scale * B(A(dropout(x)))`` on the output rows ``parts`` (``[(start, end)]``).

    The ``A`` matrices of all parts are stacked so that one matmul serves them all; each part's
    slice of the output then gets its own ``B``.
    """

    def __init__(
        self, base: nn.Linear, rank: int, scale: float, dropout: float, parts: list[tuple[int, int]]
    ) -> None:
        super().__init__(base)
        self.rank, self.scale, self.parts = rank, scale, parts
        self.lora_A = nn.Parameter(base.weight.new_empty(rank * len(parts), base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(sum(e - s for s, e in parts), rank))
        for i in range(len(parts)):
            lowrank_(self.lora_A.data[i * rank : (i + 1) * rank])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None
        self.full = parts == [(0, base.out_features)]

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = F.linear(self.dropout(x) if self.dropout is not None else x, self.lora_A)  # (..., P*r)
        if self.full:
            return torch.addmm(
                y.flatten(0, -2), u.flatten(0, -2), self.lora_B.t(), alpha=self.scale
            ).view_as(y)
        r, row = self.rank, 0
        for i, (s, e) in enumerate(self.parts):
            # y is the Linear's output, not saved for its backward: safe to update in place
            y[..., s:e] += self.scale * F.linear(
                u[..., i * r : (i + 1) * r], self.lora_B[row : row + e - s]
            )
            row += e - s
        return y

    def delta_weight(self) -> torch.Tensor:
        delta = torch.zeros_like(self.base.weight)
        r, row = self.rank, 0
        for i, (s, e) in enumerate(self.parts):
            delta[s:e] = (
                self.scale * self.lora_B[row : row + e - s] @ self.lora_A[i * r : (i + 1) * r]
            )
            row += e - s
        return delta


def output_parts(out_features: int, which: str, fused_qkv: bool) -> list[tuple[int, int]]:
    """Output row ranges to adapt: slices of q/k/v on a fused layer, else all rows."""
    if not fused_qkv:
        return [(0, out_features)]
    d = out_features // 3
    return [("qkv".index(c) * d, ("qkv".index(c) + 1) * d) for c in "qkv" if c in which]


@register
class LoRA(Reparameterization):
    """LoRA: low-rank updates of Linear weights (default: q and v of attention)."""

    name = "lora"
    config_cls = LoRAConfig

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: LoRAConfig = self.config
        fused = view.fused_qkv_paths()
        for path in find_modules(model, cfg.targets, nn.Linear):
            if any(path == h or path.startswith(h + ".") for h in view.heads):
                continue
            lin = model.get_submodule(path)
            parts = output_parts(lin.out_features, cfg.qkv, path in fused)
            wrap(model, path, lambda m, p=parts: LoRALinear(m, cfg.rank, cfg.scale, cfg.dropout, p))
