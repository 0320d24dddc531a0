"""Shared fixtures: tiny timm backbones for speed, and paths to the real weights and data."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
import timm
import torch
from timm.models.efficientnet import _gen_efficientnet_lite
from timm.models.resnet import BasicBlock, ResNet
from timm.models.resnet import Bottleneck as ResNetBottleneck
from torch.nn.modules.batchnorm import _BatchNorm

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = Path(
    os.environ.get(
        "VPEFT_WEIGHTS", SHARED / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"
    )
)
DATA = Path(os.environ.get("VPEFT_DATA", SHARED / "data" / "vtab1k"))

TINY_DIMS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
IMG = TINY_DIMS["img_size"]  # every tiny model takes IMG x IMG images
_SWIN = {"img_size": IMG, "patch_size": 4, "window_size": 4, "embed_dim": 16, "depths": (2, 2),
         "num_heads": (2, 4), "drop_path_rate": 0.0}
# kind -> (timm architecture or a model class/builder, all its overrides); tiny so a
# forward/backward takes milliseconds.
# Kinds of one backbone family share a name prefix only by convention: tests group kinds by the
# family of their view (``vpeft.get_view(model).family``), see ``kinds_of``.
TINY = {
    "vit": ("vit_tiny_patch16_224", {**TINY_DIMS}),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {**TINY_DIMS}),
    "vit-avgpool-reg": (
        "vit_tiny_patch16_224",
        {**TINY_DIMS, "global_pool": "avg", "class_token": False, "reg_tokens": 2,
         "fc_norm": True},
    ),
    # bias-less attention: merging an update that shifts qkv's output must not invent a bias
    "vit-nobias": ("vit_tiny_patch16_224", {**TINY_DIMS, "qkv_bias": False}),
    # DeiT-III style layer scale, CLIP style pre-norm (norm_pre) before the blocks
    "vit-ls-prenorm": (
        "vit_tiny_patch16_224", {**TINY_DIMS, "init_values": 0.1, "pre_norm": True}
    ),
    # EVA-02: rotary embeddings, SwiGLU MLP; fused qkv with q/v biases read by F.linear
    "eva": ("eva02_tiny_patch14_224", {**TINY_DIMS}),
    "eva-separate": ("eva02_tiny_patch14_224", {**TINY_DIMS, "qkv_fused": False}),
    "swin": ("swin_tiny_patch4_window7_224", dict(_SWIN)),
    "swinv2": ("swinv2_tiny_window8_256", dict(_SWIN)),
    # no patch embedding tells a ConvNeXt's input size: the config does, as for a real one
    # layer scale at 1 as after pre-training (timm's 1e-6 init shrinks every gradient inside a
    # block a millionfold, below what a few optimiser steps on tiny weights can show)
    "convnext": ("convnext_tiny", {"dims": (8, 16, 32, 64), "depths": (1, 1, 1, 1),
                                   "drop_path_rate": 0.0, "ls_init_value": 1.0,
                                   "pretrained_cfg_overlay": {"input_size": (3, IMG, IMG)}}),
    # BatchNorm CNNs (a builder where timm's factory has no size options): ResNet, ResNeXt with
    # grouped 3x3 convs (not depthwise), EfficientNet-Lite with Conv2dSame, depthwise convs,
    # BatchNormAct2d and conv_head
    "resnet": (ResNet, {"block": BasicBlock, "layers": [1, 1, 1, 1], "channels": (8, 16, 16, 32),
                        "stem_width": 8, "zero_init_last": False}),
    "resnext": (ResNet, {"block": ResNetBottleneck, "layers": [1, 1, 1, 1],
                         "channels": (8, 16, 16, 32), "stem_width": 8, "cardinality": 2,
                         "base_width": 32, "zero_init_last": False}),
    "effnet": (functools.partial(_gen_efficientnet_lite, "tf_efficientnet_lite0"),
               {"channel_multiplier": 0.25, "depth_multiplier": 0.25, "pad_type": "same",
                "bn_eps": 1e-3}),
}


def _hf(model_cls: str, config_cls: str, **config):
    """A builder of a tiny random-init ``transformers`` model as vpeft's HF classifier."""
    def build(num_classes: int) -> torch.nn.Module:
        import transformers as tf

        from vpeft.backbones.hf import HFImageClassifier

        model = getattr(tf, model_cls)(getattr(tf, config_cls)(**config))
        return HFImageClassifier(model, num_classes=num_classes)
    return build


OPEN_CLIP_ARCH = "vpeft-tiny-vit"  # registered with open_clip's own model-config mechanism
OPEN_CLIP_CFG = {"embed_dim": 16,
                 "vision_cfg": {"image_size": IMG, "layers": 2, "width": 32, "patch_size": 8,
                                "head_width": 16},
                 "text_cfg": {"context_length": 8, "vocab_size": 100, "width": 16, "heads": 2,
                              "layers": 1}}


