"""Side-tuning (Zhang et al., 2020, arXiv:1912.13503): a small side network beside a frozen model.

``r(x) = alpha * B(x) + (1 - alpha) * S(x)``: the frozen backbone's final features ``B(x)`` are
blended with those of a small network ``S`` trained from scratch on the same input image. Here
``S`` is two convolutions (the first one patchifying, like the backbone's stem), global average
pooling and a Linear to the backbone width; its vector is blended into every final token, right
after the backbone's final norm, so the model's own pooling and head read the blend unchanged.

The paper anneals ``alpha`` from 1 (all backbone) towards 0; here ``alpha`` is a learned scalar
that starts at ``alpha_init`` (1 by default, so the adapted model starts equal to the base). The
image is picked up by a :class:`~vpeft.core.side.FeatureTap` on the input stem, which also runs the
backbone without autograd: nothing is back-propagated through it (memory-saving).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.method import Method
from vpeft.core.side import FeatureTap, Stash
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register


@dataclass
class SideTuneConfig(MethodConfig):
    width: int = option(32, "Channels of the side network's convolutions.")
    alpha_init: float = option(1.0, "Initial weight of the backbone features in the blend "
                                    "(1 = start as the base model, as the paper's curriculum).")

    def validate(self) -> None:
        if self.width < 1:
            raise ValueError(f"side-tune width must be >= 1, got {self.width}")


def side_network(channels: int, width: int, patch: int, out_dim: int) -> nn.Sequential:
    """Patchify conv -> GELU -> 3x3 conv -> GELU -> global average pool -> Linear(width, out)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, kernel_size=patch, stride=patch), nn.GELU(),
        nn.Conv2d(width, width, kernel_size=3, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out_dim),
    )


class SideBlend(Wrapper):
    """The final norm, its output blended with the side network's vector of the stashed image."""

    def __init__(self, base: nn.Module, side: nn.Module, alpha: float, stash: Stash) -> None:
        super().__init__(base)
        self.side = side
        self.alpha = nn.Parameter(torch.tensor(float(alpha)))
        self.__dict__["stash"] = stash

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            y = self.base(x)  # (B, N, D) or (B, D)
        if not self.stash:
            raise RuntimeError("side-tune: no input image recorded; run the whole model")
        image = self.stash.pop()
        self.stash.clear()
        s = self.side(image).to(y.dtype)  # (B, D)
        s = s.unsqueeze(1) if y.ndim == 3 else s
        return self.alpha * y + (1 - self.alpha) * s


@register
class SideTune(Method):
    """Side-tuning: a small side network blended with the frozen backbone's final features."""

    name = "side-tune"
    config_cls = SideTuneConfig
    family = "addition"
    subfamily = "side"
    memory_saving = True

    @property
    def zero_init(self) -> bool:  # type: ignore[override]
        return self.config.alpha_init == 1.0

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        # the side network's output is blended as (B, N, D) patch tokens at the patch stride
        view.require("patch_embed", "final_norm", "embed_dim", "sequence_tokens", method=self.name)
        cfg: SideTuneConfig = self.config
        stash = Stash()
        side = side_network(view.in_chans, cfg.width, view.patch_size or 16, view.embed_dim)
        wrap(model, view.patch_embed, lambda m: FeatureTap(m, stash, record="input", first=True))
        wrap(model, view.final_norm, lambda m: SideBlend(m, side, cfg.alpha_init, stash))
