"""Learned tokens shared by the prompt methods (VPT, VQT, NOAH's prompt module).

One place for how prompt tokens start (VPT's initialisation) and how they meet a batch (expanded
to every sample, dropout drawn per sample as the official VPT code does).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView

PROMPT_INITS = ("uniform", "normal")


def init_prompt(
    num_tokens: int, dim: int, view: BackboneView, init: str = "uniform"
) -> torch.Tensor:
    """A ``(1, num_tokens, dim)`` tensor of fresh prompt tokens.

    ``uniform`` is VPT's Xavier-style bound over the patch embedding's fan-in and the width
    (``sqrt(6 / (C * p * p + D))``); ``normal`` draws with std 0.02.
    """
    if init not in PROMPT_INITS:
        raise ValueError(f"prompt init must be one of {PROMPT_INITS}, got {init!r}")
    t = torch.empty(1, num_tokens, dim)
    if init == "normal":
        return nn.init.normal_(t, std=0.02)
    patch = view.patch_size or 16
    bound = math.sqrt(6.0 / float(view.in_chans * patch * patch + dim))
    return nn.init.uniform_(t, -bound, bound)


def expand_prompt(
    prompt: torch.Tensor, batch: int, dropout: float, training: bool, dtype: torch.dtype
) -> torch.Tensor:
    """``prompt`` (1, n, D) as a (batch, n, D) tensor, with dropout drawn for each sample.

    Dropping after the expansion gives every image its own mask (the official VPT/VQT code drops
    the batch's prompt copies); dropping the parameter first would share one mask per batch.
    """
    out = prompt.to(dtype).expand(batch, -1, -1)
    if dropout > 0 and training:
        out = F.dropout(out, dropout, training=True)
    return out
