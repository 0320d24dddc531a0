"""NOAH (Zhang et al., 2022, arXiv:2206.04673): Adapter, LoRA and VPT sized per block by search.

Every block ``i`` may get an adapter of width ``adapter[i]`` after its MLP, a LoRA of rank
``lora[i]`` on its fused qkv (one ``A``/``B`` pair over all of q, k and v) and ``prompt[i]``
prompt tokens; 0 leaves the module out. ``vpeft search --method noah`` finds these sizes in
NOAH's three stages (the space is in :mod:`vpeft.methods.unified.noah_search`): a weight-sharing
supernet (``supernet=True``, every module at its largest size, the first ``k`` rows/columns of
each weight used by a subnet, set by :func:`set_subnet`), an evolutionary search under a
parameter budget, and retraining the chosen subnet as an ordinary ``noah`` adapter.

As the official code (``model/supernet_vision_transformer_timm.py``, ``adapter_super.py``):

* the adapter is ``h + up(dropout(QuickGELU(down(h))))`` on the MLP's output ``h``, with
  Xavier-uniform weights and N(0, 1e-6) biases (so NOAH does not start as the base model);
* LoRA: ``A`` Kaiming-uniform, ``B`` zero, scale 1, dropout on its input;
* a prompted block *replaces* the prompt tokens of the block before it; after the last prompted
  block its prompts stay in the sequence through the remaining blocks (they are dropped after
  the model's last block, where the official code reads only the class token). Prompts start
  Xavier-uniform over their ``(1, n, D)`` tensor and get dropout per sample;
* dropout 0.1 on all three (``drop_rate_adapter`` / ``_LoRA`` / ``_prompt``).

Deviation: the official code allocates 100 tokens per prompt tensor whatever the space, so its
Xavier bound is ``sqrt(6 / (101 D))``; here the tensor has the supernet's (or subnet's) own size.
Its input-level prompt is left out: the official block 0 replaces it before any layer reads it,
so it never receives a gradient.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import Bottleneck, Bypass
from vpeft.core.method import Method, SearchSpace
from vpeft.core.prompts import expand_prompt
from vpeft.core.surgery import Wrapper, wrap
from vpeft.methods.partial.lora import LoRALinear
from vpeft.registry import register

KINDS = ("adapter", "lora", "prompt")
# NOAH's VTAB-1k space (experiments/NOAH/supernet/supernet-B_prompt_VTAB.yaml): sizes of a present
# module; its depths are {3, 6, 9, 12} on ViT-B's 12 blocks (see noah_search.default_depths)
SPACE_SIZES = (1, 5, 10)
DROPOUT = 0.1  # the official drop_rate_adapter / drop_rate_LoRA / drop_rate_prompt


@dataclass
class NOAHConfig(MethodConfig):
    adapter: tuple[int, ...] = option((max(SPACE_SIZES),), "Adapter width per block (one value: "
                                      "every block; 0: no adapter in that block).")
    lora: tuple[int, ...] = option((max(SPACE_SIZES),), "LoRA rank on qkv per block (one value: "
                                   "every block).")
    prompt: tuple[int, ...] = option((max(SPACE_SIZES),), "Prompt tokens per block (one value: "
                                     "every block).")
    dropout: float = option(DROPOUT, "Dropout on the adapter's hidden units, LoRA's input and the "
                                     "prompt tokens (NOAH's 0.1).")
    supernet: bool = option(False, "Build the weight-sharing supernet (maximum sizes below) for "
                                   "NOAH's first stage instead of one subnet.")
    max_adapter: int = option(max(SPACE_SIZES), "Supernet: largest adapter width.")
    max_lora: int = option(max(SPACE_SIZES), "Supernet: largest LoRA rank.")
    max_prompt: int = option(max(SPACE_SIZES), "Supernet: largest number of prompt tokens.")

    def validate(self) -> None:
        for kind in KINDS:
            sizes, top = getattr(self, kind), getattr(self, f"max_{kind}")
            if not sizes or min(sizes) < 0 or top < 1:
                raise ValueError(f"noah {kind} sizes must be >= 0 (got {sizes}), max >= 1")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"noah dropout must be in [0, 1), got {self.dropout}")

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


class QuickGELU(nn.Module):
    """``x * sigmoid(1.702 x)``: the activation of NOAH's adapter."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


class ElasticBottleneck(Bottleneck):
    """NOAH's adapter branch, of which the first ``active`` hidden units are used (0: off)."""

    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__(dim, hidden, "identity", dropout)
        self.act = QuickGELU()
        for layer in (self.down, self.up):  # AdapterSuper.init_weights
            nn.init.xavier_uniform_(layer.weight)
            nn.init.normal_(layer.bias, std=1e-6)
        self.active = self.capacity = hidden

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        k = self.active
        if k == 0:
            return x.new_zeros(())
        h = self.act(F.linear(x, self.down.weight[:k], self.down.bias[:k]))
        return F.linear(self.dropout(h), self.up.weight[:, :k], self.up.bias)


