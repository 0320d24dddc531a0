"""Conv-Adapter (Chen et al., 2022, arXiv:2208.07463): convolutional bottleneck adapters for CNNs.

The adapter is the paper's (and its code's) module: a k x k convolution down to ``C / reduction``
channels, grouped so that each output channel reads ``reduction`` input channels, an activation,
a 1 x 1 convolution back to ``C`` channels and a learned per-channel scale ``alpha`` (starting at
one). The official code puts it beside the 3 x 3 convolution of a ResNet block; here, as a
plug-in on any BatchNorm CNN, it is a residual branch after chosen blocks (the output of each
block, or of each stage's last block): ``y + alpha * up(act(down(y)))``.

Departure from the official initialisation: ``up`` starts at zero (the code leaves PyTorch's
default), so the adapted model starts equal to the base, as every vpeft adapter does.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import Bypass, activation
from vpeft.core.method import Method
from vpeft.core.surgery import wrap
from vpeft.registry import register


@dataclass
class ConvAdapterConfig(MethodConfig):
    reduction: int = option(4, "Channel reduction of the bottleneck (C -> C / reduction).")
    kernel_size: int = option(3, "Kernel size of the grouped down-projection.")
    every: str = option("block", "Where adapters go: after every 'block', or every 'stage'.")
    act: str = option("relu", "Activation inside the bottleneck (the paper's ResNets use ReLU).")

    def validate(self) -> None:
        if self.reduction < 1:
            raise ValueError(f"conv-adapter reduction must be >= 1, got {self.reduction}")
        if self.kernel_size < 1 or self.kernel_size % 2 == 0:
            raise ValueError(f"conv-adapter kernel_size must be odd, got {self.kernel_size}")
        if self.every not in ("block", "stage"):
            raise ValueError(f"conv-adapter every must be 'block' or 'stage', got {self.every!r}")


class ConvBottleneck(nn.Module):
    """``alpha * up(act(down(x)))`` on ``(B, C, H, W)`` maps; zero at initialisation."""

    def __init__(self, channels: int, reduction: int, kernel_size: int, act: str) -> None:
        super().__init__()
        if channels % reduction:
            raise ValueError(
                f"conv-adapter reduction {reduction} does not divide the {channels} channels "
                "of a block; choose a divisor"
            )
        width = channels // reduction
        # groups = width: each of the width output channels reads `reduction` input channels
        self.down = nn.Conv2d(channels, width, kernel_size, padding=kernel_size // 2, groups=width)
        self.act = activation(act)
        self.up = nn.Conv2d(width, channels, 1)
        self.alpha = nn.Parameter(torch.ones(1, channels, 1, 1))
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.alpha * self.up(self.act(self.down(x)))


@register
class ConvAdapter(Method):
    """Conv-Adapter: grouped-conv bottleneck adapters after the blocks of a CNN."""

    name = "conv-adapter"
    config_cls = ConvAdapterConfig
    family = "addition"
    subfamily = "adapter"
    zero_init = True

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: ConvAdapterConfig = self.config
        view.require("stages", "blocks", method=self.name)
        if cfg.every == "stage":
            last = {f"{s}.{len(model.get_submodule(s)) - 1}" for s in view.stages}
            chosen = [i for i, b in enumerate(view.blocks) if b in last]
        else:
            chosen = list(range(view.depth))
        for i in chosen:
            branch = ConvBottleneck(view.block_dims[i], cfg.reduction, cfg.kernel_size, cfg.act)
            wrap(model, view.blocks[i], lambda m, b=branch: Bypass(m, b, parallel=False))
