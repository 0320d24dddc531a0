"""LoRA (Hu et al., 2022, arXiv:2106.09685): a low-rank update ``B @ A`` of chosen Linear weights.

On a ViT's fused ``qkv`` layer the default (``qkv='fused'``) is one ``A``, ``B`` pair over the whole
layer, as NOAH's official LoRA baseline on VTAB-1k and Hugging Face PEFT on timm models: in vpeft's
3-seed comparison (docs/benchmarks.md) it beat the paper's separate q and v pairs at the same
parameter count on every task and seed. ``qkv='qv'`` gives the paper's form (Hu et al., Sec. 4.2),
any subset of ``qkv`` one pair per part. On separate q/k/v projections (EVA, Hugging Face CLIP)
there is no fused layer: the default then adapts q and v. ``B`` starts at zero so the adapted
model starts equal to the base; merging adds ``alpha / rank * B @ A`` to the weight and leaves a
plain ``nn.Linear``.

On convolutions (targets that select ``nn.Conv2d`` layers) the update is a low-rank conv pair:
a k x k conv to r channels, then a 1 x 1 conv (:class:`~vpeft.core.conv.LowRankConv`), merged
exactly into the kernel. On a backbone without attention the default targets are the view's
``update_targets``: the MLP's ``fc1``/``fc2`` on ConvNeXt; on a CNN every non-depthwise conv
inside the blocks plus the view's ``final_features`` conv, the layer whose output the head reads
(EfficientNet's ``conv_head``). Depthwise convs are refused when targeted, as their kernels have
one input channel.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.conv import LowRankConv
from vpeft.core.inject import (
    LinearUpdate,
    add_to_slices,
    compute_dtype,
    linear_targets,
    lowrank_,
    narrow_linear,
)
from vpeft.core.surgery import wrap
from vpeft.core.targeting import find_modules
from vpeft.methods.partial.base import Reparameterization
from vpeft.registry import register


@dataclass
class LoRAConfig(MethodConfig):
    rank: int = option(8, "Rank r of the update B @ A.")
    alpha: float | None = option(
        None, "Scale numerator: the update is alpha / r * B @ A (default: alpha = r, i.e. scale 1)."
    )
    dropout: float = option(0.0, "Dropout on the LoRA branch's input.")
    targets: tuple[str, ...] = option(
        ("qkv",),
        "Linear or Conv2d layers to adapt, by name pattern "
        "(glob on the dotted name or its suffix; 're:' for regex). On a CNN the default "
        "means the non-depthwise convs of the blocks plus the conv feeding the head.",
    )
    qkv: str = option(
        "fused",
        "'fused': one A, B pair on the whole fused qkv layer (NOAH's VTAB baseline, Hugging Face "
        "PEFT; q and v on separate projections); or which of q, k, v get their own A and B "
        "('qv': the LoRA paper's form).",
    )

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"lora rank must be >= 1, got {self.rank}")
        if self.qkv != "fused" and (not self.qkv or set(self.qkv) - set("qkv")):
            raise ValueError(
                f"lora qkv must be 'fused' or a non-empty subset of 'qkv', got {self.qkv!r}"
            )
        if not 0 <= self.dropout < 1:
            raise ValueError(f"lora dropout must be in [0, 1), got {self.dropout}")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def part_blocks(lora_b: torch.Tensor, parts: list[tuple[int, int]], rank: int,
            out: int) -> torch.Tensor:
    """The parts' ``B_i`` in one ``(out, P*r)`` matrix (rows of part ``i``, columns ``i``), so
    that ``blocks @ A`` is the whole weight update and ``g @ blocks`` every part's ``g_i B_i``."""
    blocks = lora_b.new_zeros(out, rank * len(parts))
    row = 0
    for i, (s, e) in enumerate(parts):
        blocks[s:e, i * rank : (i + 1) * rank] = lora_b[row : row + e - s]
        row += e - s
    return blocks


