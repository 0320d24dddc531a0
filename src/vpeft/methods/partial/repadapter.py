"""RepAdapter (Luo et al., 2023, arXiv:2302.08106): a linear adapter merged into the next layer.

A sequential adapter with *no* nonlinearity sits on the input of the attention and of the MLP:

    x' = x + s * (B (A x + a) + b)          A: dense (h x D), B: group-wise (D x h, g groups)

Being affine, it folds into the first Linear that reads ``x'`` (the fused ``qkv`` and ``fc1``):
with ``M = I + s B A``, ``W' = W M`` and ``c' = c + s W (B a + b)``, so the merged model is the
plain backbone (structural re-parameterisation). Unmerging inverts ``M`` with the Woodbury
identity, ``M^-1 = I - s B (I + s A B)^-1 A``, which only needs an ``h x h`` solve.

It is filed under partial/reparameterization although it is built like an adapter: what it leaves
behind is a reparameterised ``qkv``/``fc1`` weight, with zero inference overhead, like LoRA (the
guide's taxonomy layout puts it here too).

Defaults follow the official code: h = 8, g = 2, dropout 0.1 between A and B, A Xavier-uniform,
B and both biases zero (so the adapted model starts equal to the base), adapters before both
attention and MLP ("RepAdapter", not the attention-only variant). ViT-B/16: 239,808 trainable
parameters besides the head (the paper reports 0.22M, which is the count of the weights alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView, MissingPartError
from vpeft.core.config import MethodConfig, option
from vpeft.core.surgery import Wrapper, wrap
from vpeft.methods.partial.base import Reparameterization
from vpeft.registry import register


@dataclass
class RepAdapterConfig(MethodConfig):
    dim: int = option(8, "Hidden width h of the adapter.")
    groups: int = option(2, "Groups g of the up-projection B (block-diagonal, sparse).")
    scale: float = option(1.0, "Scale s of the adapter branch (searched per task in the paper).")
    dropout: float = option(0.1, "Dropout between A and B (training only; merging ignores it).")
    positions: tuple[str, ...] = option(("attn", "mlp"), "Sub-layers whose input gets an adapter.")

    def validate(self) -> None:
        if self.dim < 1 or self.groups < 1 or self.dim % self.groups:
            raise ValueError(f"repadapter dim ({self.dim}) must be a positive multiple of groups "
                             f"({self.groups})")
        if not self.positions or set(self.positions) - {"attn", "mlp"}:
            raise ValueError(f"repadapter positions must be among ('attn', 'mlp'), "
                             f"got {self.positions}")


class RepAdaptedLinear(Wrapper):
    """``base(x + s * (B (A x + a) + b))``; ``fold`` merges the adapter into ``base``."""

    base: nn.Linear

    def __init__(self, base: nn.Linear, hidden: int, groups: int, scale: float,
                 dropout: float) -> None:
        super().__init__(base)
        dim = base.in_features
        if dim % groups:
            raise ValueError(f"repadapter groups ({groups}) must divide the width {dim}")
        self.groups, self.scale = groups, scale
        self.down = nn.Parameter(base.weight.new_empty(hidden, dim))
        self.down_bias = nn.Parameter(base.weight.new_zeros(hidden))
        # B as g blocks: output group j (dim/g rows) reads only hidden group j (h/g channels)
        self.up = nn.Parameter(base.weight.new_zeros(groups, dim // groups, hidden // groups))
        self.up_bias = nn.Parameter(base.weight.new_zeros(dim))
        nn.init.xavier_uniform_(self.down)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def dense_up(self) -> torch.Tensor:
        """B as a dense ``(D, h)`` matrix (block-diagonal)."""
        return torch.block_diag(*self.up.unbind(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(F.linear(x, self.down, self.down_bias))  # (..., h)
        h = torch.einsum("...gi,goi->...go", h.unflatten(-1, (self.groups, -1)), self.up)
        return self.base(x + self.scale * (h.flatten(-2) + self.up_bias))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``s B``, ``A`` and the branch's constant ``s (B a + b)``, in float64 for exact folds."""
        sb = self.scale * self.dense_up().double()
        shift = sb @ self.down_bias.double() + self.scale * self.up_bias.double()
        return sb, self.down.double(), shift

    def fold_adds_bias(self) -> bool:
        return self.base.bias is None  # the branch's constant s (B a + b) becomes W-mapped bias

    @torch.no_grad()
    def fold(self) -> nn.Module:
        sb, a, shift = self._factors()
        w = self.base.weight.double()
        merged = w + (w @ sb) @ a  # W (I + s B A)
        if self.base.bias is None:
            self.base.bias = nn.Parameter(w.new_zeros(w.shape[0]).to(self.base.weight.dtype),
                                          requires_grad=False)
        self.base.bias += (w @ shift).to(self.base.bias.dtype)
        self.base.weight.copy_(merged)
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        sb, a, shift = self._factors()
        merged = self.base.weight.double()
        eye = torch.eye(a.shape[0], dtype=merged.dtype, device=merged.device)
        # W = W' (I + sBA)^-1 = W' - W' sB (I + A sB)^-1 A   (Woodbury)
        w = merged - (merged @ sb) @ torch.linalg.solve(eye + a @ sb, a)
        self.base.bias -= (w @ shift).to(self.base.bias.dtype)
        self.base.weight.copy_(w)


def input_linear(model: nn.Module, view: BackboneView, i: int, part: str) -> str:
    """Path of the Linear that reads ``part``'s input in block ``i`` (fused qkv, or fc1)."""
    if part == "attn":
        view.require("qkv", method="repadapter")
        return view.block_part(i, "qkv")
    root = view.block_part(i, "mlp")
    for name, m in model.get_submodule(root).named_modules():
        if isinstance(m, nn.Linear):  # the MLP's first Linear is the one fed by its input
            return f"{root}.{name}"
    raise MissingPartError(f"method 'repadapter' found no Linear in {root}")


@register
class RepAdapter(Reparameterization):
    """RepAdapter: linear group-wise adapters before attention and MLP, merged into qkv / fc1."""

    name = "repadapter"
    config_cls = RepAdapterConfig

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: RepAdapterConfig = self.config
        default = RepAdapterConfig.__dataclass_fields__["positions"].default
        positions = view.sublayers(cfg.positions, default, self.name)  # ConvNeXt: MLP only
        for i in range(view.depth):
            for part in positions:
                wrap(model, input_linear(model, view, i, part),
                     lambda m: RepAdaptedLinear(m, cfg.dim, cfg.groups, cfg.scale, cfg.dropout))
