"""Side-network primitives: hand features from the frozen backbone to modules that read them later.

Side-tuning, LST and VQT compute something from features of one place in the model (the input
image, every block's output) and use it in another (the final norm, the head). A :class:`Stash`
carries the tensors of one forward pass between them; a :class:`FeatureTap` records into it. Both
sides keep a plain reference to the stash (not a sub-module), so it is never part of a state dict.
"""

from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
from torch import nn

from vpeft.core.surgery import Wrapper

_TRACK_FROZEN = contextvars.ContextVar("vpeft_track_frozen", default=False)


def frozen_pass() -> contextlib.AbstractContextManager:
    """Where a side method runs the frozen backbone: ``torch.no_grad()`` (no graph, the memory
    saving), except inside :func:`track_frozen`, where the caller's grad mode is kept."""
    return contextlib.nullcontext() if _TRACK_FROZEN.get() else torch.no_grad()


def tracking_frozen() -> bool:
    """Whether :func:`track_frozen` is on (an explanation is asking for gradients)."""
    return bool(_TRACK_FROZEN.get())


@contextlib.contextmanager
def track_frozen() -> Iterator[None]:
    """Let gradients flow through the frozen backbone of side methods meanwhile: attribution
    (Grad-CAM, Integrated Gradients) needs the output's gradient with respect to the backbone's
    features and the input, which :func:`frozen_pass` otherwise never records."""
    token = _TRACK_FROZEN.set(True)
    try:
        yield
    finally:
        _TRACK_FROZEN.reset(token)


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
        with frozen_pass():
            y = self.base(x, *args, **kwargs)
        if self.record != "input":
            self.stash.append(y)
        return y


__all__ = ["FeatureTap", "Stash", "frozen_pass", "track_frozen", "tracking_frozen"]
