"""A weighted combination of LoRA adapters, expressed exactly as one LoRA adapter.

``sum_i w_i * s_i * B_i @ A_i`` (``s_i = alpha_i / r_i``) is itself a low-rank product of rank
``R = sum_i r_i``: stack the ``A_i`` along the rank and place ``w_i * s_i * B_i`` side by side,

    A = [A_1; A_2; ...]            (R, in)
    B = [w_1 s_1 B_1 | w_2 s_2 B_2 | ...]   (out, R),   scale 1

so ``B @ A`` is the weighted sum of the updates with no approximation (Hugging Face PEFT's
``add_weighted_adapter(..., combination_type="cat")``). This holds per part of a fused qkv (the
``qv`` form) and per group of a grouped convolution, each of which has its own rank-r block.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch
from torch import nn

from vpeft.core.config import MethodConfig
from vpeft.core.conv import LowRankConv
from vpeft.core.state import get_state
from vpeft.core.surgery import wrappers
from vpeft.methods.partial.lora import LoRAConfig, LoRALinear

LOW_RANK = (LoRALinear, LowRankConv)
# options that may differ between the adapters combined (the rest must agree: same targets)
FREE_OPTIONS = ("rank", "alpha", "dropout", "train_head")


def combined_config(models: Sequence[nn.Module]) -> MethodConfig:
    """The LoRA config of the combination of ``models``' adapters (rank ``sum r_i``, scale 1);
    ``ValueError`` naming the difference unless they are LoRA adapters of the same layers."""
    configs = [get_state(m).config for m in models]
    for c in configs:
        if type(c) is not LoRAConfig:
            raise ValueError(f"only LoRA adapters can be combined, not '{c.method}' (a weighted "
                             "sum of other methods' updates is not one adapter of that method)")
    first = {k: v for k, v in configs[0].to_dict().items() if k not in FREE_OPTIONS}
    for c in configs[1:]:
        other = {k: v for k, v in c.to_dict().items() if k not in FREE_OPTIONS}
        if other != first:
            diff = sorted(k for k in first if first[k] != other.get(k))
            raise ValueError(f"LoRA adapters must adapt the same layers to be combined; they "
                             f"differ in {', '.join(diff)}")
    rank = sum(c.rank for c in configs)
    return dataclasses.replace(configs[0], rank=rank, alpha=float(rank))


def _blocks(m: LoRALinear | LowRankConv) -> list[slice]:
    """The rows of ``B`` that each rank-r block of ``A`` (block ``p`` = rows ``p r .. (p+1) r``)
    writes: one block per qkv part of a LoRALinear, per group of a LowRankConv."""
    if isinstance(m, LowRankConv):
        g = m.base.groups
        step = m.lora_B.shape[0] // g
        return [slice(i * step, (i + 1) * step) for i in range(g)]
    rows, start = [], 0
    for s, e in m.parts:
        rows.append(slice(start, start + e - s))
        start += e - s
    return rows


@torch.no_grad()
def combine_into(target: nn.Module, sources: Sequence[nn.Module], weights: Sequence[float]) -> None:
    """Write ``sum_i weights[i] * update_i`` of the LoRA ``sources`` into ``target``, a model
    adapted with :func:`combined_config` of them (its head is left as it is)."""
    found = [dict(wrappers(m)) for m in [target, *sources]]
    paths = set(found[0])
    for own in found[1:]:
        if set(own) != paths:
            raise ValueError("the LoRA adapters do not wrap the same layers")
    for path, out in found[0].items():
        mods = [own[path] for own in found[1:]]
        if not all(type(m) is type(out) and isinstance(m, LOW_RANK) for m in mods):
            raise ValueError(f"{path} is not a plain LoRA layer in every adapter")
        offset = 0
        for w, m in zip(weights, mods):
            r, blocks = m.rank, _blocks(m)
            for p, rows in enumerate(blocks):
                at = p * out.rank + offset  # block p of A holds every adapter's rows
                out.lora_A[at : at + r] = m.lora_A[p * r : (p + 1) * r]
                out.lora_B[rows, offset : offset + r] = w * m.scale * m.lora_B[rows]
            offset += r
