"""Full fine-tuning: every weight trains. The reference the PEFT methods are measured against."""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig
from vpeft.core.method import Method
from vpeft.core.surgery import mark_trainable
from vpeft.registry import register


@dataclass
class FullConfig(MethodConfig):
    """Full fine-tuning has no options of its own."""


@register
class Full(Method):
    """Full fine-tuning: all parameters train; a full copy of the model per task."""

    name = "full"
    config_cls = FullConfig
    family = "reference"
    subfamily = "full"
    mergeable = True  # nothing added: the trained model is already a plain model
    structure_preserving = True
    inference_overhead = False

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        mark_trainable(model.parameters())
