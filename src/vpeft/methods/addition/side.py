"""Side-tuning (Zhang et al., 2020, arXiv:1912.13503): a small side network beside a frozen model.

``r(x) = alpha * B(x) + (1 - alpha) * S(x)``: the frozen backbone's final features ``B(x)`` are
blended with those of a small network ``S`` trained from scratch on the same input image. Here
``S`` is two convolutions (the first one patchifying, like the backbone's stem), global average
pooling and a Linear to the backbone width; its vector is blended into every final token, right
after the backbone's final norm, so the model's own pooling and head read the blend unchanged.

``alpha`` is not learned (a learned ``alpha`` that starts at 1 gives the side network exactly zero
gradient, ``1 - alpha = 0``, until ``alpha`` drifts). The paper uses a fixed hyper-parameter or
a curriculum that moves ``alpha`` from 1 towards 0; here ``alpha`` is fixed (0.5 by default, so
the side network learns from the first step and the model does not start equal to the base), or
with ``curriculum=N`` it decays linearly (vpeft's choice of shape) from 1 towards ``alpha`` over
the first ``N`` training forward passes (``alpha_t = 1 - (1 - alpha) * min(1, (t + 1) / N)``,
already below 1 on the first pass, so the model starts as the base and the side network still
gets gradient on step 1) and stays at ``alpha`` after. The pass counter is a buffer saved with
the adapter, so a resumed run continues the schedule.
The image is picked up by a :class:`~vpeft.core.side.FeatureTap` on the input stem, which also runs
the backbone without autograd: nothing is back-propagated through it (memory-saving).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.method import Method
from vpeft.core.side import FeatureTap, Stash, frozen_pass
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register


@dataclass
class SideTuneConfig(MethodConfig):
    width: int = option(32, "Channels of the side network's convolutions.")
    alpha: float = option(0.5, "Weight of the backbone features in the blend, in [0, 1] (fixed, "
                               "or the end point of the curriculum).")
    curriculum: int = option(0, "Training forward passes over which alpha decays linearly from 1 "
                                "to `alpha` (the paper's curriculum); 0 = alpha fixed throughout.")

    def validate(self) -> None:
        if self.width < 1:
            raise ValueError(f"side-tune width must be >= 1, got {self.width}")
        if not 0.0 <= self.alpha <= 1.0:
            raise ValueError(f"side-tune alpha must be in [0, 1], got {self.alpha}")
        if self.curriculum < 0:
            raise ValueError(f"side-tune curriculum must be >= 0, got {self.curriculum}")
        if self.alpha == 1.0:
            raise ValueError("side-tune alpha=1 blends in nothing of the side network, which then "
                             "never trains; use alpha < 1")


def side_network(channels: int, width: int, patch: int, out_dim: int) -> nn.Sequential:
    """Patchify conv -> GELU -> 3x3 conv -> GELU -> global average pool -> Linear(width, out)."""
    return nn.Sequential(
        nn.Conv2d(channels, width, kernel_size=patch, stride=patch), nn.GELU(),
        nn.Conv2d(width, width, kernel_size=3, padding=1), nn.GELU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(width, out_dim),
    )


class SideBlend(Wrapper):
    """The final norm, its output blended with the side network's vector of the stashed image."""

    def __init__(self, base: nn.Module, side: nn.Module, alpha: float, curriculum: int,
                 stash: Stash) -> None:
        super().__init__(base)
        self.side = side
        self.alpha, self.curriculum = alpha, curriculum
        self.register_buffer("passes", torch.zeros((), dtype=torch.long))
        self.__dict__["stash"] = stash

    def current_alpha(self) -> float:
        """Weight of the backbone for this pass (the curriculum's, counted in training passes)."""
        if not self.curriculum:
            return self.alpha
        t = int(self.passes) + (1 if self.training else 0)  # a training pass uses its own step
        return 1.0 - (1.0 - self.alpha) * min(1.0, t / self.curriculum)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with frozen_pass():
            y = self.base(x)  # (B, N, D) or (B, D)
        if not self.stash:
            raise RuntimeError("side-tune: no input image recorded; run the whole model")
        image = self.stash.pop()
        self.stash.clear()
        alpha = self.current_alpha()
        if self.training and self.curriculum:
            self.passes += 1
        s = self.side(image).to(y.dtype)  # (B, D)
        s = s.unsqueeze(1) if y.ndim == 3 else s
        return alpha * y + (1 - alpha) * s


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
        return self.config.curriculum > 0  # alpha is 1 until the first training pass

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        # the side network's output is blended as (B, N, D) patch tokens at the patch stride
        view.require("patch_embed", "final_norm", "embed_dim", "sequence_tokens", method=self.name)
        cfg: SideTuneConfig = self.config
        stash = Stash()
        side = side_network(view.in_chans, cfg.width, view.patch_size or 16, view.embed_dim)
        wrap(model, view.patch_embed, lambda m: FeatureTap(m, stash, record="input", first=True))
        wrap(model, view.final_norm, lambda m: SideBlend(
            m, side, cfg.alpha, cfg.curriculum, stash))
