"""vpeft: parameter-efficient fine-tuning of pre-trained vision models.

>>> model = vpeft.adapt(timm_model, "lora", rank=8)
>>> vpeft.save(model, "runs/task-lora"); merged = vpeft.merge(model)
>>> tasks = vpeft.MultiTaskModel(timm_model); tasks.load("cifar", "runs/task-lora")
"""

from __future__ import annotations

from typing import Any

from vpeft.backbones import BackboneView, MissingPartError, get_view
from vpeft.core.checkpoint import CheckpointError, load, read_config, save
from vpeft.core.config import MethodConfig
from vpeft.core.method import Method
from vpeft.core.multitask import MultiTaskModel
from vpeft.core.state import Summary, adapt, adapter_state_dict, get_state, merge, summary, unmerge
from vpeft.core.surgery import NotMergeableError
from vpeft.core.targeting import TargetNotFoundError
from vpeft.registry import MethodInfo, get_method, list_methods, make_config, register

__version__ = "0.1.0"

__all__ = [
    "BackboneView",
    "CheckpointError",
    "Method",
    "MethodConfig",
    "MethodInfo",
    "MissingPartError",
    "MultiTaskModel",
    "NotMergeableError",
    "Summary",
    "TargetNotFoundError",
    "adapt",
    "adapter_state_dict",
    "get_method",
    "get_state",
    "get_view",
    "list_methods",
    "load",
    "make_config",
    "merge",
    "read_config",
    "register",
    "save",
    "summary",
    "unmerge",
]


def __getattr__(name: str) -> Any:
    """Every method's config class by name: ``vpeft.LoRAConfig``, ``vpeft.SSFConfig`` ..."""
    from vpeft.registry import config_classes

    classes = config_classes()
    if name in classes:
        return classes[name]
    raise AttributeError(f"module 'vpeft' has no attribute '{name}'")


def __dir__() -> list[str]:
    from vpeft.registry import config_classes

    return sorted([*__all__, *config_classes()])
