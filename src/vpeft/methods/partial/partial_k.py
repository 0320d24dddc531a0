"""Partial-k (Yosinski et al., 2014; VPT baseline, Jia et al., 2022): train the last k blocks.

The last ``k`` blocks are trainable, together with whatever sits between the last block and the
head (the final ``norm`` / ``fc_norm``), as VPT's Partial-k also trains the encoder's final norm.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.methods.partial.base import Specification, backbone_params
from vpeft.registry import register


@dataclass
class PartialKConfig(MethodConfig):
    k: int = option(1, "Number of last blocks to train.")
    tail: bool = option(True, "Also train what sits between the last block and the head "
                              "(final norm / fc_norm), as VPT's Partial-k.")

    def validate(self) -> None:
        if self.k < 1:
            raise ValueError(f"partial-k k must be >= 1, got {self.k}")


@register
class PartialK(Specification):
    """Partial-k: fine-tune the last k blocks (and the final norm)."""

    name = "partial-k"
    config_cls = PartialKConfig

    def select(self, model: nn.Module, view: BackboneView) -> list[nn.Parameter]:
        cfg: PartialKConfig = self.config
        view.require("blocks", method=self.name)
        if cfg.k > view.depth:
            raise ValueError(f"partial-k k={cfg.k} but the backbone has {view.depth} blocks")
        chosen = tuple(b + "." for b in view.blocks[-cfg.k:])
        final = view.blocks[-1] + "."
        selected: list[nn.Parameter] = []
        past_blocks = False
        # parameters come in module order: the tail is whatever follows the last block's
        for n, p in backbone_params(model, view):
            if n.startswith(chosen):
                selected.append(p)
                past_blocks = past_blocks or n.startswith(final)
            elif past_blocks and cfg.tail:
                selected.append(p)
        return selected
