"""Ladder Side-Tuning (Sung et al., 2022, arXiv:2206.06522): a narrow side network on ladders.

A side network of width ``d = D / r`` (``r = 8`` by default) runs beside the frozen backbone. It
starts from the downsampled input of the first block and, after each of its layers ``i``, mixes in
the downsampled output of backbone block ``i`` through a learned gate (the "ladder"):

    s_0 = down_0(h_0);   s_i = mu_i * side_i(s_{i-1}) + (1 - mu_i) * down_i(h_i),
    mu_i = sigmoid(alpha_i / T)   (T = 0.1 and alpha_i = 0, i.e. mu_i = 0.5, at the start)

The backbone runs under ``torch.no_grad()`` (its blocks are wrapped in
:class:`~vpeft.core.side.FeatureTap`), so back-propagation only goes through the side network and
the ladders: the backbone's activations are never kept for a backward pass, which is where LST's
memory saving comes from. The side output is upsampled to ``D`` and added to the tokens after the
backbone's final norm, so pooling and head are unchanged; the upsampling starts at zero, so the
adapted model starts equal to the base (LST instead initialises the side network from a pruned
copy of the backbone and feeds the head from the side output alone).

Each ladder first applies a LayerNorm without parameters: the residual stream's scale grows with
depth, and LST's vision variants normalise before downsampling too.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.method import Method
from vpeft.core.side import FeatureTap, Stash, frozen_pass
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register


@dataclass
class LSTConfig(MethodConfig):
    reduction: int = option(8, "Reduction factor r: the side network is D / r wide.")
    side_layer: str = option("block", "Side layers: 'block' (a transformer block, as LST) or "
                                      "'mlp' (a pre-norm residual MLP, cheaper).")
    gate_init: float = option(0.0, "Initial gate logit alpha; mu = sigmoid(alpha / T) is the "
                                    "weight of the side path (0 -> 0.5).")
    gate_temperature: float = option(0.1, "Gate temperature T (LST uses 0.1).")

    def validate(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"lst reduction must be >= 1, got {self.reduction}")
        if self.side_layer not in ("block", "mlp"):
            raise ValueError(f"lst side_layer must be 'block' or 'mlp', got {self.side_layer!r}")
        if self.gate_temperature <= 0:
            raise ValueError(f"lst gate_temperature must be > 0, got {self.gate_temperature}")


class ResidualMLP(nn.Module):
    """``x + mlp(norm(x))``: the side layer without attention."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, 4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.norm(x))


class Ladder(Wrapper):
    """The backbone's final norm plus the side network reading the stashed block features."""

    def __init__(self, base: nn.Module, dim: int, depth: int, cfg: LSTConfig, heads: int,
                 stash: Stash) -> None:
        super().__init__(base)
        d = max(1, dim // cfg.reduction)
        self.temperature = cfg.gate_temperature
        self.downs = nn.ModuleList(nn.Linear(dim, d) for _ in range(depth + 1))
        self.layers = nn.ModuleList(
            Block(d, heads if d % heads == 0 else 1, qkv_bias=True) if cfg.side_layer == "block"
            else ResidualMLP(d) for _ in range(depth))
        self.gates = nn.Parameter(torch.full((depth,), float(cfg.gate_init)))
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, dim)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.__dict__["stash"] = stash

    def ladder(self, i: int, h: torch.Tensor) -> torch.Tensor:
        return self.downs[i](F.layer_norm(h, h.shape[-1:]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with frozen_pass():
            y = self.base(x)
        feats = list(self.stash)  # [input of block 0, output of block 0, ..., of block L-1]
        self.stash.clear()
        if len(feats) != len(self.downs):
            raise RuntimeError(f"lst expected {len(self.downs)} block features, got {len(feats)}; "
                               "run the whole model")
        mu = torch.sigmoid(self.gates / self.temperature)
        s = self.ladder(0, feats[0])  # (B, N, d)
        for i, layer in enumerate(self.layers):
            s = mu[i] * layer(s) + (1 - mu[i]) * self.ladder(i + 1, feats[i + 1])
        return y + self.up(self.norm(s)).to(y.dtype)


@register
class LST(Method):
    """LST: a D/r-wide side network fed by gated ladders from every block; no backbone backprop."""

    name = "lst"
    config_cls = LSTConfig
    family = "addition"
    subfamily = "side"
    memory_saving = True
    zero_init = True

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        view.require("blocks", "sequence_tokens", "final_norm", "embed_dim", method=self.name)
        attn = model.get_submodule(view.block_part(0, "attn")) if view.attn else None
        heads = getattr(attn, "num_heads", 1)  # the side blocks keep the backbone's head count
        stash = Stash()
        for i, path in enumerate(view.blocks):
            record = "both" if i == 0 else "output"
            wrap(model, path, lambda b, r=record, i=i: FeatureTap(b, stash, r, first=i == 0))
        wrap(model, view.final_norm,
             lambda n: Ladder(n, view.embed_dim, view.depth, self.config, heads, stash))
