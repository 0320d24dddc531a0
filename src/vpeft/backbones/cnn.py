"""View of classic BatchNorm CNNs: timm ResNet, EfficientNet, MobileNet (inverted residuals).

Found by structure, not by class name: a *stage* is an ``nn.Sequential`` whose children are all
blocks, a *block* is a module holding convolutions and a BatchNorm. ResNet's ``layer1..4`` and
EfficientNet's ``blocks.0..6`` are stages; a ``downsample`` ``Sequential(conv, bn)`` is not (its
BatchNorm child holds no convolution). Families without BatchNorm (ConvNeXt, transformers) are
left to their own views.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from vpeft.backbones.base import BackboneView, head_paths, register_view


def _is_block(m: nn.Module) -> bool:
    if isinstance(m, (nn.Sequential, nn.Conv2d)):
        return False
    kinds = [type(x) for x in m.modules()]
    return any(issubclass(k, nn.Conv2d) for k in kinds) and any(
        issubclass(k, _BatchNorm) for k in kinds
    )


def _stages(model: nn.Module) -> list[str]:
    """Outermost ``nn.Sequential`` modules whose children are all blocks, in module order."""
    found: list[str] = []
    for name, m in model.named_modules():
        if not name or any(name.startswith(s + ".") for s in found):
            continue
        if isinstance(m, nn.Sequential) and len(m) and all(_is_block(c) for c in m):
            found.append(name)
    return found


def _convs(model: nn.Module, root: str) -> list[tuple[str, nn.Conv2d]]:
    sub = model.get_submodule(root)
    return [(f"{root}.{n}", c) for n, c in sub.named_modules() if isinstance(c, nn.Conv2d)]


def _final_features(model: nn.Module, last_block: str, heads: list[str]) -> str | None:
    """The first convolution after the last block, outside the heads (EfficientNet's conv_head)."""
    after = False
    for name, m in model.named_modules():
        if name == last_block:
            after = True
            continue
        if not after or name.startswith(last_block + "."):
            continue
        if isinstance(m, nn.Conv2d) and not any(name.startswith(h) for h in heads):
            return name
    return None


@register_view
def cnn_view(model: nn.Module) -> BackboneView | None:
    if not any(isinstance(m, _BatchNorm) for m in model.modules()):
        return None
    stages = _stages(model)
    if not stages:
        return None
    blocks = [f"{s}.{i}" for s in stages for i in range(len(model.get_submodule(s)))]
    # a block's output width is that of its last convolution (conv_pwl, conv3, or downsample's,
    # which equals the main path's)
    block_dims = [_convs(model, b)[-1][1].out_channels for b in blocks]
    heads = head_paths(model)
    first_conv = next(m for m in model.modules() if isinstance(m, nn.Conv2d))
    return BackboneView(
        family="cnn",
        model=model,
        blocks=blocks,
        block_dims=block_dims,
        stages=stages,
        convs=[p for b in blocks for p, _ in _convs(model, b)],
        final_features=_final_features(model, blocks[-1], heads),
        heads=heads,
        sequence_tokens=False,
        block_layout="nchw",
        embed_dim=getattr(model, "num_features", block_dims[-1]),
        in_chans=first_conv.in_channels,
    )
