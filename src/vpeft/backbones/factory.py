"""Create a backbone from a model spec: a timm name, ``hf:<folder or hub id>`` or
``open_clip:<arch>``, with local weights or the library's usual pretrained source.

* ``hf:<folder>``: ``transformers``' ``AutoModelForImageClassification`` where the folder's
  config names an image-classification architecture (its head is resized to ``num_classes``),
  else ``AutoModel`` with a new Linear head; in :class:`~vpeft.backbones.hf.HFImageClassifier`.
* ``open_clip:<arch>``: ``open_clip.create_model(arch, pretrained=weights)``; its image tower
  ``.visual`` with a Linear head, in :class:`~vpeft.backbones.open_clip.OpenCLIPClassifier`.
"""

from __future__ import annotations

import difflib
import importlib
import json
import logging
from pathlib import Path
from typing import Any

import timm
from torch import nn

log = logging.getLogger(__name__)


HF_PREFIX, OPEN_CLIP_PREFIX = "hf:", "open_clip:"
# PIL resample codes in HF image processor configs -> timm interpolation names
_RESAMPLE = {0: "nearest", 2: "bilinear", 3: "bicubic"}


def is_external(name: str) -> bool:
    """Whether ``name`` is an ``hf:`` or ``open_clip:`` spec rather than a timm model name."""
    return name.startswith((HF_PREFIX, OPEN_CLIP_PREFIX))


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
    if name.startswith(HF_PREFIX):
        return create_hf(name[len(HF_PREFIX):], weights, num_classes, pretrained, **model_args)
    if name.startswith(OPEN_CLIP_PREFIX):
        return create_open_clip(name[len(OPEN_CLIP_PREFIX):], weights, num_classes or 1000,
                                img_size, pretrained, **model_args)
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


def _package(name: str, spec: str):
    try:
        return importlib.import_module(name)
    except ImportError:
        raise ImportError(f"model '{spec}' needs the '{name}' package: "
                          "pip install 'vpeft[hf]'") from None


def create_hf(source: str, weights: str | Path | None = None, num_classes: int | None = None,
              pretrained: bool = True, **model_args: Any) -> nn.Module:
    """A ``transformers`` vision model from a local folder (``config.json`` + weights) or a hub
    id, as an :class:`HFImageClassifier` with ``num_classes`` outputs.

    ``pretrained=False`` builds it from the config alone (random init). Preprocessing (mean, std,
    resample) comes from the folder's ``preprocessor_config.json`` where it has one.
    """
    from vpeft.backbones.hf import HFImageClassifier

    tf = _package("transformers", HF_PREFIX + source)
    if weights is not None:
        raise ValueError("hf: models read their weights from the folder; drop --weights")
    config = tf.AutoConfig.from_pretrained(source)
    archs = [a for a in (config.architectures or []) if a.endswith("ForImageClassification")]
    kwargs = dict(model_args)
    if archs and num_classes is not None:
        kwargs["num_labels"] = num_classes
    auto = tf.AutoModelForImageClassification if archs else tf.AutoModel
    if pretrained:  # a head of another size than the checkpoint's starts new
        model = auto.from_pretrained(source, ignore_mismatched_sizes=bool(archs), **kwargs)
    else:
        model = auto.from_config(tf.AutoConfig.from_pretrained(source, **kwargs))
    log.debug("%s(%s): %s", auto.__name__, source, type(model).__name__)
    return HFImageClassifier(model, num_classes, _hf_preprocess(source))


def _hf_preprocess(source: str) -> dict[str, Any]:
    path = Path(source) / "preprocessor_config.json"
    if not path.is_file():
        log.info("no preprocessor_config.json in %s: ImageNet mean/std", source)
        return {}
    cfg = json.loads(path.read_text())
    out: dict[str, Any] = {}
    if "image_mean" in cfg and "image_std" in cfg:
        out["mean"], out["std"] = cfg["image_mean"], cfg["image_std"]
    if cfg.get("resample") in _RESAMPLE:
        out["interpolation"] = _RESAMPLE[cfg["resample"]]
    return out


def create_open_clip(arch: str, weights: str | Path | None = None, num_classes: int = 1000,
                     img_size: int | None = None, pretrained: bool = True,
                     **model_args: Any) -> nn.Module:
    """The image tower of ``open_clip.create_model(arch, pretrained=weights)`` with a Linear
    head of ``num_classes``. ``weights`` is an open_clip (full CLIP) checkpoint file; without it
    the tower is random (no download)."""
    from vpeft.backbones.open_clip import OpenCLIPClassifier

    oc = _package("open_clip", OPEN_CLIP_PREFIX + arch)
    if arch not in oc.list_models():
        close = difflib.get_close_matches(arch, oc.list_models(), n=3)
        raise ValueError(f"unknown open_clip architecture '{arch}'"
                         + (f"; did you mean {', '.join(close)}?" if close else ""))
    if weights is not None and not Path(weights).is_file():
        raise FileNotFoundError(f"weights file not found: {weights}")
    kwargs = dict(model_args)
    if img_size is not None:
        kwargs["force_image_size"] = img_size  # open_clip resizes position embeddings on load
    file = str(weights) if weights is not None and pretrained else None
    clip = oc.create_model(arch, pretrained=file, **kwargs)
    return OpenCLIPClassifier(clip.visual, num_classes, architecture=OPEN_CLIP_PREFIX + arch)
