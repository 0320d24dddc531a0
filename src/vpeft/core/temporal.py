"""The time axis of a clip, as temporal methods (AIM, ST-Adapter) see it inside the backbone.

A clip model (:class:`vpeft.tasks.video.ClipModel`) runs the frames of ``B`` clips of ``T``
frames through an image backbone as one batch of ``B * T`` images, frame-major per clip
(``[clip0 frame0, clip0 frame1, ...]``). It announces ``T`` with :func:`clip_frames`; a temporal
module reads it with :func:`current_frames` and regroups its ``(B * T, N, D)`` tokens by clip.
Outside a clip (a plain image batch) ``T`` is 1: every image is a one-frame clip, so a temporal
method still runs (and, zero-initialised, computes what the base computes).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

import torch
from torch import nn

from vpeft.backbones.base import BackboneView

_FRAMES: ContextVar[int] = ContextVar("vpeft_clip_frames", default=1)


@contextmanager
def clip_frames(frames: int) -> Iterator[None]:
    """Within this block, batches are clips of ``frames`` frames (see the module docstring)."""
    if frames < 1:
        raise ValueError(f"a clip has at least one frame, got {frames}")
    token = _FRAMES.set(frames)
    try:
        yield
    finally:
        _FRAMES.reset(token)


def current_frames() -> int:
    """``T`` of the clips being run (1 outside :func:`clip_frames`)."""
    return _FRAMES.get()


def split_clips(x: torch.Tensor, frames: int, method: str = "") -> torch.Tensor:
    """``(B * T, ...) -> (B, T, ...)``; a batch that is not whole clips raises a clear error."""
    if x.shape[0] % frames:
        who = f"method '{method}': " if method else ""
        raise ValueError(f"{who}a batch of {x.shape[0]} frames is not a whole number of "
                         f"{frames}-frame clips")
    return x.view(x.shape[0] // frames, frames, *x.shape[1:])


def time_major(x: torch.Tensor, frames: int, method: str = "") -> torch.Tensor:
    """Tokens ``(B * T, N, D)`` -> one sequence over time per clip and token ``(B * N, T, D)``."""
    clips = split_clips(x, frames, method)  # (B, T, N, D)
    B, T, N, D = clips.shape
    return clips.transpose(1, 2).reshape(B * N, T, D)


def frame_major(x: torch.Tensor, tokens: int) -> torch.Tensor:
    """Inverse of :func:`time_major`: ``(B * N, T, D)`` -> ``(B * T, N, D)``."""
    BN, T, D = x.shape
    return x.view(BN // tokens, tokens, T, D).transpose(1, 2).reshape(-1, tokens, D)


def token_grid(n: int, grid: tuple[int, int] | None, method: str) -> tuple[int, int]:
    """The ``(rows, cols)`` of ``n`` patch tokens: the patch embedding's grid where it fits,
    else a square one; other counts raise."""
    if grid is not None and grid[0] * grid[1] == n:
        return grid
    side = math.isqrt(n)
    if side * side != n:
        raise ValueError(f"method '{method}' cannot lay {n} patch tokens on a 2-D grid")
    return side, side


def patch_layout(model: nn.Module, view: BackboneView, method: str
                 ) -> tuple[int, tuple[int, int] | None]:
    """``(prefix tokens, patch grid)`` of a token backbone; a backbone whose blocks do not take
    ``(B, N, D)`` token sequences (CNNs, Swin's 2-D maps) raises :class:`MissingPartError`."""
    view.require("blocks", "sequence_tokens", method=method)
    patch_embed = model.get_submodule(view.patch_embed) if view.patch_embed else None
    grid = getattr(patch_embed, "grid_size", None)
    return view.num_prefix_tokens, tuple(grid) if grid is not None else None
