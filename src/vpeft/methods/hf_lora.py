"""Hugging Face PEFT's LoRA, injected into the same timm model: the peer baseline.

Runs through vpeft's API, engine and benchmarks so that vpeft's own ``lora`` is compared with it on
the same model, data and schedule. PEFT adapts a fused ``qkv`` layer as one matrix (q, k and v
together); it cannot restrict the update to q and v as vpeft's ``lora`` does. Needs ``peft``
(``pip install peft``, part of the ``bench`` and ``dev`` extras).

Targets follow vpeft's ``lora``: separate q and v projections where the attention has no fused
layer; on families without attention projections the view's ``update_targets`` (ConvNeXt's MLP
Linears; a CNN's block convs but depthwise ones, plus the conv feeding the head), which PEFT
adapts with its own Conv2d LoRA layer (grouped convs left out: PEFT cannot merge those).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.inject import linear_targets
from vpeft.core.method import Method
from vpeft.core.surgery import replace_module
from vpeft.registry import register


@dataclass
class HFLoRAConfig(MethodConfig):
    rank: int = option(8, "LoRA rank r.")
    alpha: float | None = option(None, "lora_alpha (default: r, i.e. scale 1).")
    dropout: float = option(0.0, "lora_dropout.")
    targets: tuple[str, ...] = option(("qkv",), "Linear layers to adapt, by name pattern.")


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError(
            "method 'hf-lora' needs Hugging Face PEFT: pip install 'vpeft[bench]'"
        ) from e
    return peft


@register
class HFLoRA(Method):
    """hf-lora: Hugging Face PEFT's LoRA on the same model (peer baseline)."""

    name = "hf-lora"
    config_cls = HFLoRAConfig
    family = "reference"
    subfamily = "peer baseline"
    mergeable = True
    structure_preserving = True
    inference_overhead = False
    zero_init = True
    requires = ("peft",)

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: HFLoRAConfig = self.config
        default = HFLoRAConfig.__dataclass_fields__["targets"].default
        if cfg.targets == default and not view.has_qkv and view.blocks:
            # ConvNeXt's MLP, a CNN's convs; PEFT cannot merge a LoRA of a grouped conv
            paths = [p for p in view.update_targets(method=self.name)
                     if getattr(model.get_submodule(p), "groups", 1) == 1]
        else:  # "qkv" as the view knows it: PEFT's one matrix, or q and v where separate
            paths = [p for p, _ in linear_targets(model, view, cfg.targets, "fused", self.name)]
        peft = _peft()
        lora_cfg = peft.LoraConfig(
            r=cfg.rank,
            lora_alpha=cfg.alpha if cfg.alpha is not None else cfg.rank,
            lora_dropout=cfg.dropout,
            target_modules=paths,
        )
        peft.inject_adapter_in_model(lora_cfg, model)
        for n, p in model.named_parameters():  # PEFT unfreezes only its own; keep it so
            p.requires_grad_("lora_" in n)

    def _layers(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        layer_cls = _peft().tuners.lora.LoraLayer
        return [(n, m) for n, m in model.named_modules() if isinstance(m, layer_cls)]

    @torch.no_grad()
    def merge(self, model: nn.Module) -> dict[str, nn.Module]:
        removed = {}
        for path, layer in self._layers(model):
            layer.merge()
            replace_module(model, path, layer.get_base_layer())
            removed[path] = layer
        return removed

    @torch.no_grad()
    def unmerge(self, model: nn.Module, removed: dict[str, nn.Module]) -> None:
        for path, layer in removed.items():
            replace_module(model, path, layer)
            layer.unmerge()
