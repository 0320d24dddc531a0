"""AdaptFormer (Chen et al., 2022, arXiv:2205.13535): a scaled bottleneck in parallel with the MLP.

``mlp(x) + s * up(relu(down(x)))`` with ``x`` the MLP's (normalised) input, hidden width 64 and
``s = 0.1`` by default, as in the paper; ``up`` starts at zero.
"""

from __future__ import annotations

from dataclasses import dataclass

from vpeft.core.config import MethodConfig, option
from vpeft.methods.addition.adapter import BlockAdapterMethod
from vpeft.registry import register


@dataclass
class AdaptFormerConfig(MethodConfig):
    dim: int = option(64, "Bottleneck width.")
    scale: float = option(0.1, "Scale s of the parallel branch.")
    act: str = option("relu", "Activation inside the bottleneck.")
    dropout: float = option(0.1, "Dropout inside the bottleneck (0.1 in the paper).")

    def validate(self) -> None:
        if self.dim < 1:
            raise ValueError(f"adaptformer dim must be >= 1, got {self.dim}")


@register
class AdaptFormer(BlockAdapterMethod):
    """AdaptFormer: parallel scaled bottleneck beside the MLP."""

    name = "adaptformer"
    config_cls = AdaptFormerConfig
    parallel = True

    def positions(self) -> tuple[str, ...]:
        return ("mlp",)
