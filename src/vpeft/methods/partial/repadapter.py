"""RepAdapter (Luo et al., 2023, arXiv:2302.08106): a linear adapter merged into the next layer.

A sequential adapter with *no* nonlinearity sits on the input of the attention and of the MLP:

    x' = x + s * (B (A x + a) + b)          A: dense (h x D), B: group-wise (D x h, g groups)

Being affine, it folds into the first Linear that reads ``x'`` (the fused ``qkv`` and ``fc1``):
with ``M = I + s B A``, ``W' = W M`` and ``c' = c + s W (B a + b)``, so the merged model is the
plain backbone (structural re-parameterisation). Unmerging inverts ``M`` with the Woodbury
identity, ``M^-1 = I - s B (I + s A B)^-1 A``, which only needs an ``h x h`` solve.

It is filed under partial/reparameterization although it is built like an adapter: what it leaves
behind is a reparameterised ``qkv``/``fc1`` weight, with zero inference overhead, like LoRA (the
guide's taxonomy layout puts it here too).

Defaults follow the official code: h = 8, g = 2, dropout 0.1 between A and B, A Xavier-uniform,
B and both biases zero (so the adapted model starts equal to the base), adapters before both
attention and MLP ("RepAdapter", not the attention-only variant). ViT-B/16: 239,808 trainable
parameters besides the head (the paper reports 0.22M, which is the count of the weights alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView, MissingPartError
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import compute_dtype
from vpeft.core.surgery import Wrapper, wrap
from vpeft.methods.partial.base import Reparameterization
from vpeft.registry import register


@dataclass
class RepAdapterConfig(MethodConfig):
    dim: int = option(8, "Hidden width h of the adapter.")
    groups: int = option(2, "Groups g of the up-projection B (block-diagonal, sparse).")
    scale: float = option(1.0, "Scale s of the adapter branch (searched per task in the paper).")
    dropout: float = option(0.1, "Dropout between A and B (training only; merging ignores it).")
    positions: tuple[str, ...] = option(("attn", "mlp"), "Sub-layers whose input gets an adapter.")

    def validate(self) -> None:
        if self.dim < 1 or self.groups < 1 or self.dim % self.groups:
            raise ValueError(f"repadapter dim ({self.dim}) must be a positive multiple of groups "
                             f"({self.groups})")
        if not self.positions or set(self.positions) - {"attn", "mlp"}:
            raise ValueError(f"repadapter positions must be among ('attn', 'mlp'), "
                             f"got {self.positions}")


class _RepAdapterFunction(torch.autograd.Function):
    """A frozen Linear on the adapted input, ``y = W (x + s (B drop(A x + a) + b)) + c``, as
    ``y = x W^T + c_b + drop(h) W_b^T`` with ``h = x A^T + a``, ``W_b = s W B`` and
    ``c_b = c + s W b`` (the two small products are done by the caller, in autograd).

    Built like the fused LoRA function: without dropout the adapter folds into the layer's one
    product, ``[y | h] = x [W + W_b A ; A]^T`` (the merge of :meth:`RepAdaptedLinear.fold`), and
    the backward's ``[g_x | g_h] = g [W + W_b A | W_b]`` gives the input gradient with the
    adapter's path in it; with dropout (a mask on ``h``) ``y += drop(h) W_b^T`` and
    ``g_x += (m * g_h) A`` follow. ``A``'s gradient is ``g_h^T x``, ``W_b``'s ``(h^T g)^T``.
    Saves ``x``, the narrow ``h`` and the keep mask (bytes); ``x`` is ``(N, D)``.
    """

    @staticmethod
    def forward(ctx, x, weight, bias, down, down_bias, wb, keep, p):  # type: ignore[override]
        out = weight.shape[0]
        ctx.fold = keep is None and x.dtype in (torch.float32, torch.float64)
        w = torch.addmm(weight, wb, down) if ctx.fold else weight
        c = torch.addmv(bias, wb, down_bias) if ctx.fold else bias
        yh = F.linear(x, torch.cat([w, down]), torch.cat([c, down_bias]))
        # not a view for autograd: the caller may modify y in place (its memory is y's own)
        y, h = yh[:, :out].detach(), yh[:, out:].clone()
        if not ctx.fold:
            y.addmm_(_RepAdapterFunction.masked(h, keep, p), wb.t())
        ctx.save_for_backward(x, weight, down, wb, h, keep)
        ctx.p = p
        return y

    @staticmethod
    def masked(h: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
        return h if keep is None else h * keep / (1 - p)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, down, wb, h, keep = ctx.saved_tensors
        need_x, _, need_c, need_a, need_ab, need_wb = ctx.needs_input_grad[:6]
        g = g.contiguous()
        w = torch.addmm(weight, wb, down) if ctx.fold else weight
        both = g @ torch.cat([w, wb], dim=1)  # [g_x | g_h]: one product
        gx, gh = both[:, : x.shape[1]], _RepAdapterFunction.masked(both[:, x.shape[1]:],
                                                                   keep, ctx.p)
        if need_x and not ctx.fold:
            gx.addmm_(gh, down)
        grad_wb = (_RepAdapterFunction.masked(h, keep, ctx.p).t() @ g).t() if need_wb else None
        return ((gx if need_x else None), None, (g.sum(0) if need_c else None),
                (gh.t() @ x if need_a else None), (gh.sum(0) if need_ab else None), grad_wb,
                None, None)


class RepAdaptedLinear(Wrapper):
    """``base(x + s * (B (A x + a) + b))``; ``fold`` merges the adapter into ``base``."""

    base: nn.Linear

    def __init__(self, base: nn.Linear, hidden: int, groups: int, scale: float,
                 dropout: float) -> None:
        super().__init__(base)
        dim = base.in_features
        if dim % groups:
            raise ValueError(f"repadapter groups ({groups}) must divide the width {dim}")
        self.groups, self.scale = groups, scale
        self.down = nn.Parameter(base.weight.new_empty(hidden, dim))
        self.down_bias = nn.Parameter(base.weight.new_zeros(hidden))
        # B as g blocks: output group j (dim/g rows) reads only hidden group j (h/g channels)
        self.up = nn.Parameter(base.weight.new_zeros(groups, dim // groups, hidden // groups))
        self.up_bias = nn.Parameter(base.weight.new_zeros(dim))
        nn.init.xavier_uniform_(self.down)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def dense_up(self) -> torch.Tensor:
        """B as a dense ``(D, h)`` matrix (block-diagonal)."""
        return torch.block_diag(*self.up.unbind(0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        if (type(base) is nn.Linear and not base.weight.requires_grad and not base._forward_hooks
                and not base._forward_pre_hooks):
            return self.fused(x)
        return self.adapted(x)

    def fused(self, x: torch.Tensor) -> torch.Tensor:
        """:meth:`adapted` as one :class:`_RepAdapterFunction` on a frozen plain Linear."""
        base, rows = self.base, x.reshape(-1, x.shape[-1])
        w, bias = base.weight, base.bias if base.bias is not None else base.weight.new_zeros(
            base.out_features)
        wb = self.scale * (w @ self.dense_up())  # s W B (out x h)
        cb = torch.addmv(bias, w, self.up_bias, alpha=self.scale)  # c + s W b
        keep = None
        if self.training and isinstance(self.dropout, nn.Dropout):
            keep = torch.empty(rows.shape[0], self.down.shape[0], device=x.device)
            keep = keep.bernoulli_(1 - self.dropout.p).bool()
        dt = compute_dtype(x)
        ts = (rows, w, cb, self.down, self.down_bias, wb)
        with torch.autocast(x.device.type, enabled=False):
            y = _RepAdapterFunction.apply(*(t.to(dt) for t in ts), keep,
                                          self.dropout.p if keep is not None else 0.0)
        return y.view(*x.shape[:-1], -1)

    def adapted(self, x: torch.Tensor) -> torch.Tensor:
        """The adapter as written: ``base(x + s * (B (A x + a) + b))``."""
        h = self.dropout(F.linear(x, self.down, self.down_bias))  # (..., h)
        h = torch.einsum("...gi,goi->...go", h.unflatten(-1, (self.groups, -1)), self.up)
        return self.base(x + self.scale * (h.flatten(-2) + self.up_bias))

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``s B``, ``A`` and the branch's constant ``s (B a + b)``, in float64 for exact folds."""
        sb = self.scale * self.dense_up().double()
        shift = sb @ self.down_bias.double() + self.scale * self.up_bias.double()
        return sb, self.down.double(), shift

    def fold_adds_bias(self) -> bool:
        return self.base.bias is None  # the branch's constant s (B a + b) becomes W-mapped bias

    @torch.no_grad()
    def fold(self) -> nn.Module:
        sb, a, shift = self._factors()
        w = self.base.weight.double()
        merged = w + (w @ sb) @ a  # W (I + s B A)
        if self.base.bias is None:
            self.base.bias = nn.Parameter(w.new_zeros(w.shape[0]).to(self.base.weight.dtype),
                                          requires_grad=False)
        self.base.bias += (w @ shift).to(self.base.bias.dtype)
        self.base.weight.copy_(merged)
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        sb, a, shift = self._factors()
        merged = self.base.weight.double()
        eye = torch.eye(a.shape[0], dtype=merged.dtype, device=merged.device)
        # W = W' (I + sBA)^-1 = W' - W' sB (I + A sB)^-1 A   (Woodbury)
        w = merged - (merged @ sb) @ torch.linalg.solve(eye + a @ sb, a)
        self.base.bias -= (w @ shift).to(self.base.bias.dtype)
        self.base.weight.copy_(w)


def input_linear(model: nn.Module, view: BackboneView, i: int, part: str) -> str:
    """Path of the Linear that reads ``part``'s input in block ``i`` (fused qkv, or fc1)."""
    if part == "attn":
        view.require("qkv", method="repadapter")
        return view.block_part(i, "qkv")
    root = view.block_part(i, "mlp")
    for name, m in model.get_submodule(root).named_modules():
        if isinstance(m, nn.Linear):  # the MLP's first Linear is the one fed by its input
            return f"{root}.{name}"
    raise MissingPartError(f"method 'repadapter' found no Linear in {root}")


@register
class RepAdapter(Reparameterization):
    """RepAdapter: linear group-wise adapters before attention and MLP, merged into qkv / fc1."""

    name = "repadapter"
    config_cls = RepAdapterConfig

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: RepAdapterConfig = self.config
        default = RepAdapterConfig.__dataclass_fields__["positions"].default
        positions = view.sublayers(cfg.positions, default, self.name)  # ConvNeXt: MLP only
        for i in range(view.depth):
            for part in positions:
                wrap(model, input_linear(model, view, i, part),
                     lambda m: RepAdaptedLinear(m, cfg.dim, cfg.groups, cfg.scale, cfg.dropout))
