"""LN-Tune (Qi et al., 2022, arXiv:2211.08682): train the LayerNorm weights and biases only.

Every normalisation layer of the backbone (the blocks' ``norm1``/``norm2`` and the final ``norm`` or
``fc_norm``) keeps its affine parameters trainable; nothing is added, so merging is a no-op.
On CNNs this tunes the BatchNorm scales and shifts; their running statistics stay frozen (the
layers normalise in eval mode) unless ``norm_stats`` asks for them to be updated.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.targeting import norm_params
from vpeft.methods.partial.base import Specification
from vpeft.registry import register


@dataclass
class LNTuneConfig(MethodConfig):
    """LN-Tune trains the affine parameters of LayerNorm, GroupNorm and BatchNorm layers."""

    norm_stats: bool = option(
        False, "Update BatchNorm running statistics while training (default: frozen, eval mode)."
    )


@register
class LNTune(Specification):
    """LN-Tune: train the normalisation layers' scales and shifts."""

    name = "ln-tune"
    config_cls = LNTuneConfig

    def select(self, model: nn.Module, view: BackboneView) -> list[nn.Parameter]:
        params = norm_params(model, view)
        if not params:
            raise ValueError("ln-tune found no affine normalisation layer in "
                             f"{type(model).__name__}")
        return params
