"""Linear probing: the backbone is frozen and only the classifier head trains."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig
from vpeft.methods.partial.base import Specification
from vpeft.registry import register


@dataclass
class LinearConfig(MethodConfig):
    """Linear probing trains the head only."""

    def validate(self) -> None:
        if not self.train_head:
            raise ValueError("method 'linear' trains only the head: train_head must be True")


@register
class Linear(Specification):
    """Linear probe: only the classifier head trains, on frozen features."""

    name = "linear"
    config_cls = LinearConfig
    memory_saving = True  # nothing before the head trains: no backward through the backbone

    def select(self, model: nn.Module, view: BackboneView) -> list[nn.Parameter]:
        view.require("heads", method=self.name)
        return []
