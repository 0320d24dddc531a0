"""E3VA (Yin et al., ACM MM 2023, arXiv:2306.09729, "Parameter-efficient is not sufficient"):
low-rank adapters on a gradient highway beside the frozen backbone.

The backbone runs without autograd; adapters read its intermediate activations and add their
outputs, in parallel, to a side stream (the "highway") that back-propagation follows instead of
the backbone, which saves the backbone's activation memory and its backward time. Per block ``i``
with frozen output ``f_i`` and intermediate activations ``a_i`` (the stream after attention, the
input of the MLP's norm) ::

    f_i = block_i(f_{i-1})                                   (no autograd)
    s_i = s_{i-1} + A_i(a_i) + B_i(f_i)                      (the highway)
    out_i = f_i + s_i                                        (what the block returns)

``A`` and ``B`` are bottlenecks ``up(gelu(down(.)))`` of width ``rank`` with ``up`` at zero, so the
adapted model starts equal to the base. Every block returns ``f_i + s_i``, so whatever reads block
outputs (a segmentation decoder, the final norm and head) sees the adapted features, while the
next block still computes on the frozen stream ``f_i``, kept in a stash. Where the stream passes
a stage's downsampling layer (Swin's patch merging, ConvNeXt's strided conv), the highway goes
through that frozen layer too, as in the paper (``s <- D(f + s) - D(f)``, with autograd, so
gradients reach the adapters of earlier stages); where a block itself changes the shape (CNN
blocks with a stride), the highway restarts at zero.

Differences from the paper (whose code is not public): the paper's adapters have a "dual
low-rank" factorisation and the highway feeds an FPN through a trainable norm; here the adapters
are plain rank-``r`` bottlenecks and the highway is added to every block's output, so any task
(classification through the model's own final norm and head, or a decoder on block outputs)
reads it without knowing about E3VA.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView, MissingPartError
from vpeft.core.config import MethodConfig, option
from vpeft.core.grid import from_tokens, to_tokens
from vpeft.core.inject import Bottleneck
from vpeft.core.method import Method
from vpeft.core.side import FeatureTap, Stash, frozen_pass, tracking_frozen
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register


@dataclass
class E3VAConfig(MethodConfig):
    rank: int = option(8, "Width r of each low-rank adapter.")
    positions: tuple[str, ...] = option(("attn", "mlp"), "Activations the adapters read: 'attn' "
                                                         "the stream after attention (input of "
                                                         "the MLP's norm), 'mlp' the block output.")
    scale: float = option(1.0, "Multiplier of the adapters' outputs.")

    def validate(self) -> None:
        if self.rank < 1:
            raise ValueError(f"e3va rank must be >= 1, got {self.rank}")
        if not self.positions or set(self.positions) - {"attn", "mlp"}:
            raise ValueError(f"e3va positions must be among ('attn', 'mlp'), got {self.positions}")


class Highway:
    """The frozen stream and the side stream between two blocks of one forward pass."""

    def __init__(self) -> None:
        self.frozen: torch.Tensor | None = None
        self.side: torch.Tensor | None = None

    def __deepcopy__(self, memo: dict) -> Highway:
        return type(self)()  # never carry tensors (and their graphs) into a copy

    def __reduce__(self) -> tuple:
        return type(self), ()


class HighwayBlock(Wrapper):
    """Run the frozen block on the frozen stream without autograd; return ``f + s``."""

    def __init__(self, base: nn.Module, adapters: nn.ModuleDict, first: bool, last: bool,
                 layout: str, scale: float, highway: Highway, taps: Stash | None) -> None:
        super().__init__(base)
        self.adapters = adapters
        self.first, self.last, self.layout, self.scale = first, last, layout, scale
        self.__dict__["highway"] = highway
        self.__dict__["taps"] = taps

    def _adapt(self, name: str, a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        t, _ = to_tokens(a.reshape(like.shape), self.layout)
        return from_tokens(self.adapters[name](t), like, self.layout)

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        hw = self.highway
        if self.first:
            hw.frozen, hw.side = x, None
        elif hw.frozen is None:
            raise RuntimeError("e3va: no frozen stream from the previous block; run the whole "
                               "model")
        frozen = hw.frozen
        if tracking_frozen() and not self.first and x.is_leaf and x.requires_grad:
            # an explanation differentiates with respect to what enters this block (Grad-CAM
            # puts a leaf there): the frozen stream's values, reached through that leaf
            frozen = frozen.detach() + (x - x.detach())
        with frozen_pass():  # no graph (explanations may ask for one: track_frozen)
            f = self.base(frozen, *args, **kwargs)
        side = hw.side if hw.side is not None and hw.side.shape == f.shape else None
        for name in self.adapters:
            if name == "attn":
                if not self.taps:
                    raise RuntimeError("e3va: the block's MLP norm did not run")
                a = self.taps.pop()
            else:
                a = f
            u = self.scale * self._adapt(name, a, f)
            side = u if side is None else side + u
        # the last block lets go of the streams (and the highway's graph) until the next pass
        hw.frozen, hw.side = (None, None) if self.last else (f, side)
        return f + side


class HighwayDownsample(Wrapper):
    """A frozen layer between stages, run on both streams: ``D(f)`` and ``D(f + s) - D(f)``."""

    def __init__(self, base: nn.Module, highway: Highway) -> None:
        super().__init__(base)
        self.__dict__["highway"] = highway

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        hw = self.highway
        if hw.frozen is None or hw.side is None:  # before the first block: nothing to carry
            return self.base(x)
        y = self.base(x)  # x = f + s: the highway through the frozen layer, with autograd
        with frozen_pass():
            f = self.base(hw.frozen)
        hw.frozen, hw.side = f, y - f
        return y


def downsample_paths(model: nn.Module, view: BackboneView) -> list[str]:
    """The layers a stage runs before its blocks: ``<stage>.downsample`` of blocks at
    ``<stage>.blocks.<j>`` (timm's Swin and ConvNeXt stages), where it is not an identity."""
    paths: list[str] = []
    for block in view.blocks:
        stage, _, rest = block.rpartition(".blocks.")
        if not stage or "." in rest or f"{stage}.downsample" in paths:
            continue
        layer = getattr(model.get_submodule(stage), "downsample", None)
        if isinstance(layer, nn.Module) and not isinstance(layer, nn.Identity):
            paths.append(f"{stage}.downsample")
    return paths


@register
class E3VA(Method):
    """E3VA: low-rank adapters on a gradient highway; the backbone runs without autograd."""

    name = "e3va"
    config_cls = E3VAConfig
    family = "addition"
    subfamily = "side"
    memory_saving = True
    zero_init = True

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: E3VAConfig = self.config
        view.require("blocks", "block_layout", method=self.name)
        positions = [p for p in cfg.positions if p != "attn" or view.attn]
        if cfg.positions != E3VAConfig.positions and len(positions) < len(cfg.positions):
            view.require("attn", method=self.name)  # asked for explicitly
        if "attn" in positions:
            view.require("norms", method=self.name)
        downsamples = downsample_paths(model, view)
        for i in range(1, view.depth):  # the highway crosses stages only through a downsample
            stage = view.blocks[i].rpartition(".blocks.")[0]
            if view.block_dims[i] != view.block_dims[i - 1] and (
                    f"{stage}.downsample" not in downsamples):
                raise MissingPartError(
                    f"method 'e3va' needs blocks that keep the stream's width, with the width "
                    f"changed by stage downsampling layers, but block {view.blocks[i]} of "
                    f"{type(model).__name__} (view '{view.family}') changes it itself",
                    part="downsample")
        highway = Highway()
        for i, path in enumerate(view.blocks):
            w = view.block_dims[i]
            taps = Stash() if "attn" in positions else None
            if taps is not None:
                wrap(model, view.block_part(i, view.norms[-1]),
                     lambda m, t=taps: FeatureTap(m, t, record="input", first=True))
            adapters = nn.ModuleDict({p: Bottleneck(w, cfg.rank) for p in positions})
            wrap(model, path, lambda b, a=adapters, t=taps, i=i: HighwayBlock(
                b, a, i == 0, i == view.depth - 1, view.block_layout, cfg.scale, highway, t))
        for path in downsamples:
            wrap(model, path, lambda m: HighwayDownsample(m, highway))
