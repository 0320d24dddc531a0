"""View of timm's plain Vision Transformers: ViT, DeiT (also distilled), ViTs with registers."""

from __future__ import annotations

from typing import Any

from torch import nn

from vpeft.backbones.base import BackboneView, head_paths, register_view


@register_view
def vit_view(model: nn.Module) -> BackboneView | None:
    from timm.models.vision_transformer import VisionTransformer

    if not isinstance(model, VisionTransformer):
        return None
    first = model.blocks[0] if len(model.blocks) else None
    has_attn = first is not None and hasattr(first, "attn")
    return BackboneView(
        family="vit",
        model=model,
        attn="attn" if has_attn else None,
        qkv="attn.qkv" if has_attn and hasattr(first.attn, "qkv") else None,
        mlp="mlp" if first is not None and hasattr(first, "mlp") else None,
        **token_model_parts(model),
    )


def token_model_parts(model: nn.Module) -> dict[str, Any]:
    """The view fields every timm ViT-style model shares (ViT, EVA): pre-norm blocks with
    ``norm1``/``norm2``, a patch embedding, prefix tokens, one width and a final ``norm``."""
    return dict(
        blocks=[f"blocks.{i}" for i in range(len(model.blocks))],
        block_dims=[model.embed_dim] * len(model.blocks),
        norms=("norm1", "norm2"),
        heads=head_paths(model),
        patch_embed="patch_embed",
        final_norm="norm",
        sequence_tokens=True,
        block_layout="tokens",
        num_prefix_tokens=model.num_prefix_tokens,
        embed_dim=model.embed_dim,
        patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels,
    )
