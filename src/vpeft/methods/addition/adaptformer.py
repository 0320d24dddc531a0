"""AdaptFormer (Chen et al., 2022, arXiv:2205.13535): a scaled bottleneck in parallel with the MLP.

As in the official code (``models/custom_modules.py``, ``Block.forward`` with
``ffn_option='parallel'``), the branch reads the block's residual stream *before* the MLP's
LayerNorm and its output is added outside the MLP's drop-path (and layer scale)::

    x = x + attn(norm1(x))
    x = x + drop_path(mlp(norm2(x))) + s * up(dropout(relu(down(x))))

with ``s = 0.1`` and dropout 0.1 after the ReLU; ``up`` starts at zero. ``input='norm'`` keeps the
other form, ``mlp(norm2(x)) + s * branch(norm2(x))`` inside the drop-path; it is also the form
used on blocks without a token sequence (ConvNeXt), whose residual stream has another layout than
the MLP's input.

Bottleneck width: 8 by default, the VTAB-1k setting (0.16M parameters on ViT-B/16) that vpeft's
benchmark follows; the paper's large-data setting (video, ImageNet-scale) is 64 (1.19M).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.side import Stash
from vpeft.core.surgery import Wrapper, wrap
from vpeft.methods.addition.adapter import BlockAdapterMethod
from vpeft.registry import register

INPUTS = ("block", "norm")


@dataclass
class AdaptFormerConfig(MethodConfig):
    dim: int = option(8, "Bottleneck width: 8 is the VTAB-1k setting (0.16M params on ViT-B/16), "
                         "64 the paper's large-data setting (1.19M).")
    scale: float = option(0.1, "Scale s of the parallel branch.")
    act: str = option("relu", "Activation inside the bottleneck.")
    dropout: float = option(0.1, "Dropout inside the bottleneck (0.1 in the paper).")
    input: str = option("block", "'block': the branch reads the residual stream before the MLP's "
                                 "norm and is added outside drop-path (official code); 'norm': it "
                                 "reads the MLP's normalised input, inside drop-path.")

    def validate(self) -> None:
        if self.dim < 1:
            raise ValueError(f"adaptformer dim must be >= 1, got {self.dim}")
        if self.input not in INPUTS:
            raise ValueError(f"adaptformer input must be one of {INPUTS}, got {self.input!r}")


class InputTap(Wrapper):
    """Run ``base`` unchanged and record its input (with its graph: the branch back-propagates)."""

    def __init__(self, base: nn.Module, stash: Stash) -> None:
        super().__init__(base)
        self.__dict__["stash"] = stash

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        self.stash.clear()
        self.stash.append(x)
        return self.base(x, *args, **kwargs)


class ParallelBlock(Wrapper):
    """``block(x) + s * branch(h)``, ``h`` the recorded input of the block's MLP norm.

    The block returns ``h + drop_path(mlp(norm2(h)))``, so adding the branch after the block puts
    it beside the MLP's residual update, outside drop-path and layer scale, as the official code.
    """

    def __init__(self, base: nn.Module, branch: nn.Module, scale: float, stash: Stash) -> None:
        super().__init__(base)
        self.branch, self.scale = branch, scale
        self.__dict__["stash"] = stash

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        y = self.base(x, *args, **kwargs)
        if not self.stash:
            raise RuntimeError("adaptformer: the block's MLP norm did not run")
        h = self.stash.pop()  # (B, N, D); Swin blocks return the same tokens as (B, H, W, D)
        return y + self.scale * self.branch(h).view(y.shape)


@register
class AdaptFormer(BlockAdapterMethod):
    """AdaptFormer: parallel scaled bottleneck beside the MLP."""

    name = "adaptformer"
    config_cls = AdaptFormerConfig
    parallel = True

    def positions(self) -> tuple[str, ...]:
        return ("mlp",)

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        # a block whose residual stream is not a token sequence (ConvNeXt: NCHW around a
        # channels-last MLP) has no residual input in the MLP's layout: use the 'norm' form there
        if self.config.input == "norm" or not view.sequence_tokens:
            return super().apply(model, view)
        view.require("blocks", "mlp", "norms", method=self.name)
        mlp_norm = view.norms[-1]  # the pre-norm of the MLP (norm2 on a ViT block)
        for i in range(view.depth):
            stash = Stash()
            wrap(model, view.block_part(i, mlp_norm), lambda m, s=stash: InputTap(m, s))
            wrap(model, view.blocks[i], lambda b, s=stash, d=view.block_dims[i]: ParallelBlock(
                b, self.branch(d), self.config.scale, s))
