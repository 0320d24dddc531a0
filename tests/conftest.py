"""Shared fixtures: tiny timm backbones for speed, and paths to the real weights and data."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import pytest
import timm
import torch

ROOT = Path(__file__).resolve().parents[1]
SHARED = ROOT.parent / "shared"
WEIGHTS = Path(
    os.environ.get(
        "VPEFT_WEIGHTS", SHARED / "weights" / "deit_tiny_patch16_224.fb_in1k.safetensors"
    )
)
DATA = Path(os.environ.get("VPEFT_DATA", SHARED / "data" / "vtab1k"))

# name -> timm architecture and overrides; tiny so a forward/backward takes milliseconds
TINY = {
    "vit": ("vit_tiny_patch16_224", {}),
    "deit-distilled": ("deit_tiny_distilled_patch16_224", {}),
    "vit-avgpool-reg": (
        "vit_tiny_patch16_224",
        {"global_pool": "avg", "class_token": False, "reg_tokens": 2, "fc_norm": True},
    ),
}
TINY_DIMS = {"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}
NUM_CLASSES = 5
# the methods of the foundation issue, which every later layer (engine, bench) relies on
FOUNDATION = ["full", "linear", "bitfit", "lora", "ssf", "adapter", "adaptformer", "vpt-shallow",
              "vpt-deep"]


@functools.cache
def _tiny_template(kind: str, seed: int) -> torch.nn.Module:
    arch, extra = TINY[kind]
    torch.manual_seed(seed)
    return timm.create_model(
        arch, pretrained=False, num_classes=NUM_CLASSES, **TINY_DIMS, **extra
    ).eval()


def tiny_model(kind: str = "vit", seed: int = 0) -> torch.nn.Module:
    """A small random-init timm ViT; the same seed gives the same weights.

    A fresh copy of a cached template (building through timm costs ten times more); the global
    RNG is left seeded with ``seed`` as if the model had just been built.
    """
    model = copy.deepcopy(_tiny_template(kind, seed))
    torch.manual_seed(seed)
    return model


def real_deit(num_classes: int = 10) -> torch.nn.Module:
    if not WEIGHTS.is_file():
        pytest.skip(f"real DeiT-Tiny weights not found at {WEIGHTS} (set VPEFT_WEIGHTS)")
    return timm.create_model(
        "deit_tiny_patch16_224",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=str(WEIGHTS)),
        num_classes=num_classes,
    ).eval()


@pytest.fixture(autouse=True)
def _threads():
    torch.set_num_threads(2)
    yield
