"""vpeft: parameter-efficient fine-tuning of pre-trained vision models.

>>> model = vpeft.adapt(timm_model, "lora", rank=8)
>>> vpeft.save(model, "runs/task-lora"); merged = vpeft.merge(model)
>>> tasks = vpeft.MultiTaskModel(timm_model); tasks.load("cifar", "runs/task-lora")

Names are imported on first use (PEP 562), so that ``import vpeft`` and the command line's
``--help`` do not pay for torch and timm; ``vpeft.engine`` and the other sub-packages are reached
the same way (``vpeft.engine.train`` works after a plain ``import vpeft``).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    "BackboneView": "vpeft.backbones",
    "MissingPartError": "vpeft.backbones",
    "get_view": "vpeft.backbones",
    "CheckpointError": "vpeft.core.checkpoint",
    "load": "vpeft.core.checkpoint",
    "read_config": "vpeft.core.checkpoint",
    "save": "vpeft.core.checkpoint",
    "MethodConfig": "vpeft.core.config",
    "Method": "vpeft.core.method",
    "MultiTaskModel": "vpeft.core.multitask",
    "disable_adapter": "vpeft.core.multitask",
    "Summary": "vpeft.core.state",
    "adapt": "vpeft.core.state",
    "adapter_state_dict": "vpeft.core.state",
    "get_state": "vpeft.core.state",
    "merge": "vpeft.core.state",
    "summary": "vpeft.core.state",
    "unmerge": "vpeft.core.state",
    "NotMergeableError": "vpeft.core.surgery",
    "TargetNotFoundError": "vpeft.core.targeting",
    "MethodInfo": "vpeft.registry",
    "get_method": "vpeft.registry",
    "list_methods": "vpeft.registry",
    "make_config": "vpeft.registry",
    "register": "vpeft.registry",
}
_SUBPACKAGES = (
    "backbones", "bench", "core", "data", "engine", "explain", "methods", "registry", "serve",
)

__all__ = [  # literal, for tools; the same names as _EXPORTS
    "BackboneView", "CheckpointError", "Method", "MethodConfig", "MethodInfo", "MissingPartError",
    "MultiTaskModel", "NotMergeableError", "Summary", "TargetNotFoundError", "adapt",
    "adapter_state_dict", "disable_adapter", "get_method", "get_state", "get_view",
    "list_methods", "load", "make_config", "merge", "read_config", "register", "save", "summary",
    "unmerge",
]

if TYPE_CHECKING:  # for type checkers and IDEs; at run time __getattr__ imports on demand
    from vpeft.backbones import BackboneView, MissingPartError, get_view
    from vpeft.core.checkpoint import CheckpointError, load, read_config, save
    from vpeft.core.config import MethodConfig
    from vpeft.core.method import Method
    from vpeft.core.multitask import MultiTaskModel, disable_adapter
    from vpeft.core.state import (
        Summary,
        adapt,
        adapter_state_dict,
        get_state,
        merge,
        summary,
        unmerge,
    )
    from vpeft.core.surgery import NotMergeableError
    from vpeft.core.targeting import TargetNotFoundError
    from vpeft.registry import MethodInfo, get_method, list_methods, make_config, register


def __getattr__(name: str) -> Any:
    """Public names, sub-packages, and each method's config class by name (``vpeft.LoRAConfig``)."""
    if name in _EXPORTS:
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
    elif name in _SUBPACKAGES:
        value = importlib.import_module(f"vpeft.{name}")
    else:
        from vpeft.registry import config_classes

        classes = config_classes()
        if name not in classes:
            raise AttributeError(f"module 'vpeft' has no attribute '{name}'")
        value = classes[name]
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    from vpeft.registry import config_classes

    return sorted([*__all__, *_SUBPACKAGES, *config_classes()])
