"""Bases of the partial-based methods.

* :class:`Specification`: train a chosen subset of the backbone's own parameters; nothing is
  added, so the adapted model is the base architecture and merging is a no-op.
* :class:`Reparameterization`: learn an update of existing weights that folds into them on merge.
"""

from __future__ import annotations

from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.method import Method
from vpeft.core.surgery import mark_trainable


class Specification(Method):
    """Base of the methods that only unfreeze existing parameters."""

    family = "partial"
    subfamily = "specification"
    mergeable = True
    structure_preserving = True
    inference_overhead = False
    zero_init = True

    def select(self, model: nn.Module, view: BackboneView) -> list[nn.Parameter]:
        raise NotImplementedError

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        mark_trainable(self.select(model, view))


def backbone_params(model: nn.Module, view: BackboneView):
    """``(name, parameter)`` of everything but the classifier heads."""
    return ((n, p) for n, p in model.named_parameters() if not view.in_head(n))


class Reparameterization(Method):
    """Base of the methods whose update folds into the weights: no cost after merging."""

    family = "partial"
    subfamily = "reparameterization"
    mergeable = True
    structure_preserving = True
    inference_overhead = False
    zero_init = True
