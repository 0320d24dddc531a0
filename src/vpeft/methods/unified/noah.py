"""NOAH (Zhang et al., 2022, arXiv:2206.04673): Adapter, LoRA and VPT sized per block by search.

Every block ``i`` may get an adapter of width ``adapter[i]`` after its MLP, a LoRA of rank
``lora[i]`` on its fused qkv (one ``A``/``B`` pair over all of q, k and v, as NOAH) and
``prompt[i]`` VPT-deep prompt tokens; 0 leaves the module out. NOAH finds these sizes in three
stages (see :mod:`vpeft.methods.unified.noah_search`):

1. train a *supernet* (``supernet=True``): every module at its maximum size, with a random subnet
   drawn for each step; a subnet uses the first ``k`` rows/columns of each weight (weight sharing
   as AutoFormer), set by :func:`set_subnet`;
2. evolutionary search on a validation set for the best subnet under a parameter budget;
3. retrain the chosen subnet from scratch: ``vpeft.adapt(model, "noah", adapter=..., lora=...,
   prompt=...)`` builds exactly those modules, a normal adapter that saves, loads and evaluates.

The modules are the library's own (``Bottleneck`` adapters, ``LoRALinear``, VPT's ``PromptBlock``),
with the same parameter names in both modes, so a subnet's weights could be sliced out of a
supernet checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import Bottleneck, Bypass
from vpeft.core.method import Method
from vpeft.core.prompts import init_prompt
from vpeft.core.surgery import wrap
from vpeft.methods.addition.vpt import PromptBlock
from vpeft.methods.partial.lora import LoRALinear
from vpeft.registry import register

KINDS = ("adapter", "lora", "prompt")


@dataclass
class NOAHConfig(MethodConfig):
    adapter: tuple[int, ...] = option((8,), "Adapter width per block (one value: every block; "
                                            "0: no adapter in that block).")
    lora: tuple[int, ...] = option((8,), "LoRA rank on qkv per block (one value: every block).")
    prompt: tuple[int, ...] = option((10,), "VPT-deep prompt tokens per block (one value: every "
                                            "block).")
    supernet: bool = option(False, "Build the weight-sharing supernet (maximum sizes below) for "
                                   "NOAH's first stage instead of one subnet.")
    max_adapter: int = option(8, "Supernet: largest adapter width.")
    max_lora: int = option(8, "Supernet: largest LoRA rank.")
    max_prompt: int = option(10, "Supernet: largest number of prompt tokens.")

    def validate(self) -> None:
        for kind in KINDS:
            sizes, top = getattr(self, kind), getattr(self, f"max_{kind}")
            if not sizes or min(sizes) < 0 or top < 1:
                raise ValueError(f"noah {kind} sizes must be >= 0 (got {sizes}), max >= 1")

    def sizes(self, kind: str, depth: int) -> list[int]:
        """Per-block sizes of ``kind`` (the maximum everywhere for a supernet)."""
        if self.supernet:
            return [getattr(self, f"max_{kind}")] * depth
        sizes = list(getattr(self, kind))
        if len(sizes) == 1:
            sizes *= depth
        if len(sizes) != depth:
            raise ValueError(f"noah {kind} has {len(sizes)} sizes for a {depth}-block model")
        return sizes


def noah_param_count(adapter: list[int], lora: list[int], prompt: list[int], dim: int,
                     qkv_out: int | None = None) -> int:
    """Trainable parameters (head excluded) of a subnet on blocks of width ``dim``."""
    qkv_out = qkv_out or 3 * dim
    return sum((2 * dim * a + a + dim if a else 0) + r * (dim + qkv_out) + n * dim
               for a, r, n in zip(adapter, lora, prompt))


class ElasticBottleneck(Bottleneck):
    """A bottleneck whose first ``active`` hidden units are used; 0 switches the branch off."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__(dim, hidden)
        self.active = self.capacity = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active
        if k == 0:
            return x.new_zeros(())
        h = self.act(F.linear(x, self.down.weight[:k], self.down.bias[:k]))
        return F.linear(self.dropout(h), self.up.weight[:, :k], self.up.bias)


