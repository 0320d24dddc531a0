"""The task interface and the task registry."""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

# name -> "module:Class"; imported on first use so that naming a task costs no video library
TASKS = {"image": "vpeft.tasks.image:ImageTask", "video": "vpeft.tasks.video:VideoTask",
         "segmentation": "vpeft.tasks.segmentation:SegmentationTask"}


class Task:
    """One application: its data, what sits on top of the backbone, its loss and its results.

    Subclasses set ``name`` and implement :meth:`open`; the others have the classification
    defaults (the backbone's own head, cross-entropy, top-1).
    """

    name: ClassVar[str] = ""
    # whether a run that trains only the head may train it on cached pooled features
    caches_features: ClassVar[bool] = True
    score: ClassVar[str] = "top1"  # the result that ranks runs of this task (percent)
    predicts: ClassVar[str] = "labels"  # what `vpeft predict` writes: labels (CSV) or masks (PNG)

    def build(self, model: nn.Module) -> None:
        """Change the freshly built backbone for this task, before it is adapted (a decoder in
        the head's place). Classification keeps the backbone's own head."""

    def transforms(self, data_cfg: dict[str, Any], seed: int = 0) -> tuple[Any, Any]:
        """The training and the evaluation transform of the data sets, from timm's data config
        of the model (training adds flips through ``hflip_seed`` where asked)."""
        from vpeft.data import eval_transform

        tf = eval_transform(data_cfg)
        return tf, tf

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

    def label_shape(self, batch: int, size: int) -> tuple[int, ...]:
        """Shape of a batch of labels for ``size``-pixel inputs (random ones for profiling)."""
        return (batch,)

    def correct(self, logits: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(correct, counted)`` predictions of a training batch (images; pixels for masks),
        as tensors on the batch's device (reading them would wait for a GPU)."""
        return (logits.argmax(-1) == labels).sum(), labels.new_tensor(labels.numel())

    def metric(self, classes: list[str]) -> Any:
        """A fresh accumulator of evaluation results: ``update(logits, labels)`` per batch (the
        logits of :meth:`infer`), ``compute()`` -> a dict holding :attr:`score`, ``loss`` and
        ``images``."""
        return Accuracy()

    def infer(self, model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
              size: int) -> torch.Tensor:
        """The logits evaluation scores (``size``: the side the model was trained at)."""
        return model(images)

    def result_fields(self) -> dict[str, Any]:
        """What a run's ``results.json`` records about the task."""
        return {"task": self.name}


class Accuracy:
    """Top-1 (percent), mean cross-entropy and the predicted class of every input, in order."""

    def __init__(self) -> None:
        self.loss_sum, self.correct, self.preds = 0.0, 0, []

    def update(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.loss_sum += F.cross_entropy(logits.float(), labels, reduction="sum").item()
        pred = logits.argmax(dim=-1)
        self.correct += int((pred == labels).sum())
        self.preds.append(pred.cpu())

    def compute(self) -> dict[str, Any]:
        preds = torch.cat(self.preds) if self.preds else torch.zeros(0, dtype=torch.long)
        n = max(len(preds), 1)
        return {"top1": 100.0 * self.correct / n, "loss": self.loss_sum / n,
                "images": len(preds), "predictions": preds}


def task_names() -> list[str]:
    return sorted(TASKS)


def make_task(name: str = "image", **options: Any) -> Task:
    """The task called ``name`` with its ``options`` (each task takes the ones it has: video
    ``frames`` and ``views``; segmentation ``decoder``, ``decoder_width``, ``eval_mode``)."""
    if name not in TASKS:
        raise ValueError(f"unknown task '{name}'; tasks are {', '.join(task_names())}")
    module, cls = TASKS[name].split(":")
    task_cls = getattr(importlib.import_module(module), cls)
    return task_cls.from_options(**options)
