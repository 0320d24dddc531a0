"""One tiny random-init example model per backbone family, and which methods can adapt it.

``vpeft methods --backbones`` prints :func:`compatibility` as a method x family table: each cell
is found by really adapting the family's example with the method's defaults, so the table is
never typed by hand. A new family joins by adding its example to :data:`EXAMPLES`.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import timm
from torch import nn

from vpeft.backbones.base import MissingPartError, get_view

# label -> (timm architecture, overrides): widths that the methods' defaults divide
# (KAdaptation's n = 32, FacT's D x D slices), one or two blocks per stage
EXAMPLES: dict[str, tuple[str, dict]] = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "embed_dim": 96,
                                     "depth": 1, "num_heads": 3}),
    "eva": ("eva02_tiny_patch14_224", {"img_size": 32, "patch_size": 8, "embed_dim": 96,
                                       "depth": 1, "num_heads": 3}),
    "swin": ("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 4, "window_size": 4,
                                              "embed_dim": 32, "depths": (1, 1),
                                              "num_heads": (2, 4)}),
    "convnext": ("convnext_tiny", {"dims": (32, 32, 32, 32), "depths": (1, 1, 1, 1)}),
    # BatchNorm CNNs: a ResNet, and an inverted-residual net with depthwise convs
    "resnet": ("resnet18", {"layers": (1, 1, 1, 1), "channels": (16, 16, 32, 32),
                            "stem_width": 16}),
    "mobilenet": ("mobilenetv3_small_050", {}),
}


@dataclass(frozen=True)
class Cell:
    """Whether ``method`` adapts the ``family`` example; else what is missing."""

    method: str
    family: str
    works: bool
    missing: str = ""  # the part (or the error's message) when it does not work
    error: bool = False  # it failed with another error than MissingPartError: a bug

    def as_dict(self) -> dict:
        return dict(self.__dict__)


def example_model(label: str) -> nn.Module:
    arch, overrides = EXAMPLES[label]
    return timm.create_model(arch, pretrained=False, num_classes=3, **overrides).eval()


def compatibility(methods: list[str], labels: list[str] | None = None) -> list[Cell]:
    """Adapt every example with every method's defaults; one :class:`Cell` per pair.

    A :class:`MissingPartError` makes a "not applicable" cell; any other error makes an ``error``
    cell (a bug of the method or the view: the tests require there are none).
    """
    from vpeft.core.state import adapt  # the registry's methods import core; import late

    cells = []
    for label in labels or list(EXAMPLES):
        base = example_model(label)
        family = get_view(base).family
        family = family if family == label else f"{family} ({label})"  # e.g. "cnn (resnet)"
        for name in methods:
            try:
                adapt(copy.deepcopy(base), name)
                cells.append(Cell(name, family, True))
            except MissingPartError as e:
                cells.append(Cell(name, family, False, e.part or str(e)))
            except Exception as e:
                cells.append(Cell(name, family, False, f"{type(e).__name__}: {e}", error=True))
    return cells
