"""View of timm's Swin and SwinV2: stages of windowed-attention blocks on (B, H, W, C) maps,
patch merging between stages, so the token width differs per stage."""

from __future__ import annotations

from torch import nn

from vpeft.backbones.base import BackboneView, head_paths, register_view, staged_blocks
from vpeft.core.attention import route_qkv_bias


def _swin_classes() -> tuple[type, ...]:
    from timm.models.swin_transformer import SwinTransformer
    from timm.models.swin_transformer_v2 import SwinTransformerV2

    return SwinTransformer, SwinTransformerV2


@register_view
def swin_view(model: nn.Module) -> BackboneView | None:
    if not isinstance(model, _swin_classes()):
        return None
    blocks = staged_blocks(model.layers, "layers")
    dims = [block.norm1.normalized_shape[0] for _, block in blocks]
    return BackboneView(
        family="swin",
        model=model,
        blocks=[p for p, _ in blocks],
        block_dims=dims,
        attn="attn",
        qkv="attn.qkv",
        mlp="mlp",
        norms=("norm1", "norm2"),
        heads=head_paths(model),
        patch_embed="patch_embed",
        final_norm="norm",
        sequence_tokens=False,  # blocks take (B, H, W, C) maps, attention runs per window
        block_layout="nhwc",
        embed_dim=model.num_features,  # the width the final norm sees (the last stage's)
        patch_size=model.patch_embed.patch_size[0],
        in_chans=model.patch_embed.proj.in_channels,
        prepare=route_qkv_bias,  # SwinV2 reads qkv.weight itself when it has q/v biases
    )
