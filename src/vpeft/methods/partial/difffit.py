"""DiffFit (Xie et al., 2023, arXiv:2304.06648): BitFit plus norms plus learned residual scales.

Trainable: every bias term, the normalisation layers' weights and biases, and a scale ``gamma`` on
each block's attention and MLP residual branch, ``x + gamma * f(norm(x))``, initialised to 1 so the
adapted model starts equal to the base. (DiffFit also tunes DiT's class embedding; for a classifier
that role is the head's, which trains anyway.) ``gamma`` is per channel by default, as in the
public re-implementations; ``per_channel=False`` gives one scalar per branch.

Merging folds ``gamma`` into the branch's last Linear (``proj`` / ``fc2``):
``W' = diag(gamma) W``, ``c' = gamma * c``; the merged model is the plain backbone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.surgery import NotMergeableError, Wrapper, mark_trainable, wrap
from vpeft.core.targeting import norm_params
from vpeft.methods.partial.base import Specification, backbone_params
from vpeft.registry import register


@dataclass
class DiffFitConfig(MethodConfig):
    positions: tuple[str, ...] = option(("attn", "mlp"), "Residual branches scaled by a gamma.")
    per_channel: bool = option(True, "One gamma per channel (True) or one scalar per branch.")

    def validate(self) -> None:
        if not self.positions or set(self.positions) - {"attn", "mlp"}:
            raise ValueError(f"difffit positions must be among ('attn', 'mlp'), "
                             f"got {self.positions}")


class BranchScale(Wrapper):
    """``gamma * base(x)`` for a residual branch (``block.attn``, ``block.mlp``)."""

    def __init__(self, base: nn.Module, channels: int) -> None:
        super().__init__(base)
        self.gamma = nn.Parameter(next(base.parameters()).new_ones(channels))

    def forward(self, *args, **kwargs) -> torch.Tensor:
        y = self.base(*args, **kwargs)  # HF CLIP passes hidden_states= by keyword
        if isinstance(y, tuple):  # an attention returning (output, weights ...): HF, open_clip
            return (self.gamma * y[0], *y[1:])
        return self.gamma * y

    def _output_linear(self) -> nn.Linear:
        """The branch's last Linear: in timm's Attention / Mlp only dropout follows it."""
        linears = [m for m in self.base.modules() if isinstance(m, nn.Linear)]
        if self.gamma.numel() > 1:  # not an input projection (open_clip's packed qkv)
            linears = [m for m in linears if m.out_features == self.gamma.numel()]
        if not linears:
            raise NotMergeableError(f"difffit cannot fold gamma into {type(self.base).__name__}: "
                                    "it has no Linear layer")
        return linears[-1]

    def _gamma_rows(self, out: int) -> torch.Tensor:
        return self.gamma.expand(out) if self.gamma.numel() == 1 else self.gamma

    @torch.no_grad()
    def fold(self) -> nn.Module:
        lin = self._output_linear()
        g = self._gamma_rows(lin.out_features).to(lin.weight.dtype)
        lin.weight.mul_(g[:, None])
        if lin.bias is not None:
            lin.bias.mul_(g)
        return self.base

    @torch.no_grad()
    def unfold(self) -> None:
        lin = self._output_linear()
        g = self._gamma_rows(lin.out_features).to(lin.weight.dtype)
        lin.weight.div_(g[:, None])
        if lin.bias is not None:
            lin.bias.div_(g)


@register
class DiffFit(Specification):
    """DiffFit: biases, norms and per-block residual scales gamma (folded on merge)."""

    name = "difffit"
    config_cls = DiffFitConfig

    def select(self, model: nn.Module, view: BackboneView) -> list[nn.Parameter]:
        biases = [p for n, p in backbone_params(model, view) if n.endswith("bias")]
        return list({id(p): p for p in [*biases, *norm_params(model, view)]}.values())

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: DiffFitConfig = self.config
        default = DiffFitConfig.__dataclass_fields__["positions"].default
        positions = view.sublayers(cfg.positions, default, self.name)  # ConvNeXt: MLP only
        mark_trainable(self.select(model, view))
        for i in range(view.depth):
            channels = view.block_dims[i] if cfg.per_channel else 1
            for part in positions:
                wrap(model, view.block_part(i, part), lambda m, c=channels: BranchScale(m, c))
