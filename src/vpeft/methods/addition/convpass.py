"""Convpass (Jie & Deng, 2022, arXiv:2207.07039): convolutional bypasses beside attention and MLP.

Each bypass is ``up(drop(act(conv3x3(act(down(x))))))`` on the sub-layer's (normalised) input and
is added in parallel: ``y = f(x) + s * convpass(x)``. The patch tokens are put back on their 2-D
grid for the 3x3 convolution, which restores the spatial prior a ViT lacks; each class /
distillation / register token is treated, as in the paper's code, as a 1x1 image of its own, so the
convolution reduces to its centre tap (plus bias) for it.

Defaults follow the official code: width 8, QuickGELU, dropout 0.1, ``down`` Xavier-uniform,
convolution initialised to the identity (centre tap ``I``), ``up`` zero so the model starts equal to
the base, bypasses beside both attention and MLP. The scale ``s`` is searched per task in the paper
(0.01 ... 100); we default to the code's own default, 1. On ViT-B/16 this is 327,552 trainable
parameters besides the head; the paper reports 0.33M.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import activation
from vpeft.methods.addition.adapter import BlockAdapterMethod
from vpeft.registry import register


@dataclass
class ConvpassConfig(MethodConfig):
    dim: int = option(8, "Width of the bypass (channels of the 3x3 convolution).")
    scale: float = option(1.0, "Scale s of the bypass output (searched per task in the paper).")
    positions: tuple[str, ...] = option(("attn", "mlp"), "Sub-layers with a bypass beside them.")
    act: str = option("quickgelu", "Activation before and after the convolution ('quickgelu' as "
                                    "the paper's CLIP-style code, or 'gelu', 'relu', ...).")
    dropout: float = option(0.1, "Dropout before the up-projection.")
    conv_init: str = option("identity", "'identity' (centre tap = I, the code's default) or "
                                        "'xavier'.")

    def validate(self) -> None:
        if self.dim < 1:
            raise ValueError(f"convpass dim must be >= 1, got {self.dim}")
        if not self.positions or set(self.positions) - {"attn", "mlp"}:
            raise ValueError(f"convpass positions must be among ('attn', 'mlp'), "
                             f"got {self.positions}")
        if self.conv_init not in ("identity", "xavier"):
            raise ValueError(f"convpass conv_init must be 'identity' or 'xavier', "
                             f"got {self.conv_init!r}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"convpass dropout must be in [0, 1), got {self.dropout}")


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``, the GELU approximation of CLIP that Convpass uses."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ConvBypass(nn.Module):
    """Down-project, 3x3 convolution over the patch grid, up-project. Input ``(B, N, D)``."""

    def __init__(self, dim: int, hidden: int, num_prefix: int, grid: tuple[int, int] | None,
                 act: str, dropout: float, conv_init: str) -> None:
        super().__init__()
        self.num_prefix, self.grid = num_prefix, grid
        self.down = nn.Linear(dim, hidden)
        self.conv = nn.Conv2d(hidden, hidden, 3, padding=1)
        self.up = nn.Linear(hidden, dim)
        self.act = QuickGELU() if act == "quickgelu" else activation(act)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        nn.init.xavier_uniform_(self.down.weight)
        nn.init.zeros_(self.down.bias)
        if conv_init == "identity":
            nn.init.zeros_(self.conv.weight)
            with torch.no_grad():
                self.conv.weight[:, :, 1, 1] = torch.eye(hidden)
        else:
            nn.init.xavier_uniform_(self.conv.weight)
        nn.init.zeros_(self.conv.bias)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def _grid(self, n: int) -> tuple[int, int]:
        if self.grid is not None and self.grid[0] * self.grid[1] == n:
            return self.grid
        side = math.isqrt(n)  # another input size: assume a square grid
        if side * side != n:
            raise ValueError(f"convpass cannot lay {n} patch tokens on a 2-D grid")
        return side, side

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(self.down(x))  # (B, N, c)
        p = self.num_prefix
        prefix, patches = h[:, :p], h[:, p:]
        gh, gw = self._grid(patches.shape[1])
        img = patches.transpose(1, 2).unflatten(2, (gh, gw))  # (B, c, gh, gw)
        patches = self.conv(img).flatten(2).transpose(1, 2)
        # a prefix token is a 1x1 image: with zero padding only the centre tap sees it
        prefix = F.linear(prefix, self.conv.weight[:, :, 1, 1], self.conv.bias)
        h = torch.cat([prefix, patches], dim=1)
        return self.up(self.dropout(self.act(h)))


@register
class Convpass(BlockAdapterMethod):
    """Convpass: parallel convolutional bypasses beside attention and MLP."""

    name = "convpass"
    config_cls = ConvpassConfig
    parallel = True

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        view.require("sequence_tokens", method=self.name)
        patch_embed = model.get_submodule(view.patch_embed) if view.patch_embed else None
        grid = getattr(patch_embed, "grid_size", None)
        self._tokens = (view.num_prefix_tokens, tuple(grid) if grid is not None else None)
        super().apply(model, view)

    def branch(self, dim: int) -> nn.Module:
        cfg: ConvpassConfig = self.config
        num_prefix, grid = self._tokens
        return ConvBypass(dim, cfg.dim, num_prefix, grid, cfg.act, cfg.dropout, cfg.conv_init)
