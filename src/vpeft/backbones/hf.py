"""View of Hugging Face ``transformers`` vision models: ViT, DINOv2, CLIP vision, Swin ...

HF models return ``ModelOutput`` objects, not logits, and a bare encoder (``ViTModel``) has no
classifier. :class:`HFImageClassifier` wraps one by composition: ``forward(pixel_values)``
returns logits, the head is the model's own (``ViTForImageClassification.classifier``) or a new
Linear on the pooled output, and ``get_classifier`` makes it the trained head, as on timm.

The view is found by structure: every module holding three separate q/k/v Linears
(``q_proj/k_proj/v_proj`` in transformers 5, ``query/key/value`` in 4.x) is an attention, and
the element of a ``ModuleList`` that encloses it is a block; the block's MLP is its child whose
Linears map the block width back to itself. That covers flat encoders (ViT, DINOv2, CLIP) and
staged ones (Swin: ``layers[s].blocks[j]``, ``block_dims`` per stage) without naming a model.

``transformers`` is imported only by the factory; this file needs no package beyond torch.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from torch import nn

from vpeft.backbones.base import BackboneView, head_paths, register_view

# separate projection names used by transformers' attentions (5.x first, then 4.x)
QKV_NAMES = (("q_proj", "k_proj", "v_proj"), ("query", "key", "value"))
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class HFImageClassifier(nn.Module):
    """A ``transformers`` vision model whose ``forward(pixel_values)`` returns ``(B, classes)``.

    ``model`` keeps its own classifier when it has one (the ``classifier`` of an
    ``*ForImageClassification`` model); otherwise ``num_classes`` gives a new Linear ``head`` on
    the pooled output (``pooler_output``, else the first token of ``last_hidden_state``).
    ``preprocess`` holds the image processor's ``mean``/``std``/``interpolation`` where known.
    """

    def __init__(self, model: nn.Module, num_classes: int | None = None,
                 preprocess: dict[str, Any] | None = None) -> None:
        super().__init__()
        self.model = model
        own = getattr(model, "classifier", None)
        self.own_head = isinstance(own, nn.Linear)
        if self.own_head:
            self.head = None
            self.num_classes = own.out_features
        else:
            if num_classes is None:
                raise ValueError(f"{type(model).__name__} has no classifier: give num_classes")
            self.head = nn.Linear(_feature_dim(model), num_classes)
            self.num_classes = num_classes
        # pass interpolate_pos_encoding where the model takes it, so other input sizes work
        params = inspect.signature(model.forward).parameters
        self._interpolate = "interpolate_pos_encoding" in params
        size = getattr(model.config, "image_size", 224)
        size = tuple(size) if isinstance(size, (tuple, list)) else (size, size)
        pre = preprocess or {}
        self.pretrained_cfg = {
            "architecture": f"hf:{type(model).__name__}",
            "input_size": (3, *size),
            "mean": tuple(pre.get("mean", IMAGENET_MEAN)),
            "std": tuple(pre.get("std", IMAGENET_STD)),
            "interpolation": pre.get("interpolation", "bilinear"),
            "crop_pct": 1.0,
        }

    def get_classifier(self) -> nn.Module:
        return self.model.classifier if self.own_head else self.head

    def _run(self, x: torch.Tensor):
        kwargs = {"interpolate_pos_encoding": True} if self._interpolate else {}
        return self.model(pixel_values=x, **kwargs)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """The classifier's input (pooled features), ``(B, D)``."""
        if not self.own_head:
            return _pooled(self._run(x))
        seen: list[torch.Tensor] = []  # the own head's input, read where HF feeds it
        hook = self.model.classifier.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
        try:
            self._run(x)
        finally:
            hook.remove()
        return seen[-1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        return x if pre_logits else self.get_classifier()(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self._run(x)
        return out.logits if self.own_head else self.head(_pooled(out))


def _pooled(out: Any) -> torch.Tensor:
    pooled = getattr(out, "pooler_output", None)
    return pooled if pooled is not None else out.last_hidden_state[:, 0]


def _feature_dim(model: nn.Module) -> int:
    dim = getattr(model, "num_features", None)  # Swin: width of the last stage
    return int(dim) if dim else int(model.config.hidden_size)


def _is_hf(model: nn.Module) -> bool:
    return any(c.__module__.startswith("transformers.") for c in type(model).__mro__)


def _block_of(path: str) -> str | None:
    """The ``ModuleList`` element enclosing ``path`` (``enc.layers.3.attn`` -> ``enc.layers.3``)."""
    parts = path.split(".")
    idx = [i for i, p in enumerate(parts) if p.isdigit()]
    return ".".join(parts[: idx[-1] + 1]) if idx else None


def _attentions(model: nn.Module) -> list[tuple[str, str, tuple[str, str, str]]]:
    """``(block, attention holder relative to it, q/k/v names)`` in forward order."""
    found = []
    for path, m in model.named_modules():
        for names in QKV_NAMES:
            if all(isinstance(getattr(m, n, None), nn.Linear) for n in names):
                block = _block_of(path)
                if block is not None and block != path:
                    found.append((block, path[len(block) + 1 :], names))
    return found


def _mlp(block: nn.Module, attn: str, dim: int) -> str | None:
    """The block's child (not the attention) whose Linears map ``dim`` back to ``dim``."""
    for name, child in block.named_children():
        if name == attn:
            continue
        lins = [m for m in child.modules() if isinstance(m, nn.Linear)]
        if len(lins) >= 2 and lins[0].in_features == dim and lins[-1].out_features == dim:
            return name
    return None


@register_view
def hf_view(model: nn.Module) -> BackboneView | None:
    inner, prefix = (model.model, "model.") if isinstance(model, HFImageClassifier) else (model, "")
    if not _is_hf(inner):
        return None
    found = _attentions(inner)
    if not found:
        return None
    first_block, attn_rel, names = found[0]
    block = inner.get_submodule(first_block)
    dims = [inner.get_submodule(f"{b}.{a}.{n[0]}").in_features for b, a, n in found]
    attn = attn_rel.split(".")[0]
    conv = next(((n, m) for n, m in inner.named_modules() if isinstance(m, nn.Conv2d)), None)
    return BackboneView(
        family="hf",
        model=model,
        blocks=[prefix + b for b, _, _ in found],
        block_dims=dims,
        attn=attn,
        qkv_separate=tuple(f"{attn_rel}.{n}" for n in names),
        mlp=_mlp(block, attn, dims[0]),
        norms=tuple(n for n, m in block.named_children() if isinstance(m, nn.LayerNorm)),
        heads=head_paths(model),
        patch_embed=prefix + conv[0] if conv else None,
        # HF blocks take extra arguments and (in 4.x) return tuples: no token-level methods
        sequence_tokens=False,
        embed_dim=dims[0],
        patch_size=conv[1].stride[0] if conv else None,
        in_chans=conv[1].in_channels if conv else 3,
    )
