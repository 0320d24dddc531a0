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
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView, MissingPartError
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import LinearUpdate, lowrank_, narrow_linear, share
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


class FacTLinear(LinearUpdate):
    """A Linear whose weight is a grid of ``n_out x n_in`` slices of size ``D x D``."""

    factors: FacTFactors  # shared by all FacTLinear layers of a model, set by share()

    def __init__(self, base: nn.Linear, dim: int, rank: int, scale: float, dropout: float,
                 tucker: bool, code_bound: float) -> None:
        super().__init__(base)
        if base.out_features % dim or base.in_features % dim:
            raise MissingPartError(f"fact needs Linear sizes that are multiples of the width "
                                   f"{dim}, got {base.in_features} -> {base.out_features}")
        n_out, n_in = base.out_features // dim, base.in_features // dim
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

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        f = self.factors
        u = F.linear(x.unflatten(-1, (-1, self.dim)), f.u)  # (..., n_in, r)
        z = self.dropout(torch.einsum("...ir,oiqr->...oq", u, self.cores()))  # (..., n_out, r)
        # y is the Linear's output, not saved for its backward: add in place
        return y.add_(narrow_linear(z, f.v).flatten(-2), alpha=self.scale)

    def delta_weight(self) -> torch.Tensor:
        f = self.factors
        delta = torch.einsum("dq,oiqr,re->odie", f.v, self.cores(), f.u)
        return self.scale * delta.reshape(self.base.out_features, self.base.in_features)


class FacT(Reparameterization):
    """Shared apply of FacT-TT and FacT-TK: every D x D slice of every block, one set of factors."""

    tucker = False

    def targets(self, model: nn.Module, view: BackboneView) -> list[str]:
        """qkv and the attention's output Linear, fc1 and fc2, in every block."""
        view.require("blocks", "attn", "embed_dim", method=self.name)
        paths = []
        for i in range(view.depth):
            parts = [view.block_part(i, "attn")] + ([view.block_part(i, "mlp")] if
                                                    self.config.mlp else [])
            for root in parts:
                paths += [f"{root}.{n}" for n, m in model.get_submodule(root).named_modules()
                          if isinstance(m, nn.Linear)]
        return paths

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: FacTConfig = self.config
        paths = self.targets(model, view)
        dim = view.embed_dim
        linears = [model.get_submodule(p) for p in paths]
        slices = sum((m.out_features // dim) * (m.in_features // dim) for m in linears)
        code_bound = math.sqrt(6.0 / (cfg.rank + slices))  # Xavier bound of P (r x S)
        ref = linears[0].weight
        factors = FacTFactors(dim, cfg.rank, self.tucker, ref)
        wrapped = [wrap(model, p, lambda m: FacTLinear(m, dim, cfg.rank, cfg.scale, cfg.dropout,
                                                       self.tucker, code_bound)) for p in paths]
        share(wrapped, "factors", factors)
        # U's gradient needs every adapted Linear's input: recompute those that are a norm's or
        # the MLP activation's output rather than keep them (see vpeft.core.recompute)
        recompute_norm_and_act_outputs(model, [model.get_submodule(b) for b in view.blocks])


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
