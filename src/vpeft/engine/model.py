"""Build the backbone a run trains: :func:`vpeft.backbones.factory.create_backbone` with the checks
and messages a command line needs (unknown model names, weights that do not fit, CNN sizes)."""

from __future__ import annotations

import difflib
import logging
from typing import Any

import timm
import torch
from torch import nn

from vpeft.backbones.base import get_view
from vpeft.backbones.factory import create_backbone, is_external

logger = logging.getLogger(__name__)


def build_backbone(name: str, num_classes: int, weights: str | None = None,
                   pretrained: bool = True, img_size: int | None = None,
                   model_args: dict[str, Any] | None = None) -> nn.Module:
    """A timm model with a ``num_classes`` head, from local ``weights`` or timm's source.

    ``img_size`` other than the checkpoint's makes timm resample ViT position embeddings while it
    loads the weights; models without a fixed input size (CNNs) do not take it and ignore it.
    """
    args = dict(model_args or {})
    if img_size is not None and args.get("img_size", img_size) != img_size:
        raise ValueError(f"img_size {img_size} and model_args img_size={args['img_size']} "
                         "disagree; give one")
    size = args.pop("img_size", img_size)
    if weights and not pretrained:
        raise ValueError("weights were given but pretrained is off; drop one of them")
    if is_external(name):  # hf: / open_clip: specs: their factory checks the name
        try:
            return create_backbone(name, weights, num_classes, size, pretrained, **args)
        except (ImportError, OSError, RuntimeError) as e:  # no package, folder or file
            raise ValueError(f"cannot build {name}: {str(e)[:500]}") from None
    known = timm.list_models()
    if name.split(".")[0] not in known:
        close = difflib.get_close_matches(name, known, n=3)
        raise ValueError(f"unknown timm model '{name}'"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    if size is not None:
        check_img_size(name, size, args)
    try:
        return create_backbone(name, weights, num_classes, size, pretrained, **args)
    except TypeError as e:
        if "img_size" not in str(e) or size is None:
            raise
        logger.info("%s takes any input size; img_size %d is used for the data only", name, size)
        return create_backbone(name, weights, num_classes, None, pretrained, **args)
    except RuntimeError as e:
        if weights and ("state_dict" in str(e) or "size mismatch" in str(e)):
            raise ValueError(f"weights {weights} do not fit {name}: {str(e)[:500]}") from None
        if weights and size is not None:  # e.g. position embeddings resampled to nothing
            raise ValueError(f"cannot load weights {weights} into {name} at img_size {size}: "
                             f"{str(e)[:300]}") from None
        raise


def check_img_size(name: str, img_size: int, model_args: dict[str, Any]) -> None:
    """Refuse an ``img_size`` smaller than one patch of ``name``; warn when it is not a multiple
    of the patch, since the patch embedding then drops the pixels that do not fill a patch.

    The patch size comes from the model's view, on a weightless copy built on the meta device
    (no memory, no download); a model that cannot be built there is left to the real build.
    """
    try:
        with torch.device("meta"):
            probe = timm.create_model(name, pretrained=False, **model_args)
        patch = get_view(probe).patch_size
    except Exception:  # only a pre-check: the real build reports its own errors
        return
    if not patch:
        return
    if img_size < patch:
        raise ValueError(f"img_size {img_size} is smaller than one {patch}x{patch}-pixel patch of "
                         f"{name}; use at least {patch}, ideally a multiple of {patch}")
    if img_size % patch:
        logger.warning("img_size %d is not a multiple of %s's %d-pixel patch: the last %d pixels "
                       "of every row and column are dropped (use %d or %d)", img_size, name, patch,
                       img_size % patch, img_size - img_size % patch,
                       img_size - img_size % patch + patch)
