"""Gradient-based class maps: Grad-CAM on the token grid or the last conv stage, and Captum's
Integrated Gradients on the input pixels.

Grad-CAM (Selvaraju et al., 2017) weighs each channel of a feature map by the mean gradient of the
class score over it and keeps the positive sum. On a token model the feature map is the patch
tokens entering the last block, laid out on the patch grid (the last block's output is useless:
a class-token head reads no patch token there). On a CNN or Swin it is the feature map the head
pools (``view.final_features``, else the last block's output).
"""

from __future__ import annotations

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.side import track_frozen
from vpeft.explain.rollout import (
    TokenLayout,
    capture_attention,
    feature_layout,
    image_tokens,
    pooled_patch_map,
)


def _grid(act: torch.Tensor, view: BackboneView, layout: TokenLayout | None,
          image_size: tuple[int, int]) -> torch.Tensor:
    """A feature tensor as (B, C, H, W)."""
    if act.ndim == 3:  # tokens (B, N, D): the last P are the patches
        layout = layout or feature_layout(view, image_size, act.shape[1])
        if layout is None:
            raise ValueError(f"cannot lay {act.shape[1]} tokens out on a patch grid")
        patches = act[:, -layout.num_patches:]
        return patches.transpose(1, 2).reshape(act.shape[0], -1, *layout.grid)
    if act.ndim == 4 and view.block_dims and act.shape[-1] == view.block_dims[-1] \
            and act.shape[1] != act.shape[-1]:  # channels-last stages (Swin): (B, H, W, C)
        return act.permute(0, 3, 1, 2)
    if act.ndim == 4:
        return act
    raise ValueError(f"cannot lay out a feature map of shape {tuple(act.shape)} on a grid")


def _leaf(t: torch.Tensor) -> torch.Tensor:
    """``t`` cut from what computed it, as a leaf that records its gradient: Grad-CAM needs only
    the gradient downstream of the feature map, also where nothing upstream requires grad (a
    frozen backbone with the method after it: linear probing, partial-k, VQT)."""
    return t.detach().requires_grad_()


def gradcam(model: nn.Module, view: BackboneView, x: torch.Tensor, target: torch.Tensor,
            layout: TokenLayout | None) -> torch.Tensor:
    """(B, H, W) Grad-CAM of class ``target[b]`` for each image, on the feature grid.

    The feature map is the tokens entering the last block where that block takes a token
    sequence (B, N, D) (ViT, EVA, Hugging Face and open_clip towers), else what the head pools:
    ``view.final_features`` or the last block's output (CNNs, Swin's (B, H, W, C) maps)."""
    tokens: list[torch.Tensor] = []
    maps: list[torch.Tensor] = []

    def before(module: nn.Module, args: tuple) -> tuple | None:
        if not (args and isinstance(args[0], torch.Tensor) and args[0].ndim == 3):
            return None
        tokens.append(_leaf(args[0]))
        return (tokens[-1], *args[1:])

    def after(module: nn.Module, args: tuple, out):
        if tokens:
            return None
        first = out[0] if isinstance(out, tuple) else out  # Hugging Face blocks return tuples
        maps.append(_leaf(first))
        return (maps[-1], *out[1:]) if isinstance(out, tuple) else maps[-1]

    handles = [model.get_submodule(view.blocks[-1]).register_forward_pre_hook(before),
               model.get_submodule(view.final_features or view.blocks[-1])
               .register_forward_hook(after)]
    try:
        with torch.enable_grad(), track_frozen():
            logits = model(x)
            score = logits.gather(1, target.view(-1, 1)).sum()
            act = (tokens or maps)[0]
            (grad,) = torch.autograd.grad(score, act, allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    if grad is None:  # the output does not depend on the feature map at all
        grad = torch.zeros_like(act)
    size = tuple(x.shape[-2:])
    act, grad = _grid(act.detach(), view, layout, size), _grid(grad, view, layout, size)
    weights = grad.float().mean(dim=(2, 3), keepdim=True)  # (B, C, 1, 1)
    return (weights * act.float()).sum(dim=1).clamp_min(0)


def gradient_rollout(model: nn.Module, view: BackboneView, x: torch.Tensor,
                     target: torch.Tensor, layout: TokenLayout, pooled_by_prefix: bool
                     ) -> torch.Tensor:
    """(B, grid_h, grid_w) gradient-weighted attention rollout of class ``target[b]`` (Chefer et
    al., 2021, arXiv:2103.15679, their rule for self-attention): each block's relevance is the
    head mean of ``(dscore/dA * A)^+`` and ``R <- R + relevance @ R`` from ``R = I``; the map is
    the pooled feature's row over the patches. Unlike rollout it is class-specific, and unlike
    Grad-CAM it follows the attention that carries the patches to the pooled token.
    Needs every block's global attention (see :func:`vpeft.explain.rollout.rollout_layout`)."""
    x = x.detach().clone().requires_grad_()  # the attention is in the graph even if all frozen
    with torch.enable_grad(), track_frozen(), capture_attention(model, view, True) as att:
        score = model(x).gather(1, target.view(-1, 1)).sum()
        probs = [a for a in att.maps if a is not None]
        grads = torch.autograd.grad(score, probs, allow_unused=True)
    joint = None
    for a, g in zip(probs, grads):
        g = torch.zeros_like(a) if g is None else g
        rel = image_tokens((g * a).clamp_min(0).mean(dim=1).detach(), layout)  # (B, T, T)
        joint = torch.eye(rel.shape[-1]).expand_as(rel) if joint is None else joint
        joint = joint + rel @ joint
    return pooled_patch_map(joint, layout, pooled_by_prefix)


def integrated_gradients(model: nn.Module, x: torch.Tensor, target: torch.Tensor,
                         steps: int = 16) -> torch.Tensor:
    """(B, H, W) Integrated Gradients (Sundararajan et al., 2017) of class ``target[b]`` on the
    input, from a zero (mean-colour, after normalisation) baseline, summed |.| over channels.

    Needs Captum (``pip install "vpeft[explain]"``).
    """
    try:
        from captum.attr import IntegratedGradients
    except ImportError as e:
        raise ImportError("Integrated Gradients needs captum: pip install 'vpeft[explain]' "
                          "(or pass ig_steps=0 / --ig-steps 0)") from e
    ig = IntegratedGradients(model)
    with torch.enable_grad(), track_frozen():
        attr = ig.attribute(x, baselines=torch.zeros_like(x), target=target, n_steps=steps,
                            internal_batch_size=max(steps, 1))
    return attr.detach().abs().sum(dim=1)
