"""Training on cached backbone features when only the classifier head trains.

If every trainable parameter lies in the model's classifier head(s) (``linear``, or any method
that freezes the whole backbone), the backbone computes the same features every epoch. We run it
once, in eval mode, over the training set and train the head on the stored tensors: a linear probe
then costs about one forward pass over the data instead of one per epoch. The decision reads which
parameters train, never the method's name.

Two forms of cache, chosen by the model's structure:

* ``pre-logits``: with a single head, ``model.forward_head(f, pre_logits=True)`` (pooled, normed
  features, one vector per image) followed by the head gives the logits (timm's interface).
* ``tokens``: otherwise (DeiT-distilled has two heads on two tokens, averaged), the output of
  ``forward_features`` is stored and ``model.forward_head`` runs on it, so the logits are exactly
  the model's own. It holds every token, so it needs more memory.

The frozen part runs in eval mode, as in standard linear probing: backbone dropout or drop-path
(off by default in timm) would not apply.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from accelerate import Accelerator
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from vpeft.backbones.base import get_view
from vpeft.engine.runtime import progress

logger = logging.getLogger(__name__)


def trainable_heads(model: nn.Module) -> list[str] | None:
    """The head module paths if every trainable parameter lies in a head, else ``None``."""
    heads = get_view(model).heads
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    prefixes = tuple(h + "." for h in heads)
    if heads and trainable and all(n.startswith(prefixes) for n in trainable):
        return heads
    return None


@contextmanager
def only_heads_train(model: nn.Module, heads: list[str]) -> Iterator[None]:
    """Within the block, only the parameters inside ``heads`` require gradients (e.g. to fit the
    head alone while a method's parameters wait); the previous flags come back after it."""
    prefixes = tuple(h + "." for h in heads)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    for n, p in model.named_parameters():
        p.requires_grad_(flags[n] and n.startswith(prefixes))
    try:
        yield
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])


class CachedHead(nn.Module):
    """The trainable end of a model: cached features -> logits (see the module docstring)."""

    def __init__(self, model: nn.Module, heads: list[str], kind: str) -> None:
        super().__init__()
        self.kind = kind
        if kind == "pre-logits":
            self.head = model.get_submodule(heads[0])
        else:
            self.model = model

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        if self.kind == "pre-logits":
            return self.head(feats)
        return self.model.forward_head(feats)


@torch.no_grad()
def cache_kind(model: nn.Module, heads: list[str], probe: torch.Tensor) -> str:
    """``pre-logits`` where head(pre-logits) reproduces the model's logits on ``probe``, else
    ``tokens``."""
    if len(heads) != 1:
        return "tokens"
    was_training = model.training
    model.eval()
    feats = model.forward_features(probe)
    full = model.forward_head(feats)
    short = model.get_submodule(heads[0])(model.forward_head(feats, pre_logits=True))
    model.train(was_training)
    same = isinstance(full, torch.Tensor) and full.shape == short.shape and torch.allclose(
        full.float(), short.float(), rtol=1e-4, atol=1e-5)
    if not same:
        logger.info("head(pre-logits) differs from the model's logits: caching all tokens")
    return "pre-logits" if same else "tokens"


@torch.no_grad()
def extract_features(model: nn.Module, loader: DataLoader, accelerator: Accelerator, kind: str,
                     show_progress: bool = True) -> TensorDataset:
    """Run the frozen backbone once over ``loader`` (prepared, in order); every process gets all
    ``(features, labels)`` in data set order."""
    model.eval()
    feats, labels = [], []
    for images, y in progress(loader, accelerator, show_progress, desc="features"):
        with accelerator.autocast():
            f = model.forward_features(images)
            if kind == "pre-logits":
                f = model.forward_head(f, pre_logits=True)
        f, y = accelerator.gather_for_metrics((f.float().contiguous(), y))
        feats.append(f.cpu())
        labels.append(y.cpu())
    return TensorDataset(torch.cat(feats), torch.cat(labels))
