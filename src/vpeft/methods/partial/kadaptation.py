"""KAdaptation (He et al., 2023, arXiv:2203.16329): Kronecker-product weight updates (PHM style).

The update of each adapted weight (default: W_q and W_v, like LoRA) is a sum of ``n`` Kronecker
products of a small *slow* matrix, shared by all layers, and a low-rank *fast* matrix of its own:

    dW = s * sum_i A_i (x) B_i,      A_i: n x n (shared),   B_i = u_i v_i^T: (d_out/n) x (d_in/n)

Following the official code (github eric-ai-lab/PEViT, ``vision_benchmark/evaluation/model.py``):
n = 32, rank 1 for both the fast ``B_i`` and the slow ``A_i`` (kept as rank-1 factors, drawn from
U(-0.01, 0.01)), one slow set per kind of weight (q, v), scale ``s = 160`` (its alpha / r * 5), a
learned bias on the update shared by q and v of a layer, and, by default:

* dropout 0.5 on the update matrix ``sum_i A_i (x) B_i`` while training (``dropout``), as the
  official ``kdropout``; at evaluation (and when merging) the whole update is used.
* q's update added *after* the attention's ``1 / sqrt(head_dim)`` scaling, as the official code adds
  ``q_delta`` to the already scaled q (``q_after_scale``): vpeft multiplies the q rows of ``dW`` and
  of the bias by ``sqrt(head_dim)``, which timm's scaling then cancels (exact without q-norm).

Where vpeft differs, and why:

* v gets its own fast weights. The official code allocates ``v_proj_adapter1_left/right`` but builds
  v's update from q's fast weights (``kron(phm_rule2, Wq)``), leaving v's factors unused; its
  README's parameter count includes them. ``share_fast=True`` reproduces the reuse.
* The official code zero-initialises *both* fast factors, which leaves every Kronecker factor
  without gradient (only the bias trains); vpeft zeros ``u_i`` only (and draws ``v_i`` as LoRA draws
  ``A``), so the model still starts equal to the base and the update can learn.

Merging adds ``dW`` (and the bias) to the weight. ViT-B: 50,176 trainable parameters besides the
head, as the official README's average (79,699 with the head, minus 29,523 for the head alone).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import LinearUpdate, linear_targets, lowrank_, output_parts, share
from vpeft.core.surgery import wrap
from vpeft.methods.partial.base import Reparameterization
from vpeft.registry import register


@dataclass
class KAdaptationConfig(MethodConfig):
    n: int = option(32, "Number of Kronecker products, and the size n x n of each slow matrix.")
    rank: int = option(1, "Rank of each fast matrix B_i = u_i v_i^T.")
    slow_rank: int = option(1, "Rank of the factorised slow matrices A_i.")
    scale: float = option(160.0, "Scale s of the update (the official code's alpha / r * 5).")
    bias: bool = option(True, "Learn a bias on the update (shared by the parts of a fused layer).")
    targets: tuple[str, ...] = option(("qkv",), "Linear layers to adapt, by name pattern.")
    qkv: str = option("qv", "Which of q, k, v get an update on fused qkv layers.")
    dropout: float = option(0.5, "Dropout on the update matrix while training (0.5 in the "
                                 "official code).")
    q_after_scale: bool = option(True, "Add q's update after the attention's 1/sqrt(head_dim) "
                                       "scaling, as the official code (False: before, like LoRA).")
    share_fast: bool = option(False, "Build every part's update of a layer from the first part's "
                                     "fast weights, as the official code does for v (which then "
                                     "reuses q's); False gives each part its own.")

    def validate(self) -> None:
        if min(self.n, self.rank, self.slow_rank) < 1:
            raise ValueError("kadaptation n, rank and slow_rank must be >= 1")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"kadaptation dropout must be in [0, 1), got {self.dropout}")
        if not self.qkv or set(self.qkv) - set("qkv"):
            raise ValueError(f"kadaptation qkv must be a non-empty subset of 'qkv', "
                             f"got {self.qkv!r}")


class SlowWeights(nn.Module):
    """The shared slow matrices ``A_i = left_i @ right_i`` (n of them, each n x n)."""

    def __init__(self, n: int, rank: int, ref: torch.Tensor) -> None:
        super().__init__()
        self.left = nn.Parameter(ref.new_empty(n, n, rank).uniform_(-0.01, 0.01))
        self.right = nn.Parameter(ref.new_empty(n, rank, n).uniform_(-0.01, 0.01))

    def forward(self) -> torch.Tensor:
        return self.left @ self.right  # (n, n, n): [i, a, c]


class KronLinear(LinearUpdate):
    """A Linear whose output rows ``parts`` get ``s * sum_i A_i (x) (u_i v_i^T)`` (+ bias)."""

    slow: nn.ModuleDict  # set by share()
    # it runs as W + dW: building dW is far cheaper than n Kronecker products for every token
    through_weight = True

    def __init__(self, base: nn.Linear, parts: list[tuple[int, int]], keys: list[str], n: int,
                 rank: int, scale: float, bias: bool, part_scales: list[float],
                 dropout: float = 0.0, share_fast: bool = False) -> None:
        super().__init__(base)
        width = parts[0][1] - parts[0][0]
        if width % n or base.in_features % n:
            raise ValueError(f"kadaptation n={n} must divide the layer sizes "
                             f"({base.in_features} in, {width} per part)")
        self.parts, self.keys, self.n, self.scale = parts, keys, n, scale
        self.part_scales, self.dropout = part_scales, dropout
        self._drop = False  # set for the duration of a training forward only (never when folding)
        ref, sets = base.weight, 1 if share_fast else len(parts)
        self.fast_u = nn.Parameter(ref.new_zeros(sets, n, width // n, rank))
        self.fast_v = nn.Parameter(ref.new_empty(sets, n, rank, base.in_features // n))
        for v in self.fast_v.data.flatten(0, 1):
            lowrank_(v)
        self.kron_bias = nn.Parameter(ref.new_zeros(width)) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._drop = self.training and self.dropout > 0
        try:
            return super().forward(x)
        finally:
            self._drop = False

    def delta_weight(self) -> torch.Tensor:
        delta = torch.zeros_like(self.base.weight)
        for j, (s, e) in enumerate(self.parts):
            f = min(j, self.fast_u.shape[0] - 1)  # a shared set serves every part
            fast = self.fast_u[f] @ self.fast_v[f]  # (n, d_out/n, d_in/n)
            kron = torch.einsum("iac,ikl->akcl", self.slow[self.keys[j]](), fast)
            kron = kron.reshape(e - s, -1)
            if self._drop:
                kron = F.dropout(kron, self.dropout, training=True)
            delta[s:e] = self.scale * self.part_scales[j] * kron
        return delta

    def delta_bias(self) -> torch.Tensor | None:
        if self.kron_bias is None:
            return None
        db = self.base.weight.new_zeros(self.base.out_features)
        for (s, e), f in zip(self.parts, self.part_scales, strict=True):
            db[s:e] = f * self.kron_bias
        return db


@register
class KAdaptation(Reparameterization):
    """KAdaptation: Kronecker products of shared slow and low-rank fast matrices."""

    name = "kadaptation"
    config_cls = KAdaptationConfig

    def part_scales(self, model: nn.Module, path: str, kinds: list[str]) -> list[float]:
        """Multiplier of each part's update: ``sqrt(head_dim)`` on q (rows of a fused layer, or
        a separate q projection) when ``q_after_scale`` (the attention's ``scale`` then
        cancels), else 1."""
        qscale = getattr(model.get_submodule(path.rpartition(".")[0]), "scale", None)
        if not (self.config.q_after_scale and isinstance(qscale, float) and qscale):
            return [1.0] * len(kinds)
        return [1.0 / qscale if c == "q" else 1.0 for c in kinds]

    def targets(self, model: nn.Module, view: BackboneView) -> list[str]:
        """The Linear layers to adapt: ``qkv`` as the view knows it (fused, or the separate
        projections named by ``qkv``); by default on a family without attention projections
        the view's ``update_targets`` (ConvNeXt's MLP Linears)."""
        cfg: KAdaptationConfig = self.config
        default = KAdaptationConfig.__dataclass_fields__["targets"].default
        if cfg.targets == default and not view.has_qkv and view.blocks:
            return view.update_targets((nn.Linear,), method=self.name)
        return [p for p, _ in linear_targets(model, view, cfg.targets, cfg.qkv, self.name)]

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: KAdaptationConfig = self.config
        fused = view.fused_qkv_paths()
        separate = {p: c for c in "qkv" for p in view.separate_qkv_paths(c)}
        plan = []  # (path, parts, slow keys, scales): one slow set per kind of weight
        for path in self.targets(model, view):
            leaf = path.rpartition(".")[2]
            parts = output_parts(model.get_submodule(path).out_features, cfg.qkv, path in fused)
            kinds = [c for c in "qkv" if c in cfg.qkv] if path in fused else [separate.get(path,
                                                                                     "")]
            keys = [f"{leaf}_{c}" for c in kinds] if path in fused else [leaf]
            plan.append((path, parts, keys, self.part_scales(model, path, kinds)))
        if not plan:
            return
        ref = model.get_submodule(plan[0][0]).weight
        names = dict.fromkeys(k for _, _, keys, _ in plan for k in keys)
        slow = nn.ModuleDict({k: SlowWeights(cfg.n, cfg.slow_rank, ref) for k in names})
        wrapped = [wrap(model, path, lambda m, p=parts, k=keys, f=scales: KronLinear(
            m, p, k, cfg.n, cfg.rank, cfg.scale, cfg.bias, f, cfg.dropout, cfg.share_fast))
            for path, parts, keys, scales in plan]
        share(wrapped, "slow", slow)
