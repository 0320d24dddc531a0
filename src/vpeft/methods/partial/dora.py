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
from vpeft.core.inject import LinearUpdate, compute_dtype
from vpeft.core.recompute import recompute_norm_and_act_outputs
from vpeft.core.surgery import wrap
from vpeft.methods.partial.lora import (
    LoRA,
    LoRAConfig,
    LoRALinear,
    fused_products,
    lora_targets,
    part_blocks,
)
from vpeft.registry import register


@dataclass
class DoRAConfig(LoRAConfig):
    qkv: str = option("qv", "Which of q, k, v get an update on fused qkv layers, each with its "
                            "own A, B and magnitudes; 'fused': one over the whole layer.")
    detach_norm: bool = option(True, "Treat ||W + sBA||_c as a constant in the backward pass "
                                     "(the paper's memory-saving choice, Sec. 4.3).")


_FUSED_DTYPES = (torch.float32, torch.float64)


def _direction_and_ratio(weight: torch.Tensor, blocks: torch.Tensor, lora_a: torch.Tensor,
                         magnitude: torch.Tensor, rows: torch.Tensor
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """``W + B A`` and the per-row factor ``m / ||W + B A||_c`` (1 on rows DoRA leaves alone)."""
    direction = torch.addmm(weight, blocks, lora_a)
    ratio = direction.new_ones(direction.shape[0])
    return direction, ratio.index_put((rows,), magnitude / direction[rows].norm(dim=1))


class _DoRAFunction(torch.autograd.Function):
    """``y = x W'^T + c`` with ``W' = m (W + B A) / ||W + B A||_c`` (norm held constant), whose
    backward costs what LoRA's does: no product of the size of the weight's gradient.

    Through the weight, autograd would form ``g^T x`` (the full weight gradient: one more product
    the size of the layer's forward) only to project it onto ``A``, ``B`` and ``m``. Each of
    them has a cheap exact form instead:

    * ``B_i``'s gradient is ``diag(ratio) g_i^T u_i`` and ``A``'s ``(g diag(ratio) B)^T x``, with
      ``u = x A^T`` the rank-r features (computed in the forward's product, as LoRA does);
    * ``m_i``'s is ``sum_t g_ti (y_ti - c_i) / m_i``: the output before the bias over the
      magnitude is the normalised direction's output, so it costs one elementwise pass over the
      adapted rows of the output, which is kept (no copy: the attention that reads q, k and v
      keeps the same memory). If the output was changed in place after the forward, or a
      magnitude is exactly zero, those rows are recomputed from ``x`` instead.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, lora_a, lora_b, magnitude, parts, rank, rows):  # type: ignore[override]
        out = weight.shape[0]
        blocks = part_blocks(lora_b, parts, rank, out)
        direction, ratio = _direction_and_ratio(weight, blocks, lora_a, magnitude, rows)
        y, u = fused_products(x, direction * ratio[:, None], lora_a, bias,
                              fuse=out < x.shape[1])
        y, u = y.detach(), u.contiguous()
        ctx.save_for_backward(x, weight, bias, lora_a, lora_b, magnitude, u)
        # not through save_for_backward: a caller may write into y in place (the version check
        # in the backward then recomputes what it needs instead of failing)
        ctx.y, ctx.version = y, y._version
        ctx.parts, ctx.rank, ctx.rows = parts, rank, rows
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, bias, lora_a, lora_b, magnitude, u = ctx.saved_tensors
        y, stale = ctx.y, ctx.y._version != ctx.version
        parts, r, rows = ctx.parts, ctx.rank, ctx.rows
        need_x, need_w, need_c, need_a, need_b, need_m = ctx.needs_input_grad[:6]
        out, d_in = weight.shape
        g = g.contiguous()
        blocks = part_blocks(lora_b, parts, r, out)
        direction, ratio = _direction_and_ratio(weight, blocks, lora_a, magnitude, rows)
        scaled = blocks * ratio[:, None]  # g diag(ratio) B = g @ scaled
        grad_x = None
        if need_x:  # g W' and g diag(ratio) B
            grad_x, gu = fused_products(g, (direction * ratio[:, None]).t(), scaled.t(),
                                        fuse=out > d_in)
        else:
            gu = g @ scaled
        grad_a = gu.t() @ x if need_a else None
        grad_b = None
        if need_b:
            grad_b = torch.empty_like(lora_b)
            row = 0
            for i, (s, e) in enumerate(parts):
                grad_b[row : row + e - s] = ((u[:, i * r : (i + 1) * r].t() @ g[:, s:e]).t()
                                             * ratio[s:e, None])
                row += e - s
        gsum = g.sum(0) if need_c or (need_m and bias is not None) else None
        grad_m = None
        if need_m:
            if stale or not bool((magnitude != 0).all()):  # the direction's output, from x
                d = direction[rows]
                grad_m = ((g[:, rows] * (x @ d.t())).sum(0)) / d.norm(dim=1)
            else:  # sum_t g_ti (y_ti - c_i) / m_i, part by part (slices: no copies)
                sums = []
                for s, e in parts:
                    gy = (g[:, s:e] * y[:, s:e]).sum(0)
                    sums.append(gy if bias is None else gy - bias[s:e] * gsum[s:e])
                grad_m = torch.cat(sums) / magnitude
        grad_w = ratio[:, None] * (g.t() @ x) if need_w else None
        grad_c = gsum if need_c and bias is not None else None
        return grad_x, grad_w, grad_c, grad_a, grad_b, grad_m, None, None, None


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
        base = self.base
        if self.dropout is not None:  # the dropped input feeds only the low-rank path
            return LinearUpdate.forward(self, x)
        fused = (self.detach_norm and type(base) is nn.Linear and not base._forward_hooks
                 and not base._forward_pre_hooks and x.dtype in _FUSED_DTYPES
                 and compute_dtype(x) == x.dtype == base.weight.dtype)
        if not fused:
            # through the weight: the rescaled output (as large as the layer's output) is never
            # stored for the backward, only the layer's input and weight-sized tensors
            return F.linear(x, self.adapted_weight(), base.bias)
        rows = x.reshape(-1, x.shape[-1])
        y = _DoRAFunction.apply(rows, base.weight, base.bias, self.lora_A, self._scaled_b(),
                                self.magnitude, self.parts, self.rank, self.rows)
        return y.view(*x.shape[:-1], -1)

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
