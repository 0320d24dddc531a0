"""Preprocessing from the model's own timm data config, the same for every method.

VTAB-1k style: the image is resized straight to ``img_size x img_size`` (no crop, no aspect
ratio kept) with the model's interpolation, then normalised with the model's mean and std.
"""

from __future__ import annotations

from typing import Any

from timm.data import create_transform, resolve_data_config
from torch import nn


def model_input_size(model: nn.Module) -> int | None:
    """The image side a model is built for, where it has a fixed one (ViT patch embeddings)."""
    size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if isinstance(size, (tuple, list)) and size and size[0] == size[-1]:
        return int(size[0])
    return int(size) if isinstance(size, int) else None


def data_config(model: nn.Module, img_size: int | None = None) -> dict[str, Any]:
    """timm's data config of ``model`` with ``input_size`` set to the size actually used.

    timm's ``pretrained_cfg`` keeps the checkpoint's size (224) even when the model was built with
    another ``img_size``; the model's patch embedding knows the real one.
    """
    cfg = resolve_data_config({}, model=model)
    side = img_size or model_input_size(model) or cfg["input_size"][-1]
    cfg["input_size"] = (cfg["input_size"][0], side, side)
    cfg["crop_pct"], cfg["crop_mode"] = 1.0, "squash"  # resize directly, no crop
    return cfg


def eval_transform(cfg: dict[str, Any]):
    """PIL image -> normalised tensor: resize to ``input_size``, to tensor, normalise."""
    return create_transform(
        input_size=cfg["input_size"], is_training=False, interpolation=cfg["interpolation"],
        mean=cfg["mean"], std=cfg["std"], crop_pct=1.0, crop_mode="squash",
    )
