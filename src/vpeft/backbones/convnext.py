"""View of timm's ConvNeXt: stages of depthwise-conv + MLP blocks with layer scale on
(B, C, H, W) maps; the MLP is Linear on channels-last or 1 x 1 convolutions (``conv_mlp``).

No attention: weight-update methods (LoRA, DoRA, KAdaptation, GLoRA ...) adapt the MLP's layers
by default (:meth:`~vpeft.backbones.base.BackboneView.update_targets`), and methods placed at
block sub-layers go to the MLP only (:meth:`~vpeft.backbones.base.BackboneView.sublayers`)."""

from __future__ import annotations

from torch import nn

from vpeft.backbones.base import BackboneView, head_paths, register_view, staged_blocks


@register_view
def convnext_view(model: nn.Module) -> BackboneView | None:
    from timm.models.convnext import ConvNeXt

    if not isinstance(model, ConvNeXt):
        return None
    blocks = staged_blocks(model.stages, "stages")
    dims = [block.conv_dw.out_channels for _, block in blocks]
    return BackboneView(
        family="convnext",
        model=model,
        blocks=[p for p, _ in blocks],
        block_dims=dims,
        # each stage's blocks run in sequence on one width (Conv-Adapter's "every stage")
        stages=[f"stages.{s}.blocks" for s in range(len(model.stages))],
        convs=[f"{p}.{n}" for p, b in blocks for n, m in b.named_modules()
               if isinstance(m, nn.Conv2d)],
        mlp="mlp",
        block_layout="nchw",
        norms=("norm",),
        heads=head_paths(model),
        # no patch embedding or final norm of tokens: the stem is a conv, the norm is in the head
        embed_dim=model.num_features,
        in_chans=model.stem[0].in_channels,
    )
