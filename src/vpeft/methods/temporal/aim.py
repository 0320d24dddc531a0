"""AIM (Yang et al., ICLR 2023, arXiv:2302.03024): adapting image models for video recognition.

In every block, three bottleneck adapters around the frozen layers (official code,
``taoyang1122/adapt-image-models``, ``vit_clip.py``):

* **temporal**: the block's own frozen self-attention re-used along the time axis, tokens
  ``(B*T, N, D) -> (B*N, T, D)``, followed by an adapter without skip, added to the residual
  stream before the block: ``x = x + T_adapter(attn_t(norm1(x)))``;
* **spatial**: an adapter after the (spatial) attention, with its skip:
  ``attn(z) + S_adapter(attn(z))``;
* **joint**: an adapter beside the MLP: ``x + mlp(xn) + s * MLP_adapter(xn)``, ``s = 0.5``.

Adapters are ``fc2(GELU(fc1(x)))`` of width ``0.25 D`` with ``fc2`` zero-initialised, and a
learned temporal position embedding (``frames x D``, zero-initialised) is added to every token
before the first block, so the adapted model starts as the frame-wise base. On ViT-B/16 with 8
frames that is 10,657,536 parameters besides the head (10.97M with a Kinetics-400 head; the
paper's 11M). A clip of another length than ``frames`` gets the embedding resampled linearly.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

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


@dataclass
class AIMConfig(MethodConfig):
    ratio: float = option(0.25, "Bottleneck width of every adapter as a fraction of the block "
                                "width (the paper's 0.25).")
    joint_scale: float = option(0.5, "Scale s of the joint adapter beside the MLP (the code's "
                                     "0.5).")
    frames: int = option(8, "Length of the learned temporal position embedding (0: none); "
                            "clips of another length resample it.")
    parts: tuple[str, ...] = option(PARTS, "Which adapters: temporal, spatial, joint.")

    def validate(self) -> None:
        if not 0 < self.ratio <= 4:
            raise ValueError(f"aim ratio must be in (0, 4], got {self.ratio}")
        if self.frames < 0:
            raise ValueError(f"aim frames must be >= 0, got {self.frames}")
        if not self.parts or set(self.parts) - set(PARTS):
            raise ValueError(f"aim parts must be among {PARTS}, got {self.parts}")


class TemporalAttention(Wrapper):
    """A block preceded by ``x + adapter(attn(norm(x)))`` along time, the attention and norm
    being the block's own frozen ones (held by reference: their weights stay in the block)."""

    def __init__(self, block: nn.Module, attn: nn.Module, norm: nn.Module, dim: int,
                 hidden: int, embed_frames: int = 0) -> None:
        super().__init__(block)
        self.adapter = Bottleneck(dim, hidden) if hidden else None
        object.__setattr__(self, "attn_t", attn)  # not registered: no second copy of the weights
        object.__setattr__(self, "norm_t", norm)
        self.time_embed = (nn.Parameter(torch.zeros(embed_frames, dim)) if embed_frames
                           else None)

    def embedding(self, frames: int) -> torch.Tensor:
        """The temporal embedding for ``frames`` frames, ``(frames, D)``."""
        e = self.time_embed
        if e.shape[0] == frames:
            return e
        return F.interpolate(e.t()[None], size=frames, mode="linear",
                             align_corners=False)[0].t()

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        frames = current_frames()
        if self.time_embed is not None:  # (B*T, N, D) + (T, D) per clip
            clips = split_clips(x, frames, "aim")
            x = (clips + self.embedding(frames)[None, :, None, :]).view_as(x)
        if self.adapter is not None:
            xt = time_major(x, frames, "aim")  # (B*N, T, D)
            x = x + frame_major(self.adapter(self.attn_t(self.norm_t(xt))), x.shape[1])
        return self.base(x, *args, **kwargs)


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
            embed = cfg.frames if i == 0 else 0
            if "temporal" in cfg.parts or embed:
                t_hidden = hidden if "temporal" in cfg.parts else 0
                wrap(model, view.blocks[i],
                     lambda m, a=raw_attn, n=norm, d=dim, h=t_hidden, e=embed:
                     TemporalAttention(m, a, n, d, h, e))