def register_open_clip_arch() -> None:
    import json
    import tempfile

    import open_clip

    if OPEN_CLIP_ARCH not in open_clip.list_models():
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / f"{OPEN_CLIP_ARCH}.json"
            path.write_text(json.dumps(OPEN_CLIP_CFG))
            open_clip.add_model_config(path)


def _open_clip(num_classes: int) -> torch.nn.Module:
    from vpeft.backbones.factory import create_backbone

    register_open_clip_arch()
    return create_backbone(f"open_clip:{OPEN_CLIP_ARCH}", num_classes=num_classes,
                           pretrained=False)


def _installed(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


_HF_VIT = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
           "intermediate_size": 64, "image_size": IMG, "patch_size": 8}
if _installed("transformers"):  # Hugging Face models: separate q/k/v projections
    TINY |= {
        "hf-vit": (_hf("ViTModel", "ViTConfig", **_HF_VIT), {}),
        "hf-dinov2": (_hf("Dinov2Model", "Dinov2Config", **_HF_VIT), {}),
        "hf-clip": (_hf("CLIPVisionModel", "CLIPVisionConfig", **_HF_VIT), {}),
        "hf-swin": (_hf("SwinModel", "SwinConfig", image_size=IMG, patch_size=4, embed_dim=16,
                        depths=[1, 1], num_heads=[2, 2], window_size=4), {}),
    }
if _installed("open_clip"):  # an open_clip image tower: nn.MultiheadAttention
    TINY["open-clip"] = (_open_clip, {})


def _open_post_norms(model: torch.nn.Module) -> None:
    # SwinV2 starts its residual post-norms at zero, so no attention or MLP branch would reach
    # the output of a random-init model and no method inside them could get a gradient
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("norm1.weight", "norm2.weight")):
                p.fill_(1.0)


def _pretrained_like_norms(model: torch.nn.Module) -> None:
    # BatchNorm as after pre-training: statistics and affine maps that are not the identity
    g = torch.Generator().manual_seed(2)
    for m in model.modules():
        if isinstance(m, _BatchNorm):
            m.running_mean.normal_(0, 0.1, generator=g)
            m.running_var.uniform_(0.5, 1.5, generator=g)
            m.weight.data.uniform_(0.5, 1.5, generator=g)
            m.bias.data.normal_(0, 0.1, generator=g)


# kind -> what a pretrained model would already be
AFTER_INIT = {"swinv2": _open_post_norms, "resnet": _pretrained_like_norms,
              "resnext": _pretrained_like_norms, "effnet": _pretrained_like_norms}
NUM_CLASSES = 5
# the methods of the foundation issue, which every later layer (engine, bench) relies on
FOUNDATION = ["full", "linear", "bitfit", "lora", "ssf", "adapter", "adaptformer", "vpt-shallow",
              "vpt-deep"]


@functools.cache
def _tiny_template(kind: str, seed: int) -> torch.nn.Module:
    arch, kwargs = TINY[kind]
    torch.manual_seed(seed)
    if callable(arch):
        model = arch(num_classes=NUM_CLASSES, **kwargs).eval()
        # what timm's factory would attach: the input size the model is meant for
        model.pretrained_cfg = {"input_size": (3, IMG, IMG)}
    else:
        model = timm.create_model(arch, pretrained=False, num_classes=NUM_CLASSES, **kwargs).eval()
    AFTER_INIT.get(kind, lambda m: None)(model)
    return model


def tiny_model(kind: str = "vit", seed: int = 0) -> torch.nn.Module:
    """A small random-init timm model of ``kind`` (a key of ``TINY``); same seed, same weights.

    A fresh copy of a cached template (building through timm costs ten times more); the global
    RNG is left seeded with ``seed`` as if the model had just been built.
    """
    model = copy.deepcopy(_tiny_template(kind, seed))
    torch.manual_seed(seed)
    return model


def saved_bytes(fn) -> tuple[int, torch.Tensor]:
    """Bytes autograd keeps for the backward while ``fn`` runs (outside any checkpoint), and
    ``fn``'s output."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return total, out


def real_deit(num_classes: int = 10) -> torch.nn.Module:
    if not WEIGHTS.is_file():
        pytest.skip(f"real DeiT-Tiny weights not found at {WEIGHTS} (set VPEFT_WEIGHTS)")
    return timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(WEIGHTS)),
        num_classes=num_classes,
    ).eval()


@functools.cache
def family_of(kind: str) -> str:
    """The view family (``vit``, ``eva``, ``swin`` ...) of a tiny ``kind``."""
    from vpeft import get_view

    return get_view(_tiny_template(kind, 0)).family


def kinds_of(*families: str) -> tuple[str, ...]:
    """Every tiny kind whose view belongs to one of ``families``, in ``TINY`` order."""
    return tuple(k for k in TINY if family_of(k) in families)


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