class ElasticLoRALinear(LoRALinear):
    """LoRA over the whole output with the first ``active`` ranks of ``A`` and ``B``."""

    def __init__(self, base: nn.Linear, rank: int) -> None:
        super().__init__(base, rank, 1.0, 0.0, [(0, base.out_features)])
        self.active = self.capacity = rank

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.active
        if k == 0:
            return y
        return y + F.linear(F.linear(x, self.lora_A[:k]), self.lora_B[:, :k])

    def delta_weight(self) -> torch.Tensor:
        k = self.active
        return self.lora_B[:, :k] @ self.lora_A[:k]


class ElasticPromptBlock(PromptBlock):
    """A block that inserts its first ``active`` prompts and removes them after (VPT-deep)."""

    def __init__(self, base: nn.Module, prompt: torch.Tensor, num_prefix: int) -> None:
        super().__init__(base, prompt, num_prefix, prompt.shape[1], True, True, 0.0)
        self.active = self.capacity = prompt.shape[1]

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        p, n = self.num_prefix, self.active
        if n == 0:
            return self.base(x, *args, **kwargs)
        prompt = self.prompt[:, :n].to(x.dtype).expand(x.shape[0], -1, -1)
        x = self.base(torch.cat([x[:, :p], prompt, x[:, p:]], dim=1), *args, **kwargs)
        return torch.cat([x[:, :p], x[:, p + n:]], dim=1)


ELASTIC = {"adapter": ElasticBottleneck, "lora": ElasticLoRALinear, "prompt": ElasticPromptBlock}


def set_subnet(model: nn.Module, adapter: list[int], lora: list[int], prompt: list[int]) -> None:
    """Make a NOAH supernet compute the subnet with these per-block sizes."""
    for kind, sizes in zip(KINDS, (adapter, lora, prompt)):
        modules = [m for m in model.modules() if isinstance(m, ELASTIC[kind])]
        if len(modules) != len(sizes):
            raise ValueError(f"model has {len(modules)} elastic {kind} modules (is it a NOAH "
                             f"supernet?), got {len(sizes)} sizes")
        for m, k in zip(modules, sizes):
            if not 0 <= k <= m.capacity:
                raise ValueError(f"noah {kind} size {k} is outside the supernet's 0..{m.capacity}")
            m.active = k


@register
class NOAH(Method):
    """NOAH: per-block Adapter / LoRA / VPT sizes found by supernet training and evolution."""

    name = "noah"
    config_cls = NOAHConfig
    family = "unified"
    subfamily = "unified"
    no_decay = ("*prompt",)

    @property
    def zero_init(self) -> bool:  # type: ignore[override]
        return not self.config.supernet and not any(self.config.prompt)

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        view.require("blocks", "mlp", "qkv", "sequence_tokens", method=self.name)
        cfg: NOAHConfig = self.config
        adapter, lora, prompt = (cfg.sizes(k, view.depth) for k in KINDS)
        for i in range(view.depth):
            dim = view.block_dims[i]
            if adapter[i]:  # sequential after the MLP, as NOAH's supernet
                branch = ElasticBottleneck(dim, adapter[i]) if cfg.supernet else \
                    Bottleneck(dim, adapter[i])
                wrap(model, view.block_part(i, "mlp"), lambda m, b=branch: Bypass(m, b, False))
            if lora[i]:
                wrap(model, view.block_part(i, "qkv"), lambda m, r=lora[i]: (
                    ElasticLoRALinear(m, r) if cfg.supernet else
                    LoRALinear(m, r, 1.0, 0.0, [(0, m.out_features)])))
        for i in range(view.depth):
            if prompt[i]:
                # VPT's own prompt initialisation
                p = init_prompt(prompt[i], view.block_dims[i], view)
                wrap(model, view.blocks[i], lambda b, p=p: (
                    ElasticPromptBlock(b, p, view.num_prefix_tokens) if cfg.supernet else
                    PromptBlock(b, p, view.num_prefix_tokens, p.shape[1], True, True, 0.0)))
