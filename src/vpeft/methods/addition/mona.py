"""Mona (Yin et al., CVPR 2025, arXiv:2408.08345, "5%>100%"): multi-cognitive visual adapters.

As in the official code (``Leiyi-Hu/mona``, ``swin_transformer_mona.py``), every block gets two
Monas, each a residual module on the block's residual stream: one right after the attention's
residual add, one after the MLP's::

    x = x + attn(norm1(x));  x = mona1(x)
    x = x + mlp(norm2(x));   x = mona2(x)

    mona(x) = x + up(dropout(gelu(op(down(LN(x) * s1 + x * s2)))))
    op(z)   = p + proj(p),   p = (dw3(z) + dw5(z) + dw7(z)) / 3 + z

``s1`` starts at 1e-6 and ``s2`` at 1 (per channel), ``dw3/5/7`` are depthwise convolutions over
the token grid, ``proj`` a 1 x 1 convolution, the bottleneck is 64 wide and the dropout 0.1. The
official code initialises the projections with its backbone's ``_init_weights`` (truncated
normal, std 0.02, zero bias) and the convolutions with PyTorch's defaults: the up-projection is
*not* zero, so the adapted model does not start exactly equal to the base (``zero_up=True``
starts it at zero instead, then ``zero_init`` holds).

Here the first Mona is applied where the residual stream enters the MLP sub-layer: the MLP's norm
(``norm2``) reads ``x + d`` with ``d = mona1's update``, and ``d`` is added to the block's output,
which is the same as replacing ``x`` by ``x + d`` on both paths. (On res-post-norm blocks,
SwinV2, ``norm2`` follows the MLP, so there the first Mona reads the MLP's output instead.)
Prefix tokens (class, distillation, registers) have no place on the grid: each is convolved as
an image of its own (1 x 1, zero padding), i.e. by the centre taps only. ConvNeXt blocks have no
attention: one Mona after each block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.grid import from_tokens, join_grid, split_grid, to_tokens
from vpeft.core.method import Method
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register

KERNELS = (3, 5, 7)


@dataclass
class MonaConfig(MethodConfig):
    dim: int = option(64, "Bottleneck width (64 in the official code, for every backbone size).")
    dropout: float = option(0.1, "Dropout after the GELU (0.1 officially).")
    positions: tuple[str, ...] = option(("attn", "mlp"), "After which residual adds a Mona "
                                                         "sits: the attention's and/or the MLP's.")
    zero_up: bool = option(False, "Start the up-projection at zero, so the model starts as the "
                                  "base (the official code does not).")
    recompute: bool = option(True, "Keep only each Mona's input for the backward and run the "
                                   "Mona again there (exact, dropout masks included): its 64-wide "
                                   "maps and two token-wide tensors are not stored, for one more "
                                   "Mona forward per step.")

    def validate(self) -> None:
        if self.dim < 1:
            raise ValueError(f"mona dim must be >= 1, got {self.dim}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"mona dropout must be in [0, 1), got {self.dropout}")
        if not self.positions or set(self.positions) - {"attn", "mlp"}:
            raise ValueError(f"mona positions must be among ('attn', 'mlp'), got {self.positions}")


class MonaOp(nn.Module):
    """Depthwise 3/5/7 convolutions averaged plus identity, then a 1 x 1 projector plus
    identity, on ``(B, c, h, w)`` images."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.convs = nn.ModuleList(
            nn.Conv2d(channels, channels, k, padding=k // 2, groups=channels) for k in KERNELS)
        self.projector = nn.Conv2d(channels, channels, 1)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        p = sum(conv(z) for conv in self.convs) / len(self.convs) + z
        return p + self.projector(p)

    def isolated(self, t: torch.Tensor) -> torch.Tensor:
        """The same on tokens ``(B, P, c)`` that are each a 1 x 1 image (the centre taps)."""
        taps = sum(c.weight[:, 0, c.kernel_size[0] // 2, c.kernel_size[1] // 2] for c in self.convs)
        bias = sum(c.bias for c in self.convs)
        p = (t * taps + bias) / len(self.convs) + t
        return p + F.linear(p, self.projector.weight[:, :, 0, 0], self.projector.bias)


class MonaLayer(nn.Module):
    """The update ``mona(x) - x`` on tokens ``(B, N, C)`` whose last ``h w`` lie on a grid."""

    def __init__(self, dim: int, hidden: int, dropout: float, zero_up: bool,
                 recompute: bool = False) -> None:
        super().__init__()
        self.recompute = recompute
        self.norm = nn.LayerNorm(dim)
        self.gamma = nn.Parameter(torch.full((dim,), 1e-6))  # s1, on the normalised input
        self.gammax = nn.Parameter(torch.ones(dim))  # s2, on the raw input
        self.down = nn.Linear(dim, hidden)
        self.op = MonaOp(hidden)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = nn.Linear(hidden, dim)
        for lin in (self.down, self.up):
            nn.init.trunc_normal_(lin.weight, std=0.02)
            nn.init.zeros_(lin.bias)
        if zero_up:
            nn.init.zeros_(self.up.weight)

    def forward(self, x: torch.Tensor, num_prefix: int, grid: tuple[int, int] | None
                ) -> torch.Tensor:
        if self.recompute and torch.is_grad_enabled():
            # torch's activation checkpointing: saves x, replays the forward (and the dropout's
            # random state) in the backward
            return checkpoint(self.update, x, num_prefix, grid, use_reentrant=False)
        return self.update(x, num_prefix, grid)

    def update(self, x: torch.Tensor, num_prefix: int, grid: tuple[int, int] | None
               ) -> torch.Tensor:
        """``mona(x) - x``, every activation kept for the backward."""
        h = self.down(self.norm(x) * self.gamma + x * self.gammax)  # (B, N, c)
        prefix, img = split_grid(h, num_prefix, grid)
        h = join_grid(self.op.isolated(prefix), self.op(img))
        return self.up(self.dropout(F.gelu(h)))


class Grid:
    """The patch grid of the current block (its maps' ``(H, W)``, or the patch embedding's)."""

    def __init__(self, grid: tuple[int, int] | None) -> None:
        self.default, self.current = grid, grid


class MonaBeforeMLP(Wrapper):
    """The MLP's norm reading ``x + d``, ``d = mona1(x) - x``; ``d`` kept for the block."""

    def __init__(self, base: nn.Module, layer: MonaLayer, num_prefix: int, grid: Grid) -> None:
        super().__init__(base)
        self.mona = layer
        self.num_prefix = num_prefix
        self.__dict__["grid"] = grid
        self.__dict__["delta"] = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        d = self.mona(x, self.num_prefix, self.grid.current)
        self.__dict__["delta"] = d
        return self.base(x + d)


class MonaBlock(Wrapper):
    """``block(x)`` plus the first Mona's update (if any), then the second Mona."""

    def __init__(self, base: nn.Module, layer: MonaLayer | None, layout: str, num_prefix: int,
                 grid: Grid, before_mlp: MonaBeforeMLP | None) -> None:
        super().__init__(base)
        self.mona = layer
        self.layout, self.num_prefix = layout, num_prefix
        self.__dict__["grid"] = grid
        self.__dict__["before_mlp"] = before_mlp

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.grid.current = to_tokens(x, self.layout)[1] or self.grid.default
        y = self.base(x, *args, **kwargs)
        if self.before_mlp is not None:
            d = self.before_mlp.delta
            if d is None:
                raise RuntimeError("mona: the block's MLP norm did not run")
            self.before_mlp.__dict__["delta"] = None
            y = y + d.reshape(y.shape)  # (B, N, C) or, in Swin, the same tokens as (B, H, W, C)
        if self.mona is not None:
            t, _ = to_tokens(y, self.layout)
            y = y + from_tokens(self.mona(t, self.num_prefix, self.grid.current), y, self.layout)
        return y


@register
class Mona(Method):
    """Mona: multi-cognitive adapters (scaled LN, depthwise 3/5/7 convs) after attention and MLP."""

    name = "mona"
    config_cls = MonaConfig
    family = "addition"
    subfamily = "adapter"

    @property
    def zero_init(self) -> bool:  # type: ignore[override]
        return self.config.zero_up

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: MonaConfig = self.config
        view.require("block_layout", method=self.name)  # convolutions need a grid of tokens
        positions = view.sublayers(cfg.positions, MonaConfig.positions, self.name)
        if "attn" in positions:
            view.require("norms", method=self.name)
        embed = model.get_submodule(view.patch_embed) if view.patch_embed else None
        patches = getattr(embed, "grid_size", None)
        prefix = view.num_prefix_tokens if view.block_layout == "tokens" else 0
        for i, path in enumerate(view.blocks):
            w, grid = view.block_dims[i], Grid(tuple(patches) if patches is not None else None)
            before = None
            if "attn" in positions:
                before = wrap(model, view.block_part(i, view.norms[-1]), lambda m, g=grid, w=w:
                              MonaBeforeMLP(m, self._layer(w), prefix, g))
            after = self._layer(w) if "mlp" in positions else None
            wrap(model, path, lambda b, a=after, g=grid, m=before: MonaBlock(
                b, a, view.block_layout, prefix, g, m))

    def _layer(self, width: int) -> MonaLayer:
        cfg: MonaConfig = self.config
        return MonaLayer(width, cfg.dim, cfg.dropout, cfg.zero_up, cfg.recompute)
