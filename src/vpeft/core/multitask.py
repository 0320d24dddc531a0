"""Several task adapters on one frozen backbone: :class:`MultiTaskModel`.

Each task is the backbone adapted by its own method (any method, one per task), built around the
*same* frozen tensors: the task's module tree is a copy of the backbone's in which every parameter
and buffer is the backbone's own object. A task therefore costs its adapter and its head, not a
copy of the backbone. Tensors a method trains in place (BitFit's biases, a head of the backbone's
size, everything for ``full``) are copied for that task when it is added, so training one task
never changes the backbone or another task.

>>> tasks = vpeft.MultiTaskModel(timm.create_model("deit_tiny_patch16_224", pretrained=True))
>>> tasks.load("cifar", "runs/cifar-lora")          # a saved adapter
>>> tasks.add("pets", "vpt-deep", num_classes=37)    # a new one, to train
>>> logits = tasks(images, task="cifar")
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn

from vpeft.core.checkpoint import (
    CONFIG_NAME,
    check_base,
    config_from_meta,
    load,
    read_config,
    save,
)
from vpeft.core.config import MethodConfig
from vpeft.core.state import adapt, get_state


class MultiTaskModel(nn.Module):
    """A frozen backbone and named task models that share its tensors.

    ``tasks[name]`` (or ``tasks.task(name)``) is an ordinary adapted model: train it, save it,
    ``vpeft.summary`` it. ``forward(x, task=name)`` runs one task. Merging a task in place is
    refused (it would change the shared weights); ``vpeft.merge(tasks[name])`` returns a
    standalone merged copy.
    """

    def __init__(self, backbone: nn.Module) -> None:
        if get_state(backbone, required=False) is not None:
            raise ValueError(
                "MultiTaskModel needs the plain backbone, not an adapted model; add the adapted "
                "task with .load(name, directory) after saving it"
            )
        super().__init__()
        backbone.requires_grad_(False)
        self.backbone = backbone
        self.tasks = nn.ModuleDict()

    # -- building tasks --------------------------------------------------------------------------
    def _shared(self) -> dict[int, torch.Tensor]:
        return {id(t): t for t in self.backbone.state_dict(keep_vars=True).values()}

    def _new_task(self, name: str, num_classes: int | None) -> nn.Module:
        if not name or "." in name:
            raise ValueError(f"task name must be non-empty and without '.', got {name!r}")
        if name in self.tasks:
            raise ValueError(f"task {name!r} exists already; remove it first")
        model = copy.deepcopy(self.backbone, memo=dict(self._shared()))
        if num_classes is not None and num_classes != getattr(model, "num_classes", None):
            reset = getattr(model, "reset_classifier", None)
            if reset is None:
                raise ValueError(
                    f"{type(model).__name__} has no reset_classifier(); tasks of this backbone "
                    f"must keep its {getattr(model, 'num_classes', '?')} classes"
                )
            reset(num_classes)
        return model

    def _own_trained(self, model: nn.Module) -> None:
        """Give ``model`` its own copy of every shared tensor its method trains."""
        shared, copies = self._shared(), {}
        for module in model.modules():
            for key, p in module._parameters.items():
                if p is not None and p.requires_grad and id(p) in shared:
                    if id(p) not in copies:  # one copy per tensor keeps tied weights tied
                        copies[id(p)] = nn.Parameter(p.detach().clone())
                    module._parameters[key] = copies[id(p)]
        for key in copies:  # adapt() marked the shared originals trainable: freeze them again
            shared[key].requires_grad_(False)
        get_state(model).shares_base = True

    def add(
        self,
        name: str,
        method: str | MethodConfig,
        num_classes: int | None = None,
        **options: Any,
    ) -> nn.Module:
        """Add task ``name`` adapted with ``method`` (and its options); returns its model.

        ``num_classes`` gives the task its own classifier of that size (default: the backbone's).
        """
        model = self._new_task(name, num_classes)
        adapt(model, method, **options)
        self._own_trained(model)
        self.tasks[name] = model
        return model

    def load(self, name: str, directory: str | os.PathLike, strict_base: bool = True) -> nn.Module:
        """Add task ``name`` from an adapter saved by ``vpeft.save``; returns its model.

        The checkpoint must have been made for this backbone (checked as ``vpeft.load`` does);
        its head size is taken from the checkpoint.
        """
        meta = read_config(directory)
        model = self._new_task(name, meta["base"]["num_classes"])
        check_base(meta, model, directory, strict_base)
        adapt(model, config_from_meta(meta, directory))
        self._own_trained(model)
        load(model, directory)
        self.tasks[name] = model
        return model

    def remove(self, name: str) -> nn.Module:
        """Take task ``name`` out and return its model."""
        model = self.task(name)
        del self.tasks[name]
        return model

    # -- using tasks -----------------------------------------------------------------------------
    @property
    def names(self) -> list[str]:
        return list(self.tasks.keys())

    def task(self, name: str) -> nn.Module:
        if name not in self.tasks:
            raise KeyError(f"no task {name!r}; tasks: {self.names}")
        return self.tasks[name]

    __getitem__ = task

    def forward(self, x: torch.Tensor, task: str) -> torch.Tensor:
        return self.task(task)(x)

    def parameter_counts(self) -> dict[str, int]:
        """Elements stored once for the backbone, and for each task what it stores on its own."""
        shared = {id(t) for t in self.backbone.state_dict(keep_vars=True).values()}
        counts = {"backbone": sum(t.numel() for t in self.backbone.parameters())}
        for name, model in self.tasks.items():
            own = {id(p): p for p in model.parameters() if id(p) not in shared}
            counts[name] = sum(p.numel() for p in own.values())
        return counts

    # -- files -----------------------------------------------------------------------------------
    def save(self, directory: str | os.PathLike, overwrite: bool = False) -> Path:
        """Save every task's adapter as ``directory/<task>/`` (the backbone is not written)."""
        root = Path(directory)
        for name, model in self.tasks.items():
            save(model, root / name, overwrite=overwrite)
        return root

    @classmethod
    def from_directory(
        cls, backbone: nn.Module, directory: str | os.PathLike, strict_base: bool = True
    ) -> MultiTaskModel:
        """A MultiTaskModel with every adapter found in ``directory/<task>/``."""
        root = Path(directory)
        found = sorted(p.parent for p in root.glob(f"*/{CONFIG_NAME}"))
        if not found:
            raise FileNotFoundError(f"no saved adapters (*/{CONFIG_NAME}) under {root}")
        tasks = cls(backbone)
        for path in found:
            tasks.load(path.name, path, strict_base)
        return tasks
