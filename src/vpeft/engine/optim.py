"""AdamW with weight-decay groups, and a per-step linear warm-up + cosine decay schedule."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Iterable

import torch
from torch import nn


def no_decay_names(model: nn.Module, patterns: Iterable[str] = ()) -> set[str]:
    """Trainable parameters that get no weight decay.

    Biases and norm weights (every parameter with fewer than 2 dims), the model's own
    ``no_weight_decay()`` names (timm: position embedding, class / distillation / register tokens)
    and the parameters matching a method's ``no_decay`` globs (prompt tokens).
    """
    own = getattr(model, "no_weight_decay", None)
    skip = set(own()) if callable(own) else set()
    patterns = tuple(patterns)
    return {
        n for n, p in model.named_parameters() if p.requires_grad and (
            p.ndim < 2 or n in skip
            or any(fnmatch.fnmatchcase(n, g) for g in patterns)
        )
    }


def param_groups(model: nn.Module, weight_decay: float,
                 no_decay: Iterable[str] = ()) -> list[dict]:
    """Two AdamW groups of the trainable parameters: with and without weight decay."""
    skip = no_decay_names(model, no_decay)
    decay, plain = [], []
    for n, p in model.named_parameters():
        if p.requires_grad:
            (plain if n in skip else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": plain, "weight_decay": 0.0}]
    return [g for g in groups if g["params"]]


def warmup_cosine(total_steps: int, warmup_steps: int):
    """LR factor of step ``s``: linear from 1/warmup to 1 over the warm-up, then cosine to 0."""
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return factor


def build_optimizer(model: nn.Module, lr: float, weight_decay: float, no_decay: Iterable[str],
                    total_steps: int, warmup_ratio: float):
    """AdamW over the trainable parameters and its :func:`warmup_cosine` LambdaLR."""
    groups = param_groups(model, weight_decay, no_decay)
    if not groups:
        raise ValueError("the model has no trainable parameters")
    optimizer = torch.optim.AdamW(groups, lr=lr)
    warmup = round(warmup_ratio * total_steps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, warmup_cosine(total_steps, warmup))
    return optimizer, scheduler
