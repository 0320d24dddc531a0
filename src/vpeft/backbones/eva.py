"""View of timm's EVA family (EVA-02 and friends): rotary embeddings, SwiGLU MLP, fused or
separate q/k/v projections, and q/v biases that the attention adds itself."""

from __future__ import annotations

from torch import nn

from vpeft.backbones.base import BackboneView, register_view
from vpeft.backbones.vit import token_model_parts
from vpeft.core.attention import route_qkv_bias


def _prefix_before_patches(attn: nn.Module, args: tuple, kwargs: dict) -> None:
    # EVA rotates the last len(rope) tokens and leaves num_prefix_tokens in front untouched; a
    # method that inserts tokens after the class token (VPT, NOAH) makes them prefix tokens too,
    # so they get no rotary position, as the class token.
    rope = kwargs.get("rope")
    if rope is not None:
        attn.num_prefix_tokens = args[0].shape[1] - rope.shape[-2]


def _prepare(model: nn.Module) -> None:
    route_qkv_bias(model)
    for block in model.blocks:
        if not getattr(block.attn, "_vpeft_prefix_hook", False):
            block.attn.register_forward_pre_hook(_prefix_before_patches, with_kwargs=True)
            block.attn._vpeft_prefix_hook = True


@register_view
def eva_view(model: nn.Module) -> BackboneView | None:
    from timm.models.eva import Eva

    if not isinstance(model, Eva):
        return None
    attn = model.blocks[0].attn if len(model.blocks) else None
    fused = attn is not None and attn.qkv is not None
    return BackboneView(
        family="eva",
        model=model,
        attn="attn" if attn is not None else None,
        qkv="attn.qkv" if fused else None,
        qkv_separate=None if fused or attn is None else ("attn.q_proj", "attn.k_proj",
                                                          "attn.v_proj"),
        mlp="mlp",
        prepare=_prepare,
        **token_model_parts(model),
    )
