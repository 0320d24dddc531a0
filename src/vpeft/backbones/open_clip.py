"""View of open_clip image towers (``open_clip.transformer.VisionTransformer``).

Their attention is ``nn.MultiheadAttention``, which calls ``F.multi_head_attention_forward`` with
the packed ``in_proj_weight`` parameter: no Linear sits on the q/k/v path, so a method that wraps
a fused ``qkv`` Linear would train nothing there. The view's ``prepare`` step therefore puts a
:class:`PackedAttention` in place of each block's MHA: the same parameters (the very tensors)
moved into an explicit ``qkv`` Linear, attention computed with ``scaled_dot_product_attention``.
Every fused-qkv method (LoRA with its q/v choice, DoRA, FacT ...) then works unchanged, and
merging folds the method into ``qkv`` and hands the plain ``nn.MultiheadAttention`` back, so the
merged tower strict-loads into a fresh open_clip tower.

open_clip is imported only when the model at hand could be one of its towers (the package is
already loaded), so vpeft works without it.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView, head_paths, register_view
from vpeft.core.surgery import Wrapper, replace_module, wrappers

# open_clip's own default preprocessing (OpenAI CLIP mean/std, bicubic resize)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class PackedAttention(Wrapper):
    """Self-attention of an ``nn.MultiheadAttention`` through an explicit ``qkv`` Linear.

    ``qkv`` holds the MHA's own ``in_proj_weight``/``in_proj_bias`` parameters (moved, not
    copied); ``base.out_proj`` stays where it was. :meth:`fold` folds any wrapper put inside
    (LoRA on ``qkv``, a method on ``out_proj``) and moves the parameters back into the MHA.
    """

    def __init__(self, base: nn.MultiheadAttention) -> None:
        super().__init__(base)
        if not base._qkv_same_embed_dim or base.bias_k is not None or base.add_zero_attn:
            raise ValueError("PackedAttention supports self-attention MHA with one packed "
                             "in_proj (no kdim/vdim, bias_k or add_zero_attn)")
        e = base.embed_dim
        qkv = nn.Linear(e, 3 * e, bias=base.in_proj_bias is not None, device="meta")
        qkv.weight, qkv.bias = base.in_proj_weight, base.in_proj_bias
        base.register_parameter("in_proj_weight", None)  # held once, by qkv
        base.register_parameter("in_proj_bias", None)
        self.qkv = qkv
        self.__dict__["_folded"] = {}  # inner wrappers taken out by fold(), for unfold()

    def forward(self, query: torch.Tensor, key: torch.Tensor | None = None,
                value: torch.Tensor | None = None, need_weights: bool = False,
                attn_mask: torch.Tensor | None = None,
                key_padding_mask: torch.Tensor | None = None, is_causal: bool = False,
                **_: Any) -> tuple[torch.Tensor, None]:
        mha = self.base
        if (key is not None and key is not query) or (value is not None and value is not query):
            raise ValueError("PackedAttention computes self-attention only (key and value must "
                             "be the query tensor)")
        if need_weights or key_padding_mask is not None:
            raise ValueError("PackedAttention does not return attention weights or take a "
                             "key_padding_mask")
        x = query if mha.batch_first else query.transpose(0, 1)
        b, n, e = x.shape
        h = mha.num_heads
        q, k, v = self.qkv(x).view(b, n, 3, h, e // h).permute(2, 0, 3, 1, 4)  # 3 x (B, h, N, d)
        mask = _sdpa_mask(attn_mask, b, h, n)
        o = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, dropout_p=mha.dropout if self.training else 0.0,
            is_causal=is_causal and mask is None)
        o = mha.out_proj(o.transpose(1, 2).reshape(b, n, e))
        return (o if mha.batch_first else o.transpose(0, 1)), None

    @torch.no_grad()
    def fold(self) -> nn.Module:
        self._folded.clear()
        for path, inner in wrappers(self):
            if inner is not self:
                replace_module(self, path, inner.fold())
                self._folded[path] = inner
        self.base.in_proj_weight, self.base.in_proj_bias = self.qkv.weight, self.qkv.bias
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        base = self.base
        self.qkv.weight, self.qkv.bias = base.in_proj_weight, base.in_proj_bias
        base.register_parameter("in_proj_weight", None)
        base.register_parameter("in_proj_bias", None)
        for path, inner in self._folded.items():
            inner.base = self.get_submodule(path)
            inner.unfold()
            replace_module(self, path, inner)
        self._folded.clear()


def _sdpa_mask(mask: torch.Tensor | None, b: int, h: int, n: int) -> torch.Tensor | None:
    """An MHA ``attn_mask`` ((N, N) or (B*h, N, N); bool True = blocked, or additive) for SDPA."""
    if mask is None:
        return None
    if mask.dtype == torch.bool:
        mask = ~mask  # SDPA's bool mask says which positions take part
    return mask.view(b, h, n, n) if mask.dim() == 3 else mask


def pack_attentions(model: nn.Module) -> None:
    """Put a :class:`PackedAttention` in place of every self-attention MHA of ``model``."""
    targets = [n for n, m in model.named_modules()
               if type(m) is nn.MultiheadAttention and n]
    for path in targets:
        replace_module(model, path, PackedAttention(model.get_submodule(path)))


class OpenCLIPClassifier(nn.Module):
    """An open_clip image tower with a Linear classifier on its (projected) embedding.

    Speaks timm's interface (``get_classifier``, ``forward_features``, ``forward_head``,
    ``num_classes``, ``pretrained_cfg`` with the tower's mean/std and size), so the trainer,
    the feature cache and the data pipeline treat it like a timm model.
    """

    def __init__(self, visual: nn.Module, num_classes: int,
                 architecture: str = "open_clip") -> None:
        super().__init__()
        self.visual = visual
        dim = getattr(visual, "output_dim", None) or visual.proj.shape[1]
        self.head = nn.Linear(dim, num_classes)
        self.num_classes = num_classes
        size = getattr(visual, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        self.pretrained_cfg = {
            "architecture": architecture,
            "input_size": (3, *size),
            "mean": tuple(getattr(visual, "image_mean", None) or CLIP_MEAN),
            "std": tuple(getattr(visual, "image_std", None) or CLIP_STD),
            "interpolation": "bicubic",
            "crop_pct": 1.0,
        }

    def get_classifier(self) -> nn.Module:
        return self.head

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.visual(x)  # (B, output_dim): pooled and projected

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.visual(x))


def _tower(model: nn.Module) -> tuple[str, nn.Module] | None:
    """``(prefix, tower)`` where ``model`` is an open_clip VisionTransformer or holds one."""
    if "open_clip" not in sys.modules:
        return None
    from open_clip.transformer import VisionTransformer

    for prefix, m in (("", model), ("visual.", getattr(model, "visual", None))):
        if isinstance(m, VisionTransformer):
            return prefix, m
    return None


@register_view
def open_clip_view(model: nn.Module) -> BackboneView | None:
    found = _tower(model)
    if found is None:
        return None
    prefix, tower = found
    blocks = tower.transformer.resblocks
    width = tower.transformer.width
    patch = tower.conv1.kernel_size[0]
    return BackboneView(
        family="open_clip",
        model=model,
        blocks=[f"{prefix}transformer.resblocks.{i}" for i in range(len(blocks))],
        block_dims=[width] * len(blocks),
        attn="attn",
        qkv="attn.qkv",  # made by prepare (pack_attentions)
        mlp="mlp",
        norms=("ln_1", "ln_2"),
        heads=head_paths(model),
        patch_embed=f"{prefix}conv1",
        final_norm=f"{prefix}ln_post",
        # prompt methods would have to know open_clip's pooling and position embeddings
        sequence_tokens=False,
        num_prefix_tokens=1,
        embed_dim=width,
        patch_size=patch,
        in_chans=tower.conv1.in_channels,
        prepare=pack_attentions,
    )
