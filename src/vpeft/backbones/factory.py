"""Create a timm backbone, from a local weight file or timm's usual pretrained source."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import timm
from torch import nn

log = logging.getLogger(__name__)


def create_backbone(
    name: str,
    weights: str | Path | None = None,
    num_classes: int | None = None,
    img_size: int | None = None,
    pretrained: bool = True,
    **model_args: Any,
) -> nn.Module:
    """``timm.create_model`` with a local ``weights`` file (safetensors or a torch state dict).

    A different ``img_size`` than the checkpoint's resamples the position embeddings as timm does;
    ``num_classes`` replaces the classifier (the checkpoint's head is dropped when it differs).
    Without ``weights`` and with ``pretrained=True`` timm's own pretrained source is used.
    """
    kwargs: dict[str, Any] = dict(model_args)
    if num_classes is not None:
        kwargs["num_classes"] = num_classes
    if img_size is not None:
        kwargs["img_size"] = img_size
    if weights is not None:
        path = Path(weights)
        if not path.is_file():
            raise FileNotFoundError(f"weights file not found: {path}")
        # timm reads the file itself (safetensors, or torch.load with weights_only=True)
        kwargs["pretrained_cfg_overlay"] = dict(file=str(path))
        pretrained = True
    log.debug("timm.create_model(%s, pretrained=%s, %s)", name, pretrained, kwargs)
    return timm.create_model(name, pretrained=pretrained, **kwargs)
