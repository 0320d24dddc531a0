"""SSF (Lian et al., 2022, arXiv:2210.08823): scale and shift the features after each operation.

A learned per-channel ``gamma * y + beta`` follows every Linear, convolution and LayerNorm of the
backbone (the paper's placement); on merge it folds into that layer's weight and bias.

On CNNs the scale and shift also follow every BatchNorm, inside its affine map (before the
activation of a fused norm-act layer, see :class:`~vpeft.core.conv.NormScaleShift`). A conv
without a bias is skipped: in these CNNs a norm layer follows it, whose scale and shift span the
same affine maps and fold without adding a ``bias`` the plain architecture lacks.
"""

from __future__ import annotations

from dataclasses import dataclass

from timm.layers import LayerNorm2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.conv import NormScaleShift
from vpeft.core.inject import ScaleShift
from vpeft.core.surgery import wrap
from vpeft.core.targeting import find_modules
from vpeft.methods.partial.base import Reparameterization
from vpeft.registry import register

TARGET_TYPES = (nn.Linear, nn.Conv2d, nn.LayerNorm, _BatchNorm)
# layers whose channels are dim 1 of an (N, C, H, W) output (ConvNeXt's LayerNorm2d norms dim 1)
CHANNELS_FIRST = (nn.Conv2d, LayerNorm2d)


@dataclass
class SSFConfig(MethodConfig):
    targets: tuple[str, ...] = option(
        (),
        "Modules to follow with scale and shift, by name pattern; "
        "empty = every Linear, Conv2d (with a bias), LayerNorm and BatchNorm of the backbone.",
    )
    init_std: float = option(
        0.02, "Scale ~ N(1, std), shift ~ N(0, std) as in the paper; 0 starts as the identity."
    )
    norm_stats: bool = option(
        False, "Update BatchNorm running statistics while training (default: frozen, eval mode)."
    )


def _channels(m: nn.Module) -> int:
    if isinstance(m, nn.Linear):
        return m.out_features
    if isinstance(m, nn.Conv2d):
        return m.out_channels
    return m.normalized_shape[-1]


@register
class SSF(Reparameterization):
    """SSF: learned scale and shift after every operation; folds into the weights."""

    name = "ssf"
    config_cls = SSFConfig

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: SSFConfig = self.config
        if cfg.targets:
            paths = find_modules(model, cfg.targets, TARGET_TYPES)
        else:
            paths = [n for n, m in model.named_modules() if isinstance(m, TARGET_TYPES)
                     and not (isinstance(m, nn.Conv2d) and m.bias is None)]
        for path in paths:
            if view.in_head(path):
                continue
            m = model.get_submodule(path)
            if isinstance(m, _BatchNorm):
                wrap(model, path, lambda b: NormScaleShift(b, cfg.init_std))
                continue
            if isinstance(m, nn.LayerNorm) and not m.elementwise_affine:
                raise ValueError(f"ssf cannot fold into {path}: LayerNorm without affine weights")
            dim = 1 if isinstance(m, CHANNELS_FIRST) else -1
            wrap(model, path, lambda b, d=dim: ScaleShift(b, _channels(b), d, cfg.init_std))

    @property
    def zero_init(self) -> bool:  # type: ignore[override]  # identity only when init_std == 0
        return self.config.init_std == 0
