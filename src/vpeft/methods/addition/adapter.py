"""Adapter (Houlsby et al., 2019, arXiv:1902.00751): a sequential bottleneck after sub-layers.

``y = f(x); y + up(act(down(y)))`` after the attention and/or the MLP of every block. ``up`` is
zero-initialised, so the adapted model starts equal to the base.

Houlsby et al. also train the layer normalisation parameters of the backbone beside the adapters,
so ``train_norms=True`` is the default: the paper's method. The affine
parameters of every normalisation layer outside the head (the blocks' and the final one) train in
place (4D per block plus the final norm); ``train_norms=False`` trains the bottlenecks alone.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import Bottleneck, Bypass
from vpeft.core.method import Method
from vpeft.core.surgery import mark_trainable, wrap
from vpeft.core.targeting import norm_params
from vpeft.registry import register


@dataclass
class AdapterConfig(MethodConfig):
    dim: int = option(8, "Bottleneck width.")
    positions: tuple[str, ...] = option(("attn", "mlp"), "Sub-layers followed by an adapter.")
    act: str = option("gelu", "Activation inside the bottleneck.")
    dropout: float = option(0.0, "Dropout inside the bottleneck.")
    scale: float = option(1.0, "Multiplier of the adapter's output.")
    train_norms: bool = option(True, "Also train the backbone's LayerNorms, as Houlsby et al. do "
                                     "(default); False trains the bottlenecks only.")

    def validate(self) -> None:
        if self.dim < 1:
            raise ValueError(f"adapter dim must be >= 1, got {self.dim}")
        bad = set(self.positions) - {"attn", "mlp"}
        if bad or not self.positions:
            raise ValueError(
                f"adapter positions must be among ('attn', 'mlp'), got {self.positions}"
            )


class BlockAdapterMethod(Method):
    """Shared ``apply``: put a :class:`Bypass` with a fresh branch at each chosen sub-layer."""

    family = "addition"
    subfamily = "adapter"
    parallel = False
    zero_init = True

    def positions(self) -> tuple[str, ...]:
        return self.config.positions

    def branch(self, dim: int) -> nn.Module:
        cfg = self.config
        return Bottleneck(dim, cfg.dim, cfg.act, cfg.dropout)

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        # the default positions shrink to the sub-layers the family has (ConvNeXt: the MLP)
        field = self.config_cls.__dataclass_fields__.get("positions")
        default = field.default if field is not None else self.positions()
        positions = view.sublayers(self.positions(), default, self.name)
        for i in range(view.depth):
            for pos in positions:
                wrap(
                    model,
                    view.block_part(i, pos),
                    lambda m, d=view.block_dims[i]: Bypass(
                        m, self.branch(d), self.parallel, self.config.scale
                    ),
                )


@register
class Adapter(BlockAdapterMethod):
    """Adapter (Houlsby): sequential bottleneck after attention and MLP."""

    name = "adapter"
    config_cls = AdapterConfig

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        super().apply(model, view)
        if self.config.train_norms:
            mark_trainable(norm_params(model, view))