def fused_products(x: torch.Tensor, w: torch.Tensor, extra: torch.Tensor,
                   bias: torch.Tensor | None = None,
                   fuse: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """``(x w^T + bias, x extra^T)`` for a few rows ``extra`` (a rank-r factor).

    With ``fuse``, one product over ``[w; extra]``: ``x`` is read once, and both results are
    column slices of it, so the first has strided rows. Elementwise ops on strided rows run
    about a third slower on CPU (GELU on ConvNeXt's widest maps: 124 against 92 ms), so fusing
    pays only where ``x`` is the wider side (it costs a whole read of ``x`` to avoid) and the
    strided result the narrower: callers pass ``fuse=`` ``x``'s width above ``w``'s rows.
    """
    if not fuse:
        return F.linear(x, w, bias), F.linear(x, extra)
    c = None if bias is None else torch.cat([bias, bias.new_zeros(extra.shape[0])])
    both = F.linear(x, torch.cat([w, extra]), c)
    return both[:, : w.shape[0]], both[:, w.shape[0] :]


class _LoRAFunction(torch.autograd.Function):
    """``x W^T + c`` plus ``u_i B_i^T`` on its output columns ``parts[i]`` (``u = xd A^T``).

    One node instead of about ten, built so that LoRA costs little more than the frozen layer,
    whose forward and input gradient are each one large product. The rank-r products that LoRA
    adds are cheap in FLOPs but not in time: each reads a whole activation (``x`` or ``g``) for
    a few columns, at memory speed, which on a layer whose width is only ~12 r (ConvNeXt's first
    stage) costs a large part of the product itself. So they are folded into the large ones:

    * forward: ``y = x (W + B A)^T`` (``B`` the parts' ``B_i`` in one block matrix), so
      ``y += u B^T`` never reads an activation again; on a layer narrower out than in, ``u`` comes
      from the same product, ``[y | u] = x [W + B A ; A]^T``, ``y`` then being its first columns
      (rows strided by ``out + P*r``; see :func:`fused_products` for when that pays);
    * backward: ``g_x = g (W + B A)``, which costs the ``g W`` the frozen layer needs anyway,
      gives the input gradient with the LoRA path already in it; on a layer wider out than in,
      ``[g_x | g_u] = g [W + B A | B]`` in one product;
    * ``A``'s gradient is ``g_u^T x`` and ``B``'s ``u_i^T g_i``, the orientation in which BLAS
      reads the tall operand once (many times faster on CPU than ``g_i^T u_i``).

    ``xd`` is the input of the LoRA branch: ``x`` itself, or a dropout of it; then, or in half
    precision (where ``W + B A`` would round a small update away), ``y`` is computed as
    ``x W^T + c`` plus the separate rank-r products, and ``xd``'s gradient is returned for
    autograd to apply the mask.
    """

    @staticmethod
    def forward(ctx, x, xd, weight, bias, lora_a, lora_b, parts, rank):  # type: ignore[override]
        out = weight.shape[0]
        blocks = part_blocks(lora_b, parts, rank, out)
        ctx.fold = xd is x and x.dtype in (torch.float32, torch.float64)
        if ctx.fold:
            y, u = fused_products(x, torch.addmm(weight, blocks, lora_a), lora_a, bias,
                                  fuse=out < x.shape[1])
            # not a view for autograd: the caller may modify y in place (its memory is y's own)
            y, u = y.detach(), u.contiguous()
        else:
            y = F.linear(x, weight, bias)
            u = F.linear(xd, lora_a)  # (N, P*r)
            row = 0
            for i, (s, e) in enumerate(parts):
                y[:, s:e].addmm_(u[:, i * rank : (i + 1) * rank], lora_b[row : row + e - s].t())
                row += e - s
        ctx.save_for_backward(x, None if xd is x else xd, weight, lora_a, lora_b, u)
        ctx.parts, ctx.rank, ctx.same = parts, rank, xd is x
        ctx.has_bias = bias is not None
        return y

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, xd, weight, lora_a, lora_b, u = ctx.saved_tensors
        xd = x if ctx.same else xd
        parts, r = ctx.parts, ctx.rank
        need_x, need_xd, need_w, need_c, need_a, need_b = ctx.needs_input_grad[:6]
        need_x = need_x or (ctx.same and need_xd)
        g = g.contiguous()
        blocks = part_blocks(lora_b, parts, r, weight.shape[0])
        grad_x = grad_xd = None
        if need_x:  # g W' and g B_blocks (W' = W + B A when the forward folded it)
            w = torch.addmm(weight, blocks, lora_a) if ctx.fold else weight
            gx, gu = fused_products(g, w.t(), blocks.t(), fuse=weight.shape[0] > weight.shape[1])
            if ctx.fold:
                grad_x = gx  # already holds the LoRA path; strided rows, as the forward's y
            elif ctx.same:
                grad_x = gx.addmm_(gu, lora_a)
            else:
                grad_x, grad_xd = gx, gu @ lora_a if need_xd else None
        else:
            gu = g @ blocks
            grad_xd = gu @ lora_a if need_xd else None
        grad_a = gu.t() @ xd if need_a else None
        grad_b = None
        if need_b:
            grad_b = torch.empty_like(lora_b)
            row = 0
            for i, (s, e) in enumerate(parts):
                grad_b[row : row + e - s] = (u[:, i * r : (i + 1) * r].t() @ g[:, s:e]).t()
                row += e - s
        grad_w = g.t() @ x if need_w else None
        grad_c = g.sum(0) if need_c and ctx.has_bias else None
        return grad_x, grad_xd, grad_w, grad_c, grad_a, grad_b, None, None


class LoRALinear(LinearUpdate):
    """``base(x) + scale * B(A(dropout(x)))`` on the output rows ``parts`` (``[(start, end)]``).

    The ``A`` matrices of all parts are stacked so that one matmul serves them all; each part's
    slice of the output then gets its own ``B``. On a plain ``nn.Linear`` base this runs as one
    fused autograd function (see :class:`_LoRAFunction`), otherwise through ``update``.
    """

    def __init__(
        self, base: nn.Linear, rank: int, scale: float, dropout: float, parts: list[tuple[int, int]]
    ) -> None:
        super().__init__(base)
        self.rank, self.scale, self.parts = rank, scale, parts
        self.lora_A = nn.Parameter(base.weight.new_empty(rank * len(parts), base.in_features))
        self.lora_B = nn.Parameter(base.weight.new_zeros(sum(e - s for s, e in parts), rank))
        for i in range(len(parts)):
            lowrank_(self.lora_A.data[i * rank : (i + 1) * rank])
        self.dropout = nn.Dropout(dropout) if dropout > 0 else None

    def _scaled_b(self) -> torch.Tensor:
        return self.lora_B if self.scale == 1 else self.scale * self.lora_B  # scale the small one

    def lora_output(self, rows: torch.Tensor) -> torch.Tensor:
        """``base(rows)`` plus the LoRA update, for ``rows`` of shape ``(N, in)``: one fused
        function on a plain ``nn.Linear``; a Linear subclass or a hooked base runs as it is."""
        base = self.base
        if type(base) is not nn.Linear or base._forward_hooks or base._forward_pre_hooks:
            return LoRALinear.update(self, rows, base(rows))
        dt = compute_dtype(rows)
        ts = [rows, base.weight, base.bias, self.lora_A, self._scaled_b()]
        rows, w, c, a, b = (t if t is None or t.dtype == dt else t.to(dt) for t in ts)
        xd = self.dropout(rows) if self.dropout is not None else rows
        with torch.autocast(rows.device.type, enabled=False):
            return _LoRAFunction.apply(rows, xd, w, c, a, b, self.parts, self.rank)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if type(self).update is not LoRALinear.update:  # a subclass with its own update (NOAH)
            return super().forward(x)
        return self.lora_output(x.reshape(-1, x.shape[-1])).view(*x.shape[:-1], -1)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        u = F.linear(self.dropout(x) if self.dropout is not None else x, self.lora_A)  # (N, P*r)
        b = self._scaled_b()
        r, row, deltas = self.rank, 0, []
        for i, (s, e) in enumerate(self.parts):
            deltas.append(narrow_linear(u[:, i * r : (i + 1) * r], b[row : row + e - s]))
            row += e - s
        return add_to_slices(y, self.parts, deltas)

    def delta_weight(self) -> torch.Tensor:
        delta = torch.zeros_like(self.base.weight)
        r, row = self.rank, 0
        for i, (s, e) in enumerate(self.parts):
            delta[s:e] = (
                self.scale * self.lora_B[row : row + e - s] @ self.lora_A[i * r : (i + 1) * r]
            )
            row += e - s
        return delta


@register
class LoRA(Reparameterization):
    """LoRA: low-rank updates of Linear weights (default: q and v of attention)."""

    name = "lora"
    config_cls = LoRAConfig

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: LoRAConfig = self.config
        for path, parts in lora_targets(model, view, cfg, self.name):
            if parts is None:  # a Conv2d
                wrap(model, path, lambda m: LowRankConv(m, cfg.rank, cfg.scale, cfg.dropout))
                continue
            wrap(model, path, lambda m, p=parts: LoRALinear(m, cfg.rank, cfg.scale, cfg.dropout, p))


def lora_targets(model: nn.Module, view: BackboneView, cfg: LoRAConfig,
                 method: str) -> list[tuple[str, list[tuple[int, int]] | None]]:
    """``(path, output rows)`` of the layers to adapt; rows are ``None`` for a Conv2d.

    Linear layers come from :func:`~vpeft.core.inject.linear_targets` (``qkv`` as the view knows
    it). On a family whose attention has no q/k/v projections the default targets mean the
    view's :meth:`~vpeft.backbones.base.BackboneView.update_targets`: the MLP layers (ConvNeXt),
    or the block convs (not depthwise) and ``final_features`` (a CNN). On a backbone without a
    token sequence (a CNN, ConvNeXt) explicit patterns also select Conv2d layers.
    """
    default = LoRAConfig.__dataclass_fields__["targets"].default
    if cfg.targets == default and not view.has_qkv and view.blocks:
        found = view.update_targets(method=method)
    elif view.sequence_tokens or not view.convs:
        return linear_targets(model, view, cfg.targets, cfg.qkv, method)
    else:
        found = [p for p in find_modules(model, cfg.targets, (nn.Linear, nn.Conv2d))
                 if not view.in_head(p)]
    layers = [(p, model.get_submodule(p)) for p in found]
    return [(p, None if isinstance(m, nn.Conv2d) else [(0, m.out_features)]) for p, m in layers]
