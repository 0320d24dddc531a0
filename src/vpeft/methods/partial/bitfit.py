"""BitFit (Zaken et al., 2022, arXiv:2106.10199): train the bias terms only."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.methods.partial.base import Specification, backbone_params
from vpeft.registry import register


@dataclass
class BitFitConfig(MethodConfig):
    """BitFit (Zaken et al., 2022) trains every bias term of the backbone."""

    norms: bool = option(True, "Include normalisation-layer biases (as the BitFit paper does).")
    norm_stats: bool = option(
        False, "Update BatchNorm running statistics while training (default: frozen, eval mode)."
    )


@register
class BitFit(Specification):
    """BitFit: train the backbone's bias terms only."""

    name = "bitfit"
    config_cls = BitFitConfig

    def select(self, model: nn.Module, view: BackboneView) -> list[nn.Parameter]:
        norm_types = (nn.LayerNorm, nn.GroupNorm, nn.BatchNorm2d)
        norm_bias = {id(m.bias) for m in model.modules() if isinstance(m, norm_types)}
        return [
            p
            for n, p in backbone_params(model, view)
            if n.endswith("bias") and (self.config.norms or id(p) not in norm_bias)
        ]
