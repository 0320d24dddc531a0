"""FacT (Jie & Deng, 2023, arXiv:2212.03145): factor-tuning of the whole ViT's weight increments.

Every ``D x D`` weight of every block (q, k, v, o and the four ``D x D`` slices each of fc1 and
fc2 at MLP ratio 4) is one slice of a single ``S x D x D`` tensor, ``S = 12 L``. Its increment is
factorised *across layers* with factors shared by all slices:

* ``fact-tt`` (tensor-train): ``dW_k = s * V Sigma_k U^T``, ``U, V`` (D x r) shared, a core
  ``Sigma_k`` (r x r) per slice;
* ``fact-tk`` (Tucker): ``dW_k = s * V (C x_3 p_k) U^T``, ``U, V`` and the core ``C`` (r x r x r)
  shared, a code ``p_k`` (r) per slice.

As in the official code, ``U`` starts Kaiming-uniform, ``V`` at zero (so the model starts equal to
the base), TT cores like ``nn.Linear(r, r)`` and TK's ``C`` / ``P`` Xavier-uniform, with dropout 0.1
on the rank-r features. Every adapted Linear merges by adding its ``dW`` slices to its weight.
Rank and scale are searched per task in the paper; our defaults are the official VTAB configs' most
common values (TT: r = 8, s = 1; TK: r = 32, s = 10). Averaged over those configs' per-task ranks
the ViT-B/16 counts are 39,734 (TT) and 68,985 (TK), the paper's 0.040M and 0.069M.

Beyond the plain ViT (our generalisation; the official code covers ViT only):

* a hierarchical model (Swin) has one width per stage, so the weights of the blocks of each
  width form their own ``S_w x w x w`` tensor with its own ``U``, ``V`` (and ``C``);
* a weight whose sizes are not multiples of the width (EVA's SwiGLU MLP, ratio 8/3) takes
  ``ceil(out / w) x ceil(in / w)`` slices: its last slices are zero-padded in the tensor and
  the increment is cropped to the weight (exact to merge, as every other slice);
* only Linears that read or write the block's tokens are slices (SwinV2's relative-position
  MLP is not); a family without attention (ConvNeXt) contributes its MLP weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import LinearUpdate, compute_dtype, lowrank_, narrow_linear, share
from vpeft.core.recompute import recompute_norm_and_act_outputs
from vpeft.core.surgery import wrap
from vpeft.methods.partial.base import Reparameterization
from vpeft.registry import register


@dataclass
class FacTConfig(MethodConfig):
    rank: int = option(8, "Rank r of the shared factors.")
    scale: float = option(1.0, "Scale s of the increment (searched per task in the paper).")
    dropout: float = option(0.1, "Dropout on the rank-r features (0.1 in the official code).")
    mlp: bool = option(True, "Also adapt fc1 and fc2 (the official code does).")

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"fact rank must be >= 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"fact dropout must be in [0, 1), got {self.dropout}")


class FacTFactors(nn.Module):
    """The factors all slices share: ``U`` (r x D), ``V`` (D x r) and, for Tucker, ``C``."""

    def __init__(self, dim: int, rank: int, tucker: bool, ref: torch.Tensor) -> None:
        super().__init__()
        self.u = nn.Parameter(ref.new_empty(rank, dim))
        self.v = nn.Parameter(ref.new_zeros(dim, rank))
        lowrank_(self.u)
        self.core = nn.Parameter(nn.init.xavier_uniform_(ref.new_empty(rank, rank, rank))) \
            if tucker else None


class _FacTFunction(torch.autograd.Function):
    """A frozen Linear plus its FacT update, ``y = x W^T + c + s drop(f C) Vb^T``, ``f = x Ub^T``.

    ``Ub`` and ``Vb`` are ``U`` and ``V`` repeated along a block diagonal (one block per input /
    output slice) and ``C`` is the slices' cores as one ``(n_in r, n_out r)`` matrix. Built like
    the fused LoRA function (:class:`~vpeft.methods.partial.lora._LoRAFunction`): a rank-r
    product costs little in FLOPs but reads a whole activation, about as long as the layer's own
    product on a CPU, so they are folded into the large products the frozen layer runs anyway:

    * forward: ``[y | f] = x [W + dW ; Ub]^T`` in one product, ``dW = s Vb C^T Ub`` built from
      the factors (``d^2 r`` work, no activation); with dropout (a mask on ``f C``, per token)
      the update cannot fold: ``[y | f] = x [W ; Ub]^T``, then ``y += s (m * f C) Vb^T``;
    * backward: ``[g_x | g_z] = g [W + dW | s Vb]`` in one product gives the input gradient
      with the update already in it (with dropout: ``g_x += (m * g_z) C^T Ub``);
    * ``U``'s gradient is ``g_f^T x`` and ``V``'s ``(z^T g)^T``, summed over slices through a
      ``(N * slices, D)`` view: one read of ``x`` and of ``g`` each.

    Saves ``x`` (the Linear's input, which :mod:`vpeft.core.recompute` recomputes where it is a
    norm's or the GELU's output), the narrow ``f`` and the dropout's keep mask (bytes).
    ``x`` is ``(N, n_in D)``, ``y`` ``(N, n_out D)``; the weight may train (its gradient is then
    ``g^T x``).
    """

    @staticmethod
    def forward(ctx, x, weight, bias, u, cmat, v, keep, p, scale):  # type: ignore[override]
        out, fr = weight.shape[0], cmat.shape[0]
        ub, vb = _FacTFunction.blocks(u, v, x.shape[1], out)
        ctx.fold = keep is None and x.dtype in (torch.float32, torch.float64)
        w = torch.addmm(weight, vb @ cmat.t(), ub, alpha=scale) if ctx.fold else weight
        if ub.shape[0] > u.shape[0]:  # several input slices: Ub's zeros would cost FLOPs
            y = F.linear(x, w, bias)
            f = (x.reshape(-1, u.shape[1]) @ u.t()).view(x.shape[0], fr)
        else:
            yf = F.linear(x, torch.cat([w, ub]), None if bias is None else
                          torch.cat([bias, bias.new_zeros(fr)]))
            # not a view for autograd: the caller may modify y in place (its memory is y's own)
            y, f = yf[:, :out].detach(), yf[:, out:].clone()
        if not ctx.fold:
            y.addmm_(_FacTFunction.masked(f @ cmat, keep, p), vb.t(), alpha=scale)
        ctx.save_for_backward(x, weight, u, cmat, v, f, keep)
        ctx.p, ctx.scale, ctx.has_bias = p, scale, bias is not None
        return y

    @staticmethod
    def blocks(u: torch.Tensor, v: torch.Tensor, inp: int,
               out: int) -> tuple[torch.Tensor, torch.Tensor]:
        """``Ub`` ``(n_in r, in)`` and ``Vb`` ``(out, n_out r)``: the factors per slice."""
        dim = u.shape[1]
        return torch.block_diag(*[u] * (inp // dim)), torch.block_diag(*[v] * (out // dim))

    @staticmethod
    def masked(z: torch.Tensor, keep: torch.Tensor | None, p: float) -> torch.Tensor:
        return z if keep is None else z * keep / (1 - p)

    @staticmethod
    def backward(ctx, g):  # type: ignore[override]
        x, weight, u, cmat, v, f, keep = ctx.saved_tensors
        need_x, need_w, need_c, need_u, need_cmat, need_v = ctx.needs_input_grad[:6]
        s, p, (r, dim) = ctx.scale, ctx.p, u.shape
        g = g.contiguous()
        ub, vb = _FacTFunction.blocks(u, v, x.shape[1], weight.shape[0])
        w = torch.addmm(weight, vb @ cmat.t(), ub, alpha=s) if ctx.fold else weight
        both = g @ torch.cat([w, s * vb], dim=1)  # [g_x | g_z]: one product
        gx, gz = both[:, : x.shape[1]], _FacTFunction.masked(both[:, x.shape[1]:], keep, p)
        gf = gz @ cmat.t()  # (N, n_in r)
        if need_x and not ctx.fold:
            gx.addmm_(gf, ub)
        gu = (gf.reshape(-1, r).t() @ x.reshape(-1, dim)) if need_u else None  # (r, D)
        gcmat = f.t() @ gz if need_cmat else None
        gv = None
        if need_v:
            z = _FacTFunction.masked(f @ cmat, keep, p).reshape(-1, r)
            gv = s * (z.t() @ g.view(-1, dim)).t()  # (D, r)
        grad_w = g.t() @ x if need_w else None
        grad_c = g.sum(0) if need_c and ctx.has_bias else None
        return (gx if need_x else None), grad_w, grad_c, gu, gcmat, gv, None, None, None


class FacTLinear(LinearUpdate):
    """A Linear whose weight is a grid of ``n_out x n_in`` slices of size ``D x D``."""

    factors: FacTFactors  # shared by all FacTLinear layers of a model, set by share()

    def __init__(self, base: nn.Linear, dim: int, rank: int, scale: float, dropout: float,
                 tucker: bool, code_bound: float) -> None:
        super().__init__(base)
        n_out, n_in = slices(base.out_features, dim), slices(base.in_features, dim)
        self.dim, self.scale = dim, scale
        ref = base.weight
        if tucker:  # a code p_k per slice, rows of the paper's P (Xavier over P's full shape)
            self.codes = nn.Parameter(ref.new_empty(n_out, n_in, rank).uniform_(-code_bound,
                                                                                code_bound))
        else:  # a core Sigma_k per slice, initialised as nn.Linear(n_in * r, r) would be
            bound = 1 / math.sqrt(rank * n_in)
            self.codes = nn.Parameter(ref.new_empty(n_out, n_in, rank, rank).uniform_(-bound,
                                                                                      bound))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def cores(self) -> torch.Tensor:
        """Each slice's ``r x r`` core, ``(n_out, n_in, r, r)``."""
        if self.factors.core is None:
            return self.codes
        return torch.einsum("abc,oic->oiab", self.factors.core, self.codes)

    @property
    def through_weight(self) -> bool:  # type: ignore[override]
        """Without active dropout ``dW`` is cheaper to build than the rank-r activation path."""
        return not (self.training and isinstance(self.dropout, nn.Dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        base = self.base
        out, inp = base.out_features, base.in_features
        if (not torch.is_grad_enabled() or type(base) is not nn.Linear or out % self.dim
                or inp % self.dim or base._forward_hooks or base._forward_pre_hooks):
            return super().forward(x)  # the weight path, or update() on a partial slice
        rows, f, cores = x.reshape(-1, inp), self.factors, self.cores()
        n_out, n_in, r = cores.shape[:3]
        keep = None
        if self.training and isinstance(self.dropout, nn.Dropout):
            keep = torch.empty(rows.shape[0], n_out * r, device=x.device)
            keep = keep.bernoulli_(1 - self.dropout.p).bool()
        # z[n, o, q] = sum_{i, r'} f[n, i, r'] cores[o, i, q, r']: one (n_in r, n_out r) matrix
        cmat = cores.permute(1, 3, 0, 2).reshape(n_in * r, n_out * r)
        dt = compute_dtype(x)
        ts = (rows, base.weight, base.bias, f.u, cmat, f.v)
        with torch.autocast(x.device.type, enabled=False):
            y = _FacTFunction.apply(*(t if t is None else t.to(dt) for t in ts), keep,
                                    self.dropout.p if keep is not None else 0.0, self.scale)
        return y.view(*x.shape[:-1], out)

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The update in plain autograd, for a Linear whose sizes are not multiples of the
        width (zero-padded last slices) or a hooked base; others run as :class:`_FacTFunction`."""
        f, cores = self.factors, self.cores()
        pad_in = self.codes.shape[1] * self.dim - x.shape[-1]
        x = F.pad(x, (0, pad_in)) if pad_in else x
        u = F.linear(x.unflatten(-1, (-1, self.dim)), f.u)  # (..., n_in, r)
        z = self.dropout(torch.einsum("...ir,oiqr->...oq", u, cores))  # (..., n_out, r)
        # y is the Linear's output, not saved for its backward: add in place
        delta = narrow_linear(z, f.v).flatten(-2)[..., : y.shape[-1]]
        return y.add_(delta, alpha=self.scale)

    def delta_weight(self) -> torch.Tensor:
        f = self.factors
        delta = torch.einsum("dq,oiqr,re->odie", f.v, self.cores(), f.u).flatten(2).flatten(0, 1)
        out, inp = self.base.out_features, self.base.in_features
        return self.scale * delta[:out, :inp]  # the slices' grid, cropped to the weight


class FacT(Reparameterization):
    """Shared apply of FacT-TT and FacT-TK: every w x w slice of every block, one set of factors
    per block width w."""

    tucker = False

    def targets(self, model: nn.Module, view: BackboneView) -> dict[int, list[str]]:
        """Block width -> the Linears of the attention and (``mlp``) the MLP of the blocks of
        that width that read or write the block's tokens (q, k, v or qkv, the output
        projection, fc1, fc2; not SwinV2's relative-position MLP)."""
        parts = [p for p in ("attn", "mlp") if getattr(view, p) and (p == "attn" or
                                                                    self.config.mlp)]
        if not parts:  # ConvNeXt without its MLP, or a CNN: no weights to tensorize
            view.require("blocks", "attn", method=self.name)
        groups: dict[int, list[str]] = {}
        for i, width in enumerate(view.block_dims):
            for root in (view.block_part(i, p) for p in parts):
                groups.setdefault(width, []).extend(
                    f"{root}.{n}" for n, m in model.get_submodule(root).named_modules()
                    if isinstance(m, nn.Linear) and width in (m.in_features, m.out_features))
        return groups

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: FacTConfig = self.config
        for dim, paths in self.targets(model, view).items():
            linears = [model.get_submodule(p) for p in paths]
            n = sum(slices(m.out_features, dim) * slices(m.in_features, dim) for m in linears)
            code_bound = math.sqrt(6.0 / (cfg.rank + n))  # Xavier bound of P (r x S)
            factors = FacTFactors(dim, cfg.rank, self.tucker, linears[0].weight)
            wrapped = [wrap(model, p, lambda m, d=dim, b=code_bound: FacTLinear(
                m, d, cfg.rank, cfg.scale, cfg.dropout, self.tucker, b)) for p in paths]
            share(wrapped, "factors", factors)
        # U's gradient needs every adapted Linear's input: recompute those that are a norm's or
        # the MLP activation's output rather than keep them (see vpeft.core.recompute)
        recompute_norm_and_act_outputs(model, [model.get_submodule(b) for b in view.blocks])


def slices(size: int, dim: int) -> int:
    """How many ``dim``-wide slices cover ``size`` (the last one partial where it does not
    divide: the tensor's slice is zero-padded and the increment cropped to the weight)."""
    return -(-size // dim)


@dataclass
class FacTTTConfig(FacTConfig):
    """FacT-TT: rank 8 and scale 1 by default."""


@dataclass
class FacTTKConfig(FacTConfig):
    rank: int = option(32, "Rank r of the shared factors and of the core C.")
    scale: float = option(10.0, "Scale s of the increment (searched per task in the paper).")


@register
class FacTTT(FacT):
    """FacT-TT: tensor-train factors of all blocks' weight increments."""

    name = "fact-tt"
    config_cls = FacTTTConfig


@register
class FacTTK(FacT):
    """FacT-TK: Tucker factors of all blocks' weight increments."""

    name = "fact-tk"
    config_cls = FacTTKConfig
    tucker = True
