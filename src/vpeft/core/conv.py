"""Injection primitives for convolutional backbones.

* :class:`LowRankConv`: a Conv2d plus a low-rank conv pair (k x k conv to r channels, then 1 x 1),
  LoRA's form on a convolution; it folds exactly into the kernel.
* :class:`NormScaleShift`: a scale and shift inside a normalisation layer's affine map, so that
  it acts before the activation a fused norm-act layer (timm's ``BatchNormAct2d``) applies.
* :func:`freeze_norm_stats`: BatchNorm layers keep their running statistics (eval-mode
  normalisation) while the rest of the model trains.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call
from torch.nn.modules.batchnorm import _BatchNorm

from vpeft.core.inject import lowrank_
from vpeft.core.surgery import Wrapper


def is_depthwise(conv: nn.Conv2d) -> bool:
    """One input channel per group: a per-channel filter (``groups == in_channels``)."""
    return conv.groups > 1 and conv.in_channels == conv.groups


class LowRankConv(Wrapper):
    """``base(x) + scale * B(A(dropout(x)))`` with ``A`` a k x k conv to ``r`` channels per group.

    ``A`` has the base's kernel size, stride, padding, dilation and padding rule (it runs through
    the base module's own forward with ``A``'s kernel, so timm's ``Conv2dSame`` pads alike);
    ``B`` is a 1 x 1 conv back to the output channels and starts at zero. On a grouped conv each
    group gets its own rank-``r`` pair, so the update has the base kernel's block structure and
    ``delta_weight() = scale * B_g @ A_g`` per group folds into the kernel exactly.
    Depthwise convs are refused: their kernels have one input channel, so a low-rank pair has
    more parameters than the layer itself.
    """

    base: nn.Conv2d

    def __init__(self, base: nn.Conv2d, rank: int, scale: float, dropout: float = 0.0) -> None:
        super().__init__(base)
        if is_depthwise(base):
            raise ValueError(
                f"a low-rank conv pair cannot adapt a depthwise conv ({base.in_channels} -> "
                f"{base.out_channels}, groups={base.groups}): its kernels have one input channel; "
                "leave it out of the targets"
            )
        g, w = base.groups, base.weight
        self.rank, self.scale = rank, scale
        self.lora_A = nn.Parameter(w.new_empty(rank * g, *w.shape[1:]))  # (g r, in/g, kh, kw)
        self.lora_B = nn.Parameter(w.new_zeros(base.out_channels, rank))  # (out, r) per group
        for i in range(g):
            lowrank_(self.lora_A.data[i * rank : (i + 1) * rank].flatten(1))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def down(self, x: torch.Tensor) -> torch.Tensor:
        """``A(x)``: the base conv's geometry with ``A``'s kernel and no bias."""
        params = {"weight": self.lora_A}
        if self.base.bias is not None:
            params["bias"] = self.lora_A.new_zeros(self.lora_A.shape[0])
        return functional_call(self.base, params, (x,))

    def update(self, x: torch.Tensor) -> torch.Tensor:
        u = self.down(self.dropout(x) if self.dropout is not None else x)  # (N, g r, H', W')
        b = self.lora_B if self.scale == 1 else self.scale * self.lora_B
        return F.conv2d(u, b[:, :, None, None].to(u.dtype), groups=self.base.groups)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.update(x)

    def delta_weight(self) -> torch.Tensor:
        """``scale * B_g @ A_g`` per group, in the base kernel's ``(out, in/g, kh, kw)`` layout."""
        g, r = self.base.groups, self.rank
        out_g = self.base.out_channels // g
        a = self.lora_A.flatten(1).view(g, r, -1)  # (g, r, in/g * kh * kw)
        b = self.lora_B.view(g, out_g, r)
        return (self.scale * torch.bmm(b, a)).reshape(self.base.weight.shape)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        self.base.weight += self.delta_weight().to(self.base.weight.dtype)
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        self.base.weight -= self.delta_weight().to(self.base.weight.dtype)


class NormScaleShift(Wrapper):
    """A normalisation layer whose affine map is followed by ``* scale + shift`` per channel.

    The layer runs with weight ``w * scale`` and bias ``b * scale + shift``: the same as a scale
    and shift right after the affine map, but before whatever the layer applies next (the
    activation of timm's ``BatchNormAct2d``), and it folds into ``w`` and ``b`` exactly.
    """

    def __init__(self, base: nn.Module, init_std: float = 0.0) -> None:
        super().__init__(base)
        if getattr(base, "weight", None) is None or getattr(base, "bias", None) is None:
            raise ValueError(f"{type(base).__name__} has no affine weight and bias to scale")
        channels = base.weight.shape[0]
        self.scale = nn.Parameter(base.weight.new_ones(channels))
        self.shift = nn.Parameter(base.weight.new_zeros(channels))
        if init_std > 0:
            nn.init.normal_(self.scale, mean=1.0, std=init_std)
            nn.init.normal_(self.shift, std=init_std)

    def _affine(self) -> dict[str, torch.Tensor]:
        return {
            "weight": self.base.weight * self.scale,
            "bias": torch.addcmul(self.shift, self.base.bias, self.scale),
        }

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.base, self._affine(), (x,))

    @torch.no_grad()
    def fold(self) -> nn.Module:
        affine = self._affine()
        self.base.weight.copy_(affine["weight"])
        self.base.bias.copy_(affine["bias"])
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        self.base.bias.sub_(self.shift).div_(self.scale)
        self.base.weight.div_(self.scale)


def _eval_mode_stats(module: nn.Module, args: tuple) -> None:
    # forward reads ``self.training``: normalise with, and keep, the running statistics
    module.training = False


def freeze_norm_stats(model: nn.Module) -> int:
    """Make every BatchNorm of ``model`` normalise with its running statistics and never update
    them, whatever ``model.train()`` says; returns how many layers it froze.

    A pre-forward hook puts the layer in eval mode just before it runs, so ``model.train()``
    (which the trainer calls every epoch) cannot switch it back; the hook travels with
    ``copy.deepcopy`` and is registered once per layer.
    """
    count = 0
    for m in model.modules():
        if isinstance(m, _BatchNorm) and m.track_running_stats:
            if _eval_mode_stats not in m._forward_pre_hooks.values():
                m.register_forward_pre_hook(_eval_mode_stats)
            count += 1
    return count


__all__ = ["LowRankConv", "NormScaleShift", "freeze_norm_stats", "is_depthwise"]
