"""The task interface and the task registry."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# name -> "module:Class"; imported on first use so that naming a task costs no video library
TASKS = {"image": "vpeft.tasks.image:ImageTask", "video": "vpeft.tasks.video:VideoTask"}


class Task:
    """One application: its data, what sits on top of the backbone, its loss and its results.

    Subclasses set ``name`` and implement :meth:`open`; the others have the classification
    defaults (the backbone's own head, cross-entropy, top-1).
    """

    name: ClassVar[str] = ""

    def open(self, root: str | Path, split: str, classes: list[str] | None = None,
             train: bool = False, seed: int = 0) -> Any:
        """Split ``split`` of the data set in ``root``: a data set of ``(input, label)`` with
        ``classes``, ``num_classes``, ``layout`` and a settable per-image ``transform``.
        ``train`` selects training-time sampling (drawn from ``seed``) where the task has any."""
        raise NotImplementedError

    def wrap(self, model: nn.Module) -> nn.Module:
        """The network a batch of this task's inputs runs through (sharing ``model``'s
        parameters; it adds none)."""
        return model

    def loss(self, logits: torch.Tensor, labels: torch.Tensor,
             label_smoothing: float = 0.0) -> torch.Tensor:
        return F.cross_entropy(logits, labels, label_smoothing=label_smoothing)

    def result_fields(self) -> dict[str, Any]:
        """What a run's ``results.json`` records about the task."""
        return {"task": self.name}


def task_names() -> list[str]:
    return sorted(TASKS)


def make_task(name: str = "image", frames: int = 8, views: int = 1) -> Task:
    """The task called ``name``; ``frames`` and ``views`` are the clip options (video)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; tasks are {', '.join(task_names())}")
    module, cls = TASKS[name].split(":")
    task_cls = getattr(importlib.import_module(module), cls)
    return task_cls.from_options(frames=frames, views=views)
