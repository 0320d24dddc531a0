"""AIM (Yang et al., ICLR 2023, arXiv:2302.03024): adapting image models for video recognition.

In every block, three bottleneck adapters around the frozen layers (official code,
``taoyang1122/adapt-image-models``, ``vit_clip.py``):

* **temporal**: the block's own frozen self-attention re-used along the time axis, tokens
  ``(B*T, N, D) -> (B*N, T, D)``, followed by an adapter without skip, added to the residual
  stream before the block: ``x = x + T_adapter(attn_t(norm1(x)))``;
* **spatial**: an adapter after the (spatial) attention, with its skip:
  ``attn(z) + S_adapter(attn(z))``;
* **joint**: an adapter beside the MLP: ``x + mlp(xn) + s * MLP_adapter(xn)``, ``s = 0.5``.

Adapters are ``fc2(GELU(fc1(x)))`` of width ``0.25 D`` with ``fc2`` zero-initialised, so the
adapted model starts as the frame-wise base, plus one learned temporal position embedding
(``frames x D``). On ViT-B/16 with 8 frames that is 10,657,536 parameters besides the head
(10.97M with a Kinetics-400 head; the paper's 11M). A clip of another length than ``frames``
gets the embedding resampled linearly.

Where the embedding goes (``embed_at``) is the one departure from the official code, and why:

* ``'input'`` (the official code): zero-initialised, added to every token before the first block.
  At init the frozen attention over frames is permutation-equivariant and the clip model
  averages frames, so the model, and every adapter's gradient, is blind to frame order; order
  can enter only as (embedding x temporal up-projection), both zero: a saddle. On a label that
  only order decides (the generated zoom-in / zoom-out task, ``docs/benchmarks.md`` "Video")
  it stayed at chance.
* ``'temporal'`` (default): the same single embedding, random-initialised (std ``embed_std``,
  the scale of the normed tokens), added to the normed tokens every temporal attention reads,
  ``T_adapter(attn_t(norm1(x) + e))``. The frozen attention then weighs frames by position from
  the start, the temporal up-projections get an order-dependent gradient at the first step,
  and, ``fc2`` being zero, the model still starts as the frame-wise base.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import Bottleneck, Bypass
from vpeft.core.method import Method
from vpeft.core.surgery import Wrapper, wrap
from vpeft.core.temporal import (
    current_frames,
    frame_major,
    patch_layout,
    split_clips,
    time_major,
)
from vpeft.registry import register

PARTS = ("temporal", "spatial", "joint")
EMBED_AT = ("temporal", "input")


@dataclass
class AIMConfig(MethodConfig):
    ratio: float = option(0.25, "Bottleneck width of every adapter as a fraction of the block "
                                "width (the paper's 0.25).")
    joint_scale: float = option(0.5, "Scale s of the joint adapter beside the MLP (the code's "
                                     "0.5).")
    frames: int = option(8, "Length of the learned temporal position embedding (0: none); "
                            "clips of another length resample it.")
    parts: tuple[str, ...] = option(PARTS, "Which adapters: temporal, spatial, joint.")
    embed_at: str = option("temporal", "Where the temporal embedding goes: 'temporal' (inside "
                                       "every temporal attention, after its norm, random init) "
                                       "or 'input' (the official code: every token before the "
                                       "first block, zero init; see the module docstring).")
    embed_std: float = option(1.0, "Init std of the embedding with embed_at='temporal' (the "
                                   "scale of the normed tokens it is added to).")
    recompute: bool = option(True, "Keep only each temporal branch's input for the backward and "
                                   "run its norm, attention and adapter again there (activation "
                                   "checkpointing): training memory below full fine-tuning's.")

    def validate(self) -> None:
        if not 0 < self.ratio <= 4:
            raise ValueError(f"aim ratio must be in (0, 4], got {self.ratio}")
        if self.frames < 0:
            raise ValueError(f"aim frames must be >= 0, got {self.frames}")
        if not self.parts or set(self.parts) - set(PARTS):
            raise ValueError(f"aim parts must be among {PARTS}, got {self.parts}")
        if self.embed_at not in EMBED_AT:
            raise ValueError(f"aim embed_at must be one of {EMBED_AT}, got {self.embed_at!r}")
        if self.embed_at == "temporal" and self.frames and "temporal" not in self.parts:
            raise ValueError("aim embed_at='temporal' needs the temporal adapter in parts")
        if self.embed_std < 0:
            raise ValueError(f"aim embed_std must be >= 0, got {self.embed_std}")


class TemporalAttention(Wrapper):
    """A block preceded by ``x + adapter(attn(norm(x) [+ e]))`` along time, the attention and norm
    being the block's own frozen ones (held by reference: their weights stay in the block).

    ``embed`` is the temporal embedding ``(frames, D)``: this wrapper owns it (registers it as
    ``time_embed``) when ``own_embed``, else only uses it (the first block's, shared). With
    ``embed_at='input'`` the owner adds it to every token before the block; with ``'temporal'``
    every wrapper adds it to the normed tokens its temporal attention reads.
    """

    def __init__(self, block: nn.Module, attn: nn.Module, norm: nn.Module, dim: int,
                 hidden: int, embed: nn.Parameter | None = None, own_embed: bool = False,
                 embed_at: str = "temporal", recompute: bool = False) -> None:
        super().__init__(block)
        self.recompute = recompute
        self.adapter = Bottleneck(dim, hidden) if hidden else None
        object.__setattr__(self, "attn_t", attn)  # not registered: no second copy of the weights
        object.__setattr__(self, "norm_t", norm)
        self.embed_at = embed_at
        self.own_embed = own_embed
        if own_embed:
            self.time_embed = embed
        else:
            object.__setattr__(self, "time_embed", embed)

    def embedding(self, frames: int) -> torch.Tensor:
        """The temporal embedding for ``frames`` frames, ``(frames, D)``."""
        e = self.time_embed
        if e.shape[0] == frames:
            return e
        return F.interpolate(e.t()[None], size=frames, mode="linear",
                             align_corners=False)[0].t()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        frames = current_frames()
        e = self.embedding(frames) if self.time_embed is not None else None
        if e is not None and self.own_embed and self.embed_at == "input":
            clips = split_clips(x, frames, "aim")  # (B*T, N, D) + (T, D) per clip
            x = (clips + e[None, :, None, :]).view_as(x)
        if self.adapter is not None:
            if e is not None and self.embed_at != "temporal":
                e = None
            if self.recompute and torch.is_grad_enabled():
                # torch's activation checkpointing: only x (which the block's norm keeps anyway)
                # is saved; the norm, attention over time and adapter run again in the backward
                x = x + checkpoint(self.temporal, x, e, frames, use_reentrant=False)
            else:
                x = x + self.temporal(x, e, frames)
        return self.base(x, *args, **kwargs)

    def temporal(self, x: torch.Tensor, e: torch.Tensor | None, frames: int) -> torch.Tensor:
        """``adapter(attn(norm(x) [+ e]))`` along time, back in the frame-major layout."""
        xt = self.norm_t(time_major(x, frames, "aim"))  # (B*N, T, D)
        if e is not None:
            xt = xt + e
        return frame_major(self.adapter(self.attn_t(xt)), x.shape[1])


@register
class AIM(Method):
    """AIM: temporal, spatial and joint adapters re-using the frozen attention along time."""

    name = "aim"
    config_cls = AIMConfig
    family = "temporal"
    subfamily = "adapter"
    zero_init = True

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        patch_layout(model, view, self.name)  # token blocks, or MissingPartError
        view.require("attn", "mlp", "norms", method=self.name)
        cfg: AIMConfig = self.config
        embed = None
        if cfg.frames:
            if cfg.embed_at == "temporal" and len(set(view.block_dims)) > 1:
                raise ValueError("aim embed_at='temporal' needs blocks of one width; use "
                                 "embed_at='input' or frames=0")
            embed = nn.Parameter(torch.zeros(cfg.frames, view.block_dims[0]))
            if cfg.embed_at == "temporal":
                nn.init.normal_(embed, std=cfg.embed_std)
        for i in range(view.depth):
            dim = view.block_dims[i]
            hidden = max(1, int(dim * cfg.ratio))
            block = model.get_submodule(view.blocks[i])
            raw_attn = block.get_submodule(view.attn)
            norm = block.get_submodule(view.norms[0])
            if "spatial" in cfg.parts:
                wrap(model, view.block_part(i, "attn"),
                     lambda m, d=dim, h=hidden: Bypass(m, Bottleneck(d, h), parallel=False))
            if "joint" in cfg.parts:
                wrap(model, view.block_part(i, "mlp"),
                     lambda m, d=dim, h=hidden: Bypass(m, Bottleneck(d, h), parallel=True,
                                                       scale=cfg.joint_scale))
            if "temporal" in cfg.parts or (i == 0 and embed is not None):
                t_hidden = hidden if "temporal" in cfg.parts else 0
                wrap(model, view.blocks[i],
                     lambda m, a=raw_attn, n=norm, d=dim, h=t_hidden, e=embed, o=i == 0:
                     TemporalAttention(m, a, n, d, h, e, o, cfg.embed_at, cfg.recompute))
