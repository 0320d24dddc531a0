"""Segmentation decoders: dense class logits from features of several depths of a backbone.

A decoder is installed in the backbone's head slot (:func:`install_decoder`), so it is *the head*
for everything else in vpeft: it always trains, it is saved and loaded with the adapter, and the
backbone identity ignores it. It reads the outputs of chosen blocks of the model's own forward
(taps placed on the modules at the view's block paths when each forward starts, so a method that
replaces a whole block is tapped too), and ignores the pooled features the classification path
hands it. The model's ``forward`` then returns ``(B, classes, h, w)`` logits at the stride of the
finest feature used; the task brings them to the mask's resolution.

Reading the blocks of the model's own forward (rather than a second path such as timm's
``forward_intermediates``) means the decoder sees exactly what every method was checked to run on
(:func:`~vpeft.core.forward_check.check_forward_path`), prompts and side paths included.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from vpeft.backbones.base import BackboneView, get_view
from vpeft.core.side import Stash

DECODERS = ("linear", "fpn")


def feature_blocks(view: BackboneView, levels: int = 4) -> list[int]:
    """Indices of the blocks the decoder reads, shallow to deep (at most ``levels``).

    Hierarchical models (widths that change with depth): the last block of each of the last
    ``levels`` stages. Plain ones (one width): ``levels`` blocks evenly spaced, the last included
    (blocks 2, 5, 8, 11 of a 12-block ViT).
    """
    dims, depth = view.block_dims, len(view.blocks)
    if depth == 0:
        raise ValueError(f"segmentation needs the blocks of the backbone, and the view "
                         f"'{view.family}' of {type(view.model).__name__} finds none")
    ends = [i for i in range(depth) if i == depth - 1 or (dims and dims[i + 1] != dims[i])]
    if len(ends) > 1:
        return ends[-levels:]
    return sorted({math.ceil(depth * (k + 1) / levels) - 1 for k in range(levels)})


class DenseDecoder(nn.Module):
    """Base of the decoders: the taps that collect block outputs as ``(B, C, h, w)`` maps.

    ``paths`` and ``dims`` are the tapped blocks and their widths; ``patch`` and ``prefix`` say
    how a token sequence ``(B, N, C)`` becomes a grid (its last ``(H / patch) * (W / patch)``
    tokens, after class, register or prompt tokens).
    """

    def __init__(self, paths: list[str], dims: list[int], num_classes: int,
                 patch: int | None, layout: str = "") -> None:
        super().__init__()
        self.paths, self.dims, self.num_classes, self.patch = list(paths), list(dims), \
            num_classes, patch
        self.layout = layout  # the view's block_layout: tokens, nhwc, nchw ('' : by shape)
        self.__dict__["_feats"] = Stash()  # this forward's block outputs, in path order
        self.__dict__["_handles"] = Stash()  # the taps of this forward
        self.__dict__["_size"] = Stash()  # the input's (H, W)

    # -- taps: placed when the model's forward starts, removed when the decoder has read them --
    def start(self, model: nn.Module, args: tuple[Any, ...]) -> None:
        """Forward pre-hook of the whole model: tap the modules now at the block paths."""
        self._untap()
        self._feats[:] = [None] * len(self.paths)
        self._size[:] = [tuple(args[0].shape[-2:])] if args and torch.is_tensor(args[0]) else []
        for i, path in enumerate(self.paths):
            module = model.get_submodule(path)
            self._handles.append(module.register_forward_hook(
                lambda m, a, out, i=i: self._record(i, out)))

    def _record(self, i: int, out: Any) -> None:
        self._feats[i] = out[0] if isinstance(out, (tuple, list)) else out

    def _untap(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def features(self) -> list[torch.Tensor]:
        """The tapped block outputs of this forward as ``(B, C, h, w)`` maps."""
        self._untap()
        feats = list(self._feats)
        self._feats.clear()
        missing = [p for p, f in zip(self.paths, feats, strict=True) if f is None]
        if missing or not self._size:
            raise RuntimeError("the segmentation decoder ran without the blocks it reads ("
                               + ", ".join(missing or self.paths) + "): call the whole model")
        return [self._grid(f, d) for f, d in zip(feats, self.dims, strict=True)]

    def _grid(self, x: torch.Tensor, dim: int) -> torch.Tensor:
        if x.ndim == 4:  # NCHW (CNNs, ConvNeXt) or NHWC (Swin)
            nhwc = self.layout == "nhwc" or (not self.layout and x.shape[-1] == dim
                                             and x.shape[1] != dim)
            return x.permute(0, 3, 1, 2) if nhwc else x
        if x.ndim != 3:
            raise ValueError(f"cannot read a {x.ndim}-d block output as a feature map")
        h, w = self._size[0]
        if self.patch:
            h, w = h // self.patch, w // self.patch
        else:  # no patch size: the grid of the input's aspect with the tokens available
            h = max(1, round(math.sqrt(x.shape[1] * h / w)))
            w = x.shape[1] // h
        return x[:, -h * w:].transpose(1, 2).reshape(x.shape[0], -1, h, w)

    def forward(self, _pooled: torch.Tensor) -> torch.Tensor:
        return self.decode(self.features())

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        raise NotImplementedError


class LinearDecoder(DenseDecoder):
    """The probe of dense features: batch norm and a 1 x 1 classifier on the last block's map
    (as DINOv2's linear segmentation head)."""

    def __init__(self, paths: list[str], dims: list[int], num_classes: int,
                 patch: int | None, width: int = 0, layout: str = "") -> None:
        super().__init__(paths[-1:], dims[-1:], num_classes, patch, layout)
        self.norm = nn.BatchNorm2d(dims[-1])
        self.classifier = nn.Conv2d(dims[-1], num_classes, 1)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        return self.classifier(self.norm(feats[-1]))


class FPNDecoder(DenseDecoder):
    """A small feature pyramid (Lin et al., 2017; the semantic-FPN head of Kirillov et al., 2019)
    over the tapped depths: 1 x 1 laterals to ``width`` channels, a top-down pathway (each level
    plus the upsampled deeper one), a 3 x 3 conv, batch norm and ReLU per level, every level
    upsampled to the finest and summed, then a 1 x 1 classifier. On plain ViTs every level has
    the same stride and the pyramid fuses depths; on hierarchical models it also fuses scales."""

    def __init__(self, paths: list[str], dims: list[int], num_classes: int,
                 patch: int | None, width: int = 128, layout: str = "") -> None:
        super().__init__(paths, dims, num_classes, patch, layout)
        self.laterals = nn.ModuleList(nn.Conv2d(d, width, 1) for d in dims)
        self.smooth = nn.ModuleList(
            nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False),
                          nn.BatchNorm2d(width), nn.ReLU(inplace=True))
            for _ in dims)
        self.classifier = nn.Conv2d(width, num_classes, 1)

    def decode(self, feats: list[torch.Tensor]) -> torch.Tensor:
        p = self.laterals[-1](feats[-1])
        levels = [self.smooth[-1](p)]
        for i in range(len(feats) - 2, -1, -1):
            p = self.laterals[i](feats[i]) + _resize(p, feats[i].shape[-2:])
            levels.append(self.smooth[i](p))
        size = max((lv.shape[-2:] for lv in levels), key=lambda s: s[0] * s[1])
        return self.classifier(sum(_resize(lv, size) for lv in levels))


