"""SSF (Lian et al., 2022, arXiv:2210.08823): scale and shift the features after each operation.

A learned per-channel ``gamma * y + beta`` follows every Linear, convolution and LayerNorm of the
backbone (the paper's placement); on merge it folds into that layer's weight and bias.

On CNNs the scale and shift also follow every BatchNorm, inside its affine map (before the
activation of a fused norm-act layer, see :class:`~vpeft.core.conv.NormScaleShift`). A conv
without a bias is skipped: in these CNNs a norm layer follows it, whose scale and shift span the
same affine maps and fold without adding a ``bias`` the plain architecture lacks.

Training stores no activation of its own (:class:`SSFScaleShift`): after a LayerNorm the scale
and shift are folded into the norm's affine weights; after a frozen Linear the scale folds into
the weight rows of its one product, and after a Linear or conv the backward recovers the
layer's output from the scaled output, which the next operation keeps anyway.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm import layers as timm_layers
from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.conv import NormScaleShift
from vpeft.core.inject import ScaleShift, compute_dtype
from vpeft.core.surgery import wrap
from vpeft.core.targeting import find_modules
from vpeft.methods.partial.base import Reparameterization
from vpeft.registry import register

TARGET_TYPES = (nn.Linear, nn.Conv2d, nn.LayerNorm, _BatchNorm)
# layers whose channels are dim 1 of an (N, C, H, W) output (ConvNeXt's LayerNorm2d norms dim 1)
CHANNELS_FIRST = (nn.Conv2d, LayerNorm2d)


@dataclass
class SSFConfig(MethodConfig):
    targets: tuple[str, ...] = option(
        (),
        "Modules to follow with scale and shift, by name pattern; "
        "empty = every Linear, Conv2d (with a bias), LayerNorm and BatchNorm of the backbone.",
    )
    init_std: float = option(
        0.02, "Scale ~ N(1, std), shift ~ N(0, std) as in the paper; 0 starts as the identity."
    )
    norm_stats: bool = option(
        False, "Update BatchNorm running statistics while training (default: frozen, eval mode)."
    )


#: below this |scale| the output no longer gives the input back to full precision: the backward
#: then keeps the input instead (see :class:`_ScaleShiftFunction`)
MIN_INVERTIBLE_SCALE = 1e-2


class _ScaleShiftFunction(torch.autograd.Function):
    """``z = y * s + t`` (``s``, ``t`` broadcast over ``y``) whose backward saves ``z``, not ``y``.

    The scale's gradient needs ``y``, which it gets back as ``(z - t) / s``; ``z`` is the input of
    the next operation (qkv's output for attention, fc1's for the GELU), which keeps it for its own
    backward, so this node adds no memory where ``y * s + t`` in autograd stores all of ``y``.
    With a scale near zero it saves ``y`` instead, as division would lose precision.
    """

    @staticmethod
    def forward(ctx, y, s, t):  # type: ignore[override]
        z = torch.addcmul(t, y, s)
        ctx.from_output = bool((s.abs() >= MIN_INVERTIBLE_SCALE).all())
        ctx.save_for_backward(z if ctx.from_output else y, s, t)
        return z

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        saved, s, t = ctx.saved_tensors
        need_y, need_s, need_t = ctx.needs_input_grad
        gs = None
        if need_s:
            y = (saved - t) / s if ctx.from_output else saved
            gs = (g * y).sum_to_size(s.shape)
        return (g * s if need_y else None), gs, (g.sum_to_size(t.shape) if need_t else None)


class _ScaledLinearFunction(torch.autograd.Function):
    """``z = x (s W)^T + (s c + t)``: a frozen Linear followed by SSF's ``* s + t``, as one product.

    The scale is folded into the weight rows (``out x in`` multiplies, not ``N x out``), so the
    forward makes no pass over the output and the input gradient is the one product ``g (s W)``
    the frozen layer needs anyway, with no ``g * s`` pass. The scale's gradient
    ``sum(g * y) = (sum(g * z) - t sum(g)) / s`` is read off the saved output ``z``, which the
    next operation keeps (see :class:`_ScaleShiftFunction`; only used where every ``|s|`` is at
    least :data:`MIN_INVERTIBLE_SCALE`). ``x`` has shape ``(N, in)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, s, t):  # type: ignore[override]
        ws = weight * s[:, None]
        z = F.linear(x, ws, t if bias is None else torch.addcmul(t, bias, s))
        ctx.save_for_backward(z, ws, s, t)
        return z

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        z, ws, s, t = ctx.saved_tensors
        need_x, _, _, need_s, need_t = ctx.needs_input_grad
        gt = g.sum(0) if need_s or need_t else None
        gs = (torch.linalg.vecdot(g, z, dim=0) - t * gt) / s if need_s else None
        return (g @ ws if need_x else None), None, None, gs, (gt if need_t else None)


