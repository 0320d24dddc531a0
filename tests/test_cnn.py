"""CNN backbones (ResNet, ResNeXt, EfficientNet-Lite): the view, conv LoRA/DoRA, BatchNorm tuning,
Conv-Adapter. The shared matrix (tests/rows/cnn.py) runs every method check on these kinds."""

from __future__ import annotations

import pytest
import torch
from timm.layers import Conv2dSame
from torch import nn

import vpeft
from vpeft.backbones import MissingPartError
from vpeft.core.conv import LowRankConv, is_depthwise

from conftest import NUM_CLASSES, tiny_model

KINDS = ("resnet", "resnext", "effnet")  # conftest.TINY; the shared matrix runs its CNN rows
X = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))


def cnn(kind: str) -> nn.Module:
    return tiny_model(kind)


def convs(model: nn.Module, prefix: str = "") -> dict[str, nn.Conv2d]:
    return {n: m for n, m in model.named_modules()
            if isinstance(m, nn.Conv2d) and n.startswith(prefix)}


# -- the view --------------------------------------------------------------------------------------
def test_views_find_stages_blocks_and_head_input():
    res = vpeft.get_view(cnn("resnet"))
    assert (res.family, res.stages) == ("cnn", ["layer1", "layer2", "layer3", "layer4"])
    assert res.blocks == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    assert res.block_dims == [8, 16, 16, 32] and res.heads == ["fc"]
    assert res.final_features is None and not res.sequence_tokens and res.attn is None
    assert "layer2.0.downsample.0" in res.convs and "conv1" not in res.convs  # stem is not a block
    eff = vpeft.get_view(cnn("effnet"))
    model = cnn("effnet")
    assert eff.stages == [f"blocks.{i}" for i in range(len(model.blocks))]
    assert eff.block_dims == [blk[-1].conv_pwl.out_channels if hasattr(blk[-1], "conv_pwl")
                              else blk[-1].conv_pw.out_channels for blk in model.blocks]
    assert eff.final_features == "conv_head" and eff.heads == ["classifier"]
    assert isinstance(model.get_submodule(eff.convs[0]), Conv2dSame) or any(
        isinstance(model.get_submodule(p), Conv2dSame) for p in eff.convs)


def test_transformers_are_not_taken_for_cnns():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            embed_dim=48, depth=1, num_heads=3)
    assert vpeft.get_view(vit).family == "vit"


@pytest.mark.parametrize("method,part", [("adapter", "attn"), ("adaptformer", "mlp"),
                                         ("vpt-deep", "sequence_tokens")])
def test_token_methods_raise_missing_part_naming_method_family_part(method: str, part: str):
    with pytest.raises(MissingPartError) as err:
        vpeft.adapt(cnn("effnet"), method)
    msg = str(err.value)
    assert f"'{method}'" in msg and "'cnn'" in msg and part in msg



@pytest.mark.parametrize("method", [m.name for m in vpeft.list_methods()])
def test_every_method_runs_on_a_cnn_or_names_the_missing_part(method: str):
    options = {"img_size": 32} if method == "visual-prompt" else {}
    try:
        model = vpeft.adapt(cnn("effnet"), method, **options)
    except Exception as e:  # the test is about which error
        assert isinstance(e, MissingPartError), f"{type(e).__name__}: {e}"
        # the method, the family and the part (a needed part, or the target that matched none)
        assert f"'{method}'" in str(e) and "(view 'cnn')" in str(e)
        assert "needs" in str(e) or "matched no module" in str(e), str(e)
        return
    assert model(X).shape == (4, NUM_CLASSES)


def test_conv_adapter_refuses_a_vit():
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                            embed_dim=48, depth=1, num_heads=3)
    with pytest.raises(MissingPartError, match=r"conv-adapter.*stages.*'vit'"):
        vpeft.adapt(vit, "conv-adapter")


# -- conv LoRA / DoRA ------------------------------------------------------------------------------
def test_lora_default_targets_on_a_cnn():
    model = vpeft.adapt(cnn("effnet"), "lora")
    wrapped = {n for n, m in model.named_modules() if isinstance(m, LowRankConv)}
    assert "conv_head" in wrapped and "conv_stem" not in wrapped
    dw = [n for n, m in cnn("effnet").named_modules()
          if isinstance(m, nn.Conv2d) and is_depthwise(m)]
    assert dw and not wrapped & set(dw)
    assert any(n.endswith("conv_pw") for n in wrapped) and any(n.endswith("conv_pwl")
                                                                for n in wrapped)


@pytest.mark.parametrize("kind,path", [("effnet", "conv_stem"), ("resnext", "layer1.0.conv2"),
                                       ("resnet", "layer2.0.conv1")])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_conv_pair_merges_exactly_into_the_kernel(kind, path, method):
    """Strided SAME-padded, grouped and strided 3x3 convs: the pair's output equals the conv
    with the merged kernel, and unmerging gives the original kernel back."""
    model = vpeft.adapt(cnn(kind), method, targets=(path,), rank=2)
    layer = model.get_submodule(path)
    with torch.no_grad():
        layer.lora_B.normal_()
        if method == "dora":
            layer.magnitude.mul_(1.5)
    conv = cnn(kind).get_submodule(path)
    assert layer.base.groups == conv.groups
    x = torch.randn(2, conv.in_channels, 17, 17, dtype=torch.float64)
    layer.double()
    with torch.no_grad():
        y = layer(x)
        merged = vpeft.merge(model.double())
        assert type(merged.get_submodule(path)) is type(conv)
        torch.testing.assert_close(merged.get_submodule(path)(x), y)
        back = vpeft.unmerge(merged).get_submodule(path).base.weight
        torch.testing.assert_close(back, conv.weight.double())


def test_depthwise_target_is_refused_clearly():
    model = cnn("effnet")
    dw = next(n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and is_depthwise(m))
    with pytest.raises(ValueError, match="depthwise"):
        vpeft.adapt(model, "lora", targets=(dw,))


# -- BatchNorm -------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["ln-tune", "bitfit", "ssf"])
def test_bn_statistics_frozen_by_default_updated_on_request(method):
    model = vpeft.adapt(cnn("resnet"), method).train()
    with torch.no_grad():
        ref = model.eval()(X)
        assert torch.equal(model.train()(X), ref), "frozen BatchNorm must normalise as in eval"
    assert torch.equal(model.bn1.running_mean, cnn("resnet").bn1.running_mean)
    live = vpeft.adapt(cnn("resnet"), method, norm_stats=True).train()
    with torch.no_grad():
        live(X)
    assert not torch.equal(live.bn1.running_mean, cnn("resnet").bn1.running_mean)


def test_ssf_acts_inside_bn_act_before_the_activation():
    """On BatchNormAct2d the scale/shift comes before ReLU6: a negative shift must be clipped."""
    model = vpeft.adapt(cnn("effnet"), "ssf", init_std=0.0)
    bn = model.bn2
    with torch.no_grad():
        bn.shift.fill_(-100.0)
        out = bn(torch.randn(2, bn.base.num_features, 4, 4))
    assert torch.equal(out, torch.zeros_like(out))  # ReLU6(-100 + ...) = 0
