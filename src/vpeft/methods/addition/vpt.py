"""Visual Prompt Tuning (Jia et al., 2022, arXiv:2203.12119): learned tokens in the sequence.

``vpt-shallow`` inserts prompt tokens after the class/distillation tokens before the first block;
``vpt-deep`` replaces them with a fresh set before every block. Prompts are removed after the last
block, so the head reads exactly the tokens it reads without prompts.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.method import Method
from vpeft.core.prompts import PROMPT_INITS, expand_prompt, init_prompt
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register


@dataclass
class VPTConfig(MethodConfig):
    num_tokens: int = option(10, "Prompt tokens per layer.")
    dropout: float = option(0.0, "Dropout on the prompt tokens (a mask per sample).")
    init: str = option(
        "uniform",
        "'uniform' (VPT's Xavier-style bound over patch and width) or 'normal' (std 0.02).",
    )

    def validate(self) -> None:
        if self.num_tokens < 1:
            raise ValueError(f"vpt num_tokens must be >= 1, got {self.num_tokens}")
        if self.init not in PROMPT_INITS:
            raise ValueError(f"vpt init must be one of {PROMPT_INITS}, got {self.init!r}")


class PromptBlock(Wrapper):
    """A block whose input gets prompt tokens inserted or replaced after the prefix tokens.

    Token layout inside: ``[prefix (p) | prompts (n) | patches]``. ``remove`` drops the prompts
    from the block's output (set on the last block).
    """

    def __init__(
        self,
        base: nn.Module,
        prompt: torch.Tensor | None,
        num_prefix: int,
        num_tokens: int,
        insert: bool,
        remove: bool,
        dropout: float,
    ) -> None:
        super().__init__(base)
        self.prompt = nn.Parameter(prompt) if prompt is not None else None
        self.num_prefix, self.num_tokens = num_prefix, num_tokens
        self.insert, self.remove = insert, remove
        self.dropout = dropout

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:  # x: (B, N, D)
        p, n = self.num_prefix, self.num_tokens
        if self.prompt is not None:
            prompt = expand_prompt(self.prompt, x.shape[0], self.dropout, self.training, x.dtype)
            rest = x[:, p:] if self.insert else x[:, p + n :]
            x = torch.cat([x[:, :p], prompt, rest], dim=1)
        x = self.base(x, *args, **kwargs)
        if self.remove:
            x = torch.cat([x[:, :p], x[:, p + n :]], dim=1)
        return x


class VPT(Method):
    family = "addition"
    subfamily = "prompt"
    deep = False
    no_decay = ("*prompt",)

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        view.require("blocks", "sequence_tokens", method=self.name)
        cfg: VPTConfig = self.config
        last = view.depth - 1
        for i in range(view.depth):
            prompted = i == 0 or self.deep
            if not prompted and i != last:
                continue
            prompt = (
                init_prompt(cfg.num_tokens, view.block_dims[i], view, cfg.init)
                if prompted
                else None
            )
            wrap(
                model,
                view.blocks[i],
                lambda b, i=i, pr=prompt: PromptBlock(
                    b,
                    pr,
                    view.num_prefix_tokens,
                    cfg.num_tokens,
                    insert=i == 0,
                    remove=i == last,
                    dropout=cfg.dropout,
                ),
            )


@dataclass
class VPTShallowConfig(VPTConfig):
    pass


@dataclass
class VPTDeepConfig(VPTConfig):
    pass


@register
class VPTShallow(VPT):
    """VPT-shallow: prompt tokens prepended to the input sequence."""

    name = "vpt-shallow"
    config_cls = VPTShallowConfig


@register
class VPTDeep(VPT):
    """VPT-deep: a new set of prompt tokens at the input of every block."""

    name = "vpt-deep"
    config_cls = VPTDeepConfig
    deep = True
