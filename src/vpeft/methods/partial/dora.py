"""DoRA (Liu et al., 2024, arXiv:2402.09353): weight-decomposed low-rank adaptation.

The adapted weight is split into a learned magnitude and a LoRA-updated direction:

    W' = m * (W + s B A) / ||W + s B A||_c

The paper's ``||.||_c`` is the norm of each column of ``W`` written as (in x out), i.e. in PyTorch's
``(out, in)`` layout the norm over the input dimension of each output row (as HF PEFT computes it).
``m`` starts at ``||W||_c`` and ``B`` at zero, so the adapted model starts equal to the base. As the
paper suggests (Sec. 4.3), the norm is treated as a constant in the backward pass by default.

Targets follow LoRA (whose options and helpers this reuses): on a fused ``qkv`` only the chosen
parts (default q and v) are decomposed, each output row of them with its own magnitude; rows of
the other parts are untouched. Merging writes ``W'`` into the weight: a plain ``nn.Linear``.
Training runs through the weight, ``F.linear(x, W', c)``: the only activation it stores is the
layer's input (as LoRA's), where rescaling the output would store the whole output.

On a ``nn.Conv2d`` (selected as LoRA selects them) the direction is LoRA's conv pair update of
the kernel and each output channel has a magnitude, the norm over its ``(in, kh, kw)`` kernel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import option
from vpeft.core.conv import LowRankConv
from vpeft.core.recompute import recompute_norm_and_act_outputs
from vpeft.core.surgery import wrap
from vpeft.methods.partial.lora import LoRA, LoRAConfig, LoRALinear, lora_targets
from vpeft.registry import register


@dataclass
class DoRAConfig(LoRAConfig):
    qkv: str = option("qv", "Which of q, k, v get an update on fused qkv layers, each with its "
                            "own A, B and magnitudes; 'fused': one over the whole layer.")
    detach_norm: bool = option(True, "Treat ||W + sBA||_c as a constant in the backward pass "
                                     "(the paper's memory-saving choice, Sec. 4.3).")


class DoRALinear(LoRALinear):
    """LoRA's update plus a per-row magnitude ``m`` over the normalised direction."""

    def __init__(self, base: nn.Linear, rank: int, scale: float, dropout: float,
                 parts: list[tuple[int, int]], detach_norm: bool) -> None:
        super().__init__(base, rank, scale, dropout, parts)
        self.detach_norm = detach_norm
        rows = torch.cat([torch.arange(s, e) for s, e in parts]).to(base.weight.device)
        self.register_buffer("rows", rows, persistent=False)
        self.magnitude = nn.Parameter(base.weight.detach()[rows].norm(dim=1))
        self._folded_norm: torch.Tensor | None = None  # ||W + sBA||_c at fold time, for unfold

    def direction_norm(self) -> torch.Tensor:
        """``||W + s B A||_c`` of the decomposed rows."""
        return (self.base.weight + self.delta_weight())[self.rows].norm(dim=1)

    def rescale(self, y: torch.Tensor) -> torch.Tensor:
        """``W x + c + s B A x`` -> ``m (W + s B A) x / ||W + s B A||_c + c`` on the parts' rows."""
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
            norm = self.direction_norm()
        ratio = torch.ones(y.shape[-1], dtype=y.dtype, device=y.device)
        ratio = ratio.index_put((self.rows,), (self.magnitude / norm).to(y.dtype))
        bias = self.base.bias
        # the magnitude scales the weight, not the bias: (y - c) * m / ||.|| + c
        return y * ratio if bias is None else torch.addcmul(bias, y - bias, ratio)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return self.rescale(super().update(x, y))

    def adapted_weight(self) -> torch.Tensor:
        """``m (W + s B A) / ||W + s B A||_c`` on the decomposed rows, ``W`` on the others."""
        direction = self.base.weight + self.delta_weight()
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
            norm = direction[self.rows].norm(dim=1)
        ratio = direction.new_ones(direction.shape[0]).index_put((self.rows,),
                                                                  self.magnitude / norm)
        return direction * ratio[:, None]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # through the weight: the rescaled output (as large as the layer's output) is never
        # stored for the backward, only the layer's input and weight-sized tensors
        return F.linear(x, self.adapted_weight(), self.base.bias)

    @torch.no_grad()
    def fold(self) -> nn.Module:
        norm = self.direction_norm()
        w = self.base.weight
        merged = (w + self.delta_weight())[self.rows] * (self.magnitude / norm)[:, None]
        w[self.rows] = merged.to(w.dtype)
        self._folded_norm = norm
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        if self._folded_norm is None:
            raise RuntimeError("DoRALinear.unfold called before fold")
        w = self.base.weight
        direction = w[self.rows] * (self._folded_norm / self.magnitude)[:, None]
        w[self.rows] = direction - self.delta_weight()[self.rows]
        self._folded_norm = None


class DoRAConv(LowRankConv):
    """LoRA's conv pair on the kernel's direction plus a per-output-channel magnitude."""

    def __init__(self, base: nn.Conv2d, rank: int, scale: float, dropout: float,
                 detach_norm: bool) -> None:
        super().__init__(base, rank, scale, dropout)
        self.detach_norm = detach_norm
        self.magnitude = nn.Parameter(base.weight.detach().flatten(1).norm(dim=1))
        self._folded_norm: torch.Tensor | None = None

    def direction_norm(self) -> torch.Tensor:
        return (self.base.weight + self.delta_weight()).flatten(1).norm(dim=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = super().forward(x)
        with torch.set_grad_enabled(torch.is_grad_enabled() and not self.detach_norm):
            norm = self.direction_norm()
        ratio = (self.magnitude / norm).to(y.dtype)[:, None, None]
        bias = self.base.bias
        if bias is None:
            return y * ratio
        c = bias[:, None, None]
        return torch.addcmul(c, y - c, ratio)  # the magnitude scales the kernel, not the bias

    @torch.no_grad()
    def fold(self) -> nn.Module:
        norm = self.direction_norm()
        w = self.base.weight
        ratio = (self.magnitude / norm).view(-1, *[1] * (w.ndim - 1))
        w.copy_(((w + self.delta_weight()) * ratio).to(w.dtype))
        self._folded_norm = norm
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        if self._folded_norm is None:
            raise RuntimeError("DoRAConv.unfold called before fold")
        w = self.base.weight
        ratio = (self._folded_norm / self.magnitude).view(-1, *[1] * (w.ndim - 1))
        w.copy_(w * ratio - self.delta_weight())
        self._folded_norm = None


@register
class DoRA(LoRA):
    """DoRA: LoRA on the direction of each weight row plus a learned magnitude."""

    name = "dora"
    config_cls = DoRAConfig

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: DoRAConfig = self.config
        for path, parts in lora_targets(model, view, cfg, self.name):
            if parts is None:  # a Conv2d
                wrap(model, path, lambda m: DoRAConv(m, cfg.rank, cfg.scale, cfg.dropout,
                                                     cfg.detach_norm))
                continue
            wrap(model, path, lambda m, p=parts: DoRALinear(m, cfg.rank, cfg.scale, cfg.dropout,
                                                            p, cfg.detach_norm))
        # through the weight, an adapted Linear keeps its input (qkv's: the norm's output)
        recompute_norm_and_act_outputs(model, [model.get_submodule(b) for b in view.blocks])