def _resize(x: torch.Tensor, size: tuple[int, ...]) -> torch.Tensor:
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


def install_decoder(model: nn.Module, kind: str = "fpn", width: int = 128) -> DenseDecoder:
    """Put a ``kind`` decoder for ``model.num_classes`` classes in ``model``'s head slot.

    Call it on the plain backbone, before :func:`vpeft.adapt`: the decoder then is the head (it
    trains, it is saved, and adapting checks the model's forward with it in place).
    """
    if kind not in DECODERS:
        raise ValueError(f"unknown decoder '{kind}'; decoders are {', '.join(DECODERS)}")
    view = get_view(model)
    if not view.heads:
        raise ValueError(f"segmentation puts its decoder in the classifier head's place, and the "
                         f"view '{view.family}' of {type(model).__name__} finds no head")
    num_classes = getattr(model, "num_classes", None)
    if not num_classes:
        raise ValueError(f"{type(model).__name__} has no num_classes for the decoder")
    idx = feature_blocks(view)
    paths = [view.blocks[i] for i in idx]
    dims = [view.block_dims[i] if view.block_dims else view.embed_dim for i in idx]
    cls = LinearDecoder if kind == "linear" else FPNDecoder
    decoder = cls(paths, dims, num_classes, view.patch_size, width, view.block_layout)
    if len(view.heads) > 1:  # e.g. DeiT's distillation head, averaged with the other one
        raise ValueError(f"segmentation needs a model with one classifier head; "
                         f"{type(model).__name__} has {len(view.heads)}: {', '.join(view.heads)}")
    model.set_submodule(view.heads[0], decoder)
    model.register_forward_pre_hook(decoder.start)
    return decoder
