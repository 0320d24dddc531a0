"""Recompute a timm-style attention module's forward from its parts, so tokens can be added.

Prefix-tuning (extra keys and values) and VQT (extra queries reading cached keys and values) both
need the inside of ``Attention.forward``; these helpers split it into three steps that use the
module's own layers (``qkv``, ``q_norm``/``k_norm``, ``attn_drop``, ``norm``, ``gate``, ``proj``)
so the wrapped module keeps computing exactly what timm computes when nothing is added.
"""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import MissingPartError

ATTENTION_PARTS = ("qkv", "num_heads", "head_dim", "scale", "proj")


def check_attention(attn: nn.Module, method: str) -> None:
    """Raise :class:`MissingPartError` unless ``attn`` looks like timm's fused-qkv Attention.

    An attention that takes rotary embeddings (EVA's ``forward(x, rope=...)``) is refused too:
    recomputing it from its parts would drop the rotation.
    """
    if "rope" in inspect.signature(attn.forward).parameters:
        raise MissingPartError(
            f"method '{method}' needs an attention without rotary position embeddings; "
            f"{type(attn).__name__} rotates q and k inside its forward",
            part="attention without rotary embeddings",
        )
    missing = [p for p in ATTENTION_PARTS if not hasattr(attn, p)]
    if missing or not isinstance(attn.qkv, nn.Linear):
        raise MissingPartError(
            f"method '{method}' needs an attention with a fused qkv Linear and "
            f"{', '.join(ATTENTION_PARTS)}; {type(attn).__name__} lacks "
            f"{missing or ['a Linear qkv']}",
            part="fused qkv attention",
        )


def project_qkv(attn: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """``q, k, v`` of ``x`` (B, N, C), each (B, heads, N, head_dim), with q/k norms applied."""
    B, N, _ = x.shape
    qkv = attn.qkv(x).reshape(B, N, 3, attn.num_heads, attn.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    return _apply(attn, "q_norm", q), _apply(attn, "k_norm", k), v


def attend(attn: nn.Module, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           attn_mask: torch.Tensor | None = None) -> torch.Tensor:
    """Scaled dot-product attention with the module's scale and attention dropout."""
    drop = attn.attn_drop.p if attn.training and hasattr(attn, "attn_drop") else 0.0
    return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=drop,
                                          scale=attn.scale)


def project_out(attn: nn.Module, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Heads back to tokens, then the module's output norm, gate, projection and dropout.

    ``o`` is (B, heads, N, head_dim); ``x`` is the attention's input for those N tokens (the gate
    of gated timm attentions is computed from it).
    """
    B, _, N, _ = o.shape
    out = _apply(attn, "norm", o.transpose(1, 2).reshape(B, N, -1))
    gate = getattr(attn, "gate", None)
    if gate is not None:
        out = out * gate(x).sigmoid()
    return _apply(attn, "proj_drop", attn.proj(out))


def pad_mask(attn_mask: torch.Tensor | None, is_causal: bool, n: int, extra: int,
             device: torch.device) -> torch.Tensor | None:
    """A mask for ``n`` queries over ``extra`` always-visible keys followed by the ``n`` own keys.

    Extends a caller's mask (bool: True = attend; float: additive) or a causal mask by ``extra``
    leading columns that every query may attend to.
    """
    if is_causal:
        attn_mask = torch.ones(n, n, dtype=torch.bool, device=device).tril_()
    if attn_mask is None or extra == 0:
        return attn_mask
    lead = attn_mask.new_ones if attn_mask.dtype == torch.bool else attn_mask.new_zeros
    return torch.cat([lead(*attn_mask.shape[:-1], extra), attn_mask], dim=-1)


def _apply(attn: nn.Module, name: str, t: torch.Tensor) -> torch.Tensor:
    layer = getattr(attn, name, None)
    return t if layer is None else layer(t)


def route_qkv_bias(model: nn.Module) -> None:
    """Make attentions that add their q/v biases with ``F.linear(x, qkv.weight, bias)`` call
    ``qkv(x)`` and add the bias after it instead (timm's own ``qkv_bias_separate`` switch).

    timm's EVA and SwinV2 attention read ``qkv.weight`` directly when they have ``q_bias``, so a
    wrapper around ``qkv`` would never run; after this it does, and the result is the same sum.
    """
    for module in model.modules():
        if getattr(module, "q_bias", None) is not None and hasattr(module, "qkv_bias_separate"):
            module.qkv_bias_separate = True
