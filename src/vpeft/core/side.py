"""Side-network primitives: hand features from the frozen backbone to modules that read them later.

Side-tuning, LST and VQT compute something from features of one place in the model (the input
image, every block's output) and use it in another (the final norm, the head). A :class:`Stash`
carries the tensors of one forward pass between them; a :class:`FeatureTap` records into it. Both
sides keep a plain reference to the stash (not a sub-module), so it is never part of a state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from vpeft.core.surgery import Wrapper


class Stash(list):
    """A list of tensors of the current forward pass.

    Copies and pickles of a model start with an empty stash: tensors of a past pass (possibly
    holding an autograd graph, which cannot be deep-copied) are never carried over.
    """

    def __deepcopy__(self, memo: dict) -> Stash:
        return type(self)()

    def __reduce__(self) -> tuple:  # pickle protocol: always an empty stash
        return type(self), ()


class FeatureTap(Wrapper):
    """Run ``base`` without autograd and append what it sees to ``stash``.

    ``record``: ``'output'``, ``'input'`` or ``'both'`` (input first). ``first`` empties the stash
    before recording: set it on the earliest tap of a forward pass, so a pass that failed half-way
    leaves nothing behind for the next one. Running under ``torch.no_grad()`` guarantees that the
    backbone builds no graph, whatever else happens to require grad, so training memory holds only
    the recorded features, not the backbone's activations.
    """

    def __init__(self, base: nn.Module, stash: Stash, record: str = "output",
                 first: bool = False) -> None:
        super().__init__(base)
        if record not in ("output", "input", "both"):
            raise ValueError(f"record must be 'output', 'input' or 'both', got {record!r}")
        self.record, self.first = record, first
        self.__dict__["stash"] = stash

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        if self.first:
            self.stash.clear()
        if self.record != "output":
            self.stash.append(x)
        with torch.no_grad():
            y = self.base(x, *args, **kwargs)
        if self.record != "input":
            self.stash.append(y)
        return y


__all__ = ["FeatureTap", "Stash"]
