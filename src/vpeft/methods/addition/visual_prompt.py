"""Visual prompting (Bahng et al., 2022, arXiv:2203.17274): a learned frame added to the pixels.

A padding prompt of width ``p`` (30 px on 224-px images in the paper, 69,840 values) is added to
every input image, ``x + prompt``, where the prompt is learned on a border of width ``p`` and zero
inside. Only the input changes, so the method works on any backbone:

* where the view names an input stem (``patch_embed``), that module is wrapped, so
  ``forward_features`` sees the prompt too;
* otherwise the prompter is registered on the root model (``model.visual_prompt``) and a forward
  pre-hook applies it to the model's first argument. Only ``model(x)`` then adds the prompt.

Wrapping the stem is the composition-first choice: the change is visible in the module tree and
needs no hook. The hook is the fallback for backbones whose stem the view does not know.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vpeft.backbones.base import BackboneView
from vpeft.core.config import MethodConfig, option
from vpeft.core.method import Method
from vpeft.core.surgery import Wrapper, wrap
from vpeft.registry import register

ROOT_NAME = "visual_prompt"


@dataclass
class VisualPromptConfig(MethodConfig):
    pad: int = option(30, "Frame width in pixels at `reference_size` (30 at 224 px, as the paper).")
    reference_size: int = option(224, "Image side `pad` is given for; the frame scales with the "
                                      "actual side and stays under half of it. 0 = no scaling.")
    img_size: int = option(0, "Input side in pixels; 0 = read it from the model.")
    init_std: float = option(1.0, "Std of the normal init (the reference code uses randn); "
                                  "0 = zeros, so the model starts equal to the base.")

    def validate(self) -> None:
        if self.pad < 1:
            raise ValueError(f"visual-prompt pad must be >= 1, got {self.pad}")

    def frame(self, height: int, width: int) -> int:
        """The frame width actually used for an image of ``height x width``."""
        side = min(height, width)
        p = round(self.pad * side / self.reference_size) if self.reference_size else self.pad
        return max(1, min(p, (side - 1) // 2))


class PadPrompter(nn.Module):
    """``x + prompt`` with the prompt learned on a ``pad``-wide border of a C x H x W image."""

    def __init__(self, channels: int, height: int, width: int, pad: int, init_std: float) -> None:
        super().__init__()
        self.size, self.pad = (height, width), pad
        inner = height - 2 * pad
        self.top = nn.Parameter(torch.randn(1, channels, pad, width) * init_std)
        self.bottom = nn.Parameter(torch.randn(1, channels, pad, width) * init_std)
        self.left = nn.Parameter(torch.randn(1, channels, inner, pad) * init_std)
        self.right = nn.Parameter(torch.randn(1, channels, inner, pad) * init_std)

    def prompt(self) -> torch.Tensor:
        c, h, w, p = self.top.shape[1], *self.size, self.pad
        middle = self.top.new_zeros(1, c, h - 2 * p, w - 2 * p)
        row = torch.cat([self.left, middle, self.right], dim=3)
        return torch.cat([self.top, row, self.bottom], dim=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[-2:]) != self.size:
            raise ValueError(f"visual prompt was made for {self.size} images, got "
                             f"{tuple(x.shape[-2:])}; adapt with img_size=<side>")
        return x + self.prompt().to(x.dtype)


class PromptedStem(Wrapper):
    """The input stem, fed ``prompter(x)`` instead of ``x``."""

    def __init__(self, base: nn.Module, prompter: PadPrompter) -> None:
        super().__init__(base)
        self.prompter = prompter

    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        return self.base(self.prompter(x), *args, **kwargs)


def _prompt_input(module: nn.Module, args: tuple) -> tuple:
    """Forward pre-hook on the root model (module-level, so copies of the model keep working)."""
    if not args:
        raise TypeError("visual-prompt needs the image as the model's first positional argument")
    return (getattr(module, ROOT_NAME)(args[0]), *args[1:])


def image_size(model: nn.Module, view: BackboneView, cfg: VisualPromptConfig) -> tuple[int, int]:
    if cfg.img_size:
        return cfg.img_size, cfg.img_size
    stem = model.get_submodule(view.patch_embed) if view.patch_embed else None
    size = getattr(stem, "img_size", None)
    if size is None:
        size = (getattr(model, "pretrained_cfg", None) or {}).get("input_size", (None,))[1:]
    if not size:
        raise ValueError("visual-prompt cannot tell the input size of this model; pass img_size")
    return int(size[0]), int(size[1])


@register
class VisualPrompt(Method):
    """Visual prompting: a learned pixel frame added to the input image."""

    name = "visual-prompt"
    config_cls = VisualPromptConfig
    family = "addition"
    subfamily = "prompt"
    no_decay = ("*prompter.*", f"{ROOT_NAME}.*")

    @property
    def zero_init(self) -> bool:  # type: ignore[override]
        return self.config.init_std == 0

    def apply(self, model: nn.Module, view: BackboneView) -> None:
        cfg: VisualPromptConfig = self.config
        h, w = image_size(model, view, cfg)
        prompter = PadPrompter(view.in_chans, h, w, cfg.frame(h, w), cfg.init_std)
        if view.patch_embed:
            wrap(model, view.patch_embed, lambda stem: PromptedStem(stem, prompter))
        else:
            model.add_module(ROOT_NAME, prompter)
            model.register_forward_pre_hook(_prompt_input)