class SSFScaleShift(ScaleShift):
    """:class:`~vpeft.core.inject.ScaleShift` that keeps no activation of its own in training.

    After a plain LayerNorm, ``(n * w + b) * s + t`` runs as one ``F.layer_norm`` with weight
    ``w * s`` and bias ``b * s + t`` (what ``fold`` writes); elsewhere ``y * s + t`` runs as
    :class:`_ScaleShiftFunction` (after a frozen ``nn.Linear``: :class:`_ScaledLinearFunction`,
    one product), unless the model changes that output in place afterwards
    (``output_changed_in_place``, found by the forward-path check at ``adapt``): then autograd
    keeps ``y``.
    """

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        base = self.base
        if (type(base) in (nn.LayerNorm, timm_layers.LayerNorm) and self.channel_dim == -1
                and not getattr(base, "_fast_norm", False) and not args
                and not base._forward_hooks and not base._forward_pre_hooks):
            bias = self.shift if base.bias is None else torch.addcmul(self.shift, base.bias,
                                                                      self.scale)
            return F.layer_norm(x, base.normalized_shape, base.weight * self.scale, bias, base.eps)
        in_place = getattr(self, "output_changed_in_place", False)  # e.g. timm's `qkv += bias`
        if (type(base) is nn.Linear and not args and not in_place and not base._forward_hooks
                and not base._forward_pre_hooks and not base.weight.requires_grad
                and (base.bias is None or not base.bias.requires_grad)
                and bool((self.scale.abs() >= MIN_INVERTIBLE_SCALE).all())):
            dt = compute_dtype(x)
            ts = (x.reshape(-1, x.shape[-1]), base.weight, base.bias, self.scale, self.shift)
            with torch.autocast(x.device.type, enabled=False):
                z = _ScaledLinearFunction.apply(*(None if t is None else t.to(dt) for t in ts))
            return z.view(*x.shape[:-1], -1)
        y = base(x, *args, **kwargs)
        s, t = self._shape(self.scale, y.ndim), self._shape(self.shift, y.ndim)
        if in_place:
            return torch.addcmul(t, y, s)  # autograd keeps y, which nothing else changes
        return _ScaleShiftFunction.apply(y, s, t)


def _channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    return m.normalized_shape[-1]


@register
class SSF(Reparameterization):
    """SSF: learned scale and shift after every operation; folds into the weights."""

    name = "ssf"
    config_cls = SSFConfig

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: SSFConfig = self.config
        if cfg.targets:
            paths = find_modules(model, cfg.targets, TARGET_TYPES)
        else:
            paths = [n for n, m in model.named_modules() if isinstance(m, TARGET_TYPES)
                     and not (isinstance(m, nn.Conv2d) and m.bias is None)]
        for path in paths:
            if view.in_head(path):
                continue
            m = model.get_submodule(path)
            if isinstance(m, _BatchNorm):
                wrap(model, path, lambda b: NormScaleShift(b, cfg.init_std))
                continue
            if isinstance(m, nn.LayerNorm) and not m.elementwise_affine:
                raise ValueError(f"ssf cannot fold into {path}: LayerNorm without affine weights")
            dim = 1 if isinstance(m, CHANNELS_FIRST) else -1
            wrap(model, path, lambda b, d=dim: SSFScaleShift(b, _channels(b), d, cfg.init_std))

    @property
    def zero_init(self) -> bool:  # type: ignore[override]  # identity only when init_std == 0
        return self.config.init_std == 0
