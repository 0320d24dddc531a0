"""ST-Adapter (Pan et al., NeurIPS 2022, arXiv:2206.13559): spatio-temporal adapters.

Before the attention of each chosen block, ``x = x + up(DWConv3D(down(x)))`` on the patch tokens
laid out as a ``(T, H, W)`` volume per clip (class and other prefix tokens are left as they are),
as in the official code (``linziyi96/st-adapter``): ``down`` and ``up`` Linears, a depthwise 3-D
convolution with kernel ``(3, 1, 1)`` (over time only) between them, no activation. The
convolution's weight and bias and both Linears' biases start at zero, so the adapted model starts
as the frame-wise base. The paper's ViT-B/16 setting, 12 adapters of width 384, is 7,110,144
parameters besides the head (the paper's 7.1M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.method import Method
from vpeft.core.surgery import Wrapper, wrap
from vpeft.core.temporal import current_frames, patch_layout, split_clips, token_grid
from vpeft.registry import register


@dataclass
class STAdapterConfig(MethodConfig):
    width: int = option(0, "Bottleneck width (0: half the block width, 384 on ViT-B as in the "
                           "paper).")
    kernel: tuple[int, int, int] = option((3, 1, 1), "Depthwise 3-D kernel over (T, H, W); odd "
                                                     "sizes.")
    blocks: tuple[int, ...] = option((), "Indices of the blocks with an adapter (empty: all).")

    def validate(self) -> None:
        if self.width < 0:
            raise ValueError(f"st-adapter width must be >= 0, got {self.width}")
        if len(self.kernel) != 3 or any(k < 1 or k % 2 == 0 for k in self.kernel):
            raise ValueError(f"st-adapter kernel must be three odd sizes, got {self.kernel}")


class STBranch(nn.Module):
    """``up(DWConv3D(down(patches)))`` of ``(B*T, N, D)`` tokens; zero on the prefix tokens."""

    def __init__(self, dim: int, width: int, kernel: tuple[int, int, int], num_prefix: int,
                 grid: tuple[int, int] | None) -> None:
        super().__init__()
        self.num_prefix, self.grid = num_prefix, grid
        self.down = nn.Linear(dim, width)
        self.conv = nn.Conv3d(width, width, kernel, padding=tuple(k // 2 for k in kernel),
                              groups=width)
        self.up = nn.Linear(width, dim)
        for t in (self.conv.weight, self.conv.bias, self.down.bias, self.up.bias):
            nn.init.zeros_(t)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        p = self.num_prefix
        h = self.down(x[:, p:])  # (B*T, HW, c)
        gh, gw = token_grid(h.shape[1], self.grid, "st-adapter")
        clips = split_clips(h, current_frames(), "st-adapter")  # (B, T, HW, c)
        B, T, _, c = clips.shape
        vol = clips.view(B, T, gh, gw, c).permute(0, 4, 1, 2, 3)  # (B, c, T, H, W)
        h = self.conv(vol).permute(0, 2, 3, 4, 1).reshape(B * T, gh * gw, c)
        return F.pad(self.up(h), (0, 0, p, 0))  # prefix tokens get no update


class PreBlock(Wrapper):
    """``block(x + branch(x))``: an adapter in front of a block (before its attention)."""

    def __init__(self, block: nn.Module, branch: nn.Module) -> None:
        super().__init__(block)
        self.branch = branch

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base(x + self.branch(x), *args, **kwargs)


@register
class STAdapter(Method):
    """ST-Adapter: bottleneck with a depthwise 3-D convolution over time, before attention."""

    name = "st-adapter"
    config_cls = STAdapterConfig
    family = "temporal"
    subfamily = "adapter"
    zero_init = True

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        num_prefix, grid = patch_layout(model, view, self.name)
        cfg: STAdapterConfig = self.config
        chosen = cfg.blocks or tuple(range(view.depth))
        bad = [i for i in chosen if not 0 <= i < view.depth]
        if bad:
            raise ValueError(f"st-adapter blocks {bad} are out of range for {view.depth} blocks")
        for i in sorted(set(chosen)):
            dim = view.block_dims[i]
            width = cfg.width or max(1, dim // 2)
            wrap(model, view.blocks[i], lambda m, d=dim, w=width: PreBlock(
                m, STBranch(d, w, cfg.kernel, num_prefix, grid)))