class ElasticLoRALinear(LoRALinear):
    """LoRA over the whole output with the first ``active`` ranks of ``A`` and ``B``."""

    def __init__(self, base: nn.Linear, rank: int, dropout: float) -> None:
        super().__init__(base, rank, 1.0, dropout, [(0, base.out_features)])
        self.active = self.capacity = rank

    def update(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        k = self.active
        if k == 0:
            return y
        x = self.dropout(x) if self.dropout is not None else x
        return y + F.linear(F.linear(x, self.lora_A[:k]), self.lora_B[:, :k])

    def delta_weight(self) -> torch.Tensor:
        k = self.active
        return self.lora_B[:, :k] @ self.lora_A[:k]


class ElasticPromptBlock(Wrapper):
    """A block that replaces the ``carry`` prompt tokens it receives with its first ``active``.

    Token layout: ``[prefix (p) | prompts | patches]``. With ``active == 0`` the tokens it
    receives pass through; ``last`` (the model's last block) drops whatever prompts are left.
    ``carry`` is set by :func:`link_prompts` from the blocks before it.
    """

    def __init__(self, base: nn.Module, tokens: int, dim: int, num_prefix: int, last: bool,
                 dropout: float) -> None:
        super().__init__(base)
        prompt = nn.init.xavier_uniform_(torch.empty(1, tokens, dim)) if tokens else None
        self.prompt = nn.Parameter(prompt) if prompt is not None else None
        self.active = self.capacity = tokens
        self.num_prefix, self.last, self.dropout, self.carry = num_prefix, last, dropout, 0

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # x: (B, N, D)
        p, n, c = self.num_prefix, self.active, self.carry
        if n:
            prompt = expand_prompt(self.prompt[:, :n], x.shape[0], self.dropout, self.training,
                                   x.dtype)
            x = torch.cat([x[:, :p], prompt, x[:, p + c:]], dim=1)
        x = self.base(x, *args, **kwargs)
        if self.last:
            x = torch.cat([x[:, :p], x[:, p + (n or c):]], dim=1)
        return x


def link_prompts(blocks: list[ElasticPromptBlock]) -> None:
    """Tell each prompt block (in model order) how many prompt tokens reach it."""
    carry = 0
    for b in blocks:
        b.carry = carry
        carry = b.active or carry


def set_subnet(model: nn.Module, adapter: list[int], lora: list[int], prompt: list[int]) -> None:
    """Make a NOAH supernet compute the subnet with these per-block sizes."""
    elastic = {"adapter": ElasticBottleneck, "lora": ElasticLoRALinear,
               "prompt": ElasticPromptBlock}
    for kind, sizes in zip(KINDS, (adapter, lora, prompt)):
        modules = [m for m in model.modules() if isinstance(m, elastic[kind])]
        if len(modules) != len(sizes):
            raise ValueError(f"model has {len(modules)} elastic {kind} modules (is it a NOAH "
                             f"supernet?), got {len(sizes)} sizes")
        for m, k in zip(modules, sizes):
            if not 0 <= k <= m.capacity:
                raise ValueError(f"noah {kind} size {k} is outside the supernet's 0..{m.capacity}")
            m.active = k
        if kind == "prompt":
            link_prompts(modules)


@register
class NOAH(Method):
    """NOAH: per-block Adapter / LoRA / VPT sizes found by supernet training and evolution."""

    name = "noah"
    config_cls = NOAHConfig
    family = "unified"
    subfamily = "unified"
    no_decay = ("*prompt",)
    searchable = True

    @property
    def zero_init(self) -> bool:  # type: ignore[override]
        # NOAH's adapters and prompts start non-zero (as the official code); LoRA starts at zero
        cfg = self.config
        return not cfg.supernet and not any(cfg.adapter) and not any(cfg.prompt)

    @classmethod
    def search_space(cls, view: BackboneView, **space: Any) -> SearchSpace:
        from vpeft.methods.unified.noah_search import NOAHSpace  # the space needs the method

        return NOAHSpace.for_view(view, **space)

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        view.require("blocks", "mlp", "qkv", "sequence_tokens", method=self.name)
        cfg: NOAHConfig = self.config
        adapter, lora, prompt = (cfg.sizes(k, view.depth) for k in KINDS)
        for i in range(view.depth):
            dim = view.block_dims[i]
            if adapter[i]:  # sequential after the MLP, as NOAH's supernet
                branch = ElasticBottleneck(dim, adapter[i], cfg.dropout)
                wrap(model, view.block_part(i, "mlp"), lambda m, b=branch: Bypass(m, b, False))
            if lora[i]:
                wrap(model, view.block_part(i, "qkv"),
                     lambda m, r=lora[i]: ElasticLoRALinear(m, r, cfg.dropout))
        if not any(prompt):
            return
        blocks = []
        for i in range(view.depth):
            last = i == view.depth - 1  # needed without own prompts: it drops the carried ones
            if prompt[i] or last:
                blocks.append(wrap(model, view.blocks[i], lambda b, n=prompt[i],
                                   d=view.block_dims[i], e=last: ElasticPromptBlock(
                                       b, n, d, view.num_prefix_tokens, e, cfg.dropout)))
        link_prompts(blocks)
