"""Token grids: a block's tensor as ``(B, N, C)`` tokens on a 2-D grid, whatever its layout.

Methods that convolve over positions (Mona) or add a side stream to a block's output (E3VA) work
on tokens; the view's ``block_layout`` says how a family's blocks hold them: ``'tokens'``
``(B, N, D)`` with the prefix (class, distillation, register) tokens first, or ``'nhwc'`` /
``'nchw'`` maps (Swin, ConvNeXt and CNNs).
"""

from __future__ import annotations

import math

import torch

LAYOUTS = ("tokens", "nhwc", "nchw")


def to_tokens(x: torch.Tensor, layout: str) -> tuple[torch.Tensor, tuple[int, int] | None]:
    """``(B, N, C)`` tokens of ``x`` and its map's ``(H, W)`` (``None`` for token sequences)."""
    if layout == "tokens":
        return x, None
    if layout == "nhwc":
        return x.flatten(1, 2), (x.shape[1], x.shape[2])
    if layout == "nchw":
        return x.flatten(2).transpose(1, 2), (x.shape[2], x.shape[3])
    raise ValueError(f"unknown block layout {layout!r}; choose from {LAYOUTS}")


def from_tokens(t: torch.Tensor, like: torch.Tensor, layout: str) -> torch.Tensor:
    """Undo :func:`to_tokens`: ``t`` ``(B, N, C)`` back into the layout and shape of ``like``."""
    if layout == "nchw":
        return t.transpose(1, 2).reshape(like.shape)
    return t.reshape(like.shape)


def patch_grid(n: int, grid: tuple[int, int] | None) -> tuple[int, int]:
    """The ``(h, w)`` grid of ``n`` patch tokens: ``grid`` where it fits, else a square one."""
    if grid is not None and grid[0] * grid[1] == n:
        return tuple(grid)
    side = math.isqrt(n)  # another input size: assume a square grid
    if side * side != n:
        raise ValueError(f"cannot lay {n} patch tokens on a 2-D grid")
    return side, side


def split_grid(t: torch.Tensor, num_prefix: int, grid: tuple[int, int] | None
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens ``(B, P + h w, C)`` -> prefix tokens ``(B, P, C)`` and the patch image
    ``(B, C, h, w)``."""
    prefix, patches = t[:, :num_prefix], t[:, num_prefix:]
    gh, gw = patch_grid(patches.shape[1], grid)
    return prefix, patches.transpose(1, 2).unflatten(2, (gh, gw))


def join_grid(prefix: torch.Tensor, img: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`split_grid`."""
    return torch.cat([prefix, img.flatten(2).transpose(1, 2)], dim=1)


__all__ = ["LAYOUTS", "from_tokens", "join_grid", "patch_grid", "split_grid", "to_tokens"]
